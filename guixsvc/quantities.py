"""Sizes and durations as the Scheme commands read and print them (`guix/ui.scm`).

`guix gc -C 5G`, `-F 10GiB`, `-d 2m` and `guix publish --cache-bypass-threshold=10M` must mean
what they mean to upstream, and the "freed …" lines must read the same, so the grammars of
`size->number`, `string->duration` and `number->size` live here, once, for every command
(spec gc.md §7.2, §7.6).
"""

from __future__ import annotations

import re
from fractions import Fraction

from guixsvc.cliargs import UsageError

__all__ = [
    "UsageError",
    "number_to_size",
    "parse_duration",
    "size_to_number",
    "string_to_number",
]


_BINARY = {
    **dict.fromkeys(("KiB", "K", "k"), 2**10),
    **dict.fromkeys(("MiB", "M"), 2**20),
    **dict.fromkeys(("GiB", "G"), 2**30),
    **dict.fromkeys(("TiB", "T"), 2**40),
    **dict.fromkeys(("PiB", "P"), 2**50),
    **dict.fromkeys(("EiB", "E"), 2**60),
    **dict.fromkeys(("ZiB", "Z"), 2**70),
    **dict.fromkeys(("YiB", "Y"), 2**80),
}
_DECIMAL = {"kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15, "EB": 10**18,
            "ZB": 10**21, "YB": 10**24}  # fmt: skip
_UNITS: dict[str, int] = {**_BINARY, **_DECIMAL, "": 1}

_INTEGER = re.compile(r"[+-]?[0-9]+")
_RATIONAL = re.compile(r"[+-]?[0-9]+/[0-9]+")
_DECIMAL_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def string_to_number(text: str) -> int | Fraction | float | None:
    """The decimal subset of Guile's `string->number`: exact integers and ratios, inexact
    decimals (with a `.` or an exponent); None when `text` is not such a number."""
    if _INTEGER.fullmatch(text):
        return int(text)
    if _RATIONAL.fullmatch(text):
        num, den = text.split("/")
        return None if int(den) == 0 else Fraction(int(num), int(den))
    if _DECIMAL_RE.fullmatch(text):
        return float(text)
    return None


def size_to_number(text: str) -> int:
    """`size->number`: "1024", "1.5G", "10GiB", "5MB" → bytes (rounded half to even)."""
    unit_pos = max(text.rfind(c) for c in ".0123456789")
    if unit_pos >= 0:
        numstr, unit = text[: unit_pos + 1], text[unit_pos + 1 :]
    else:
        numstr, unit = text, ""
    num = string_to_number(numstr)
    if num is None:
        raise UsageError(f"invalid number: {numstr}")
    factor = _UNITS.get(unit)
    if factor is None:
        raise UsageError(f"unknown unit: {unit}")
    if isinstance(num, float):
        return round(num * factor)
    return round(Fraction(num) * factor)


_SIZE_STEPS = (
    (80, "YiB"), (70, "ZiB"), (60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"),
    (10, "KiB"),
)  # fmt: skip


def number_to_size(num: int) -> str:
    """`number->size` (newer `guix/ui.scm`): "118 MiB", "1024 bytes"."""
    for exponent, unit in _SIZE_STEPS:
        if num > 2**exponent:
            return f"{round(Fraction(num, 2**exponent))} {unit}"
    return f"{num} bytes"


_DURATION = re.compile(r"([0-9]+)(s|h|d|w|m)")
_DURATION_SECONDS = {"s": 1, "h": 3600, "d": 24 * 3600, "w": 7 * 24 * 3600, "m": 30 * 24 * 3600}


def parse_duration(text: str) -> int | None:
    """`string->duration`: "30s", "12h", "2d", "1w", "1m" (30 days) → seconds; else None."""
    m = _DURATION.fullmatch(text)
    if m is None:
        return None
    return int(m.group(1)) * _DURATION_SECONDS[m.group(2)]
