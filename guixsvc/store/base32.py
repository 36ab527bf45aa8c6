"""Nix-base32, the hash encoding used in store paths and narinfo files.

Store path hash parts, NAR hashes printed by `guix hash` / `nix-hash --base32` and the hashes
in narinfos all use this encoding.  It is *not* RFC 4648 base32: the alphabet omits `e o u t`
and the digits are those of the little-endian integer value of the bytes, most significant
digit first (spec store.md §3, upstream `printHash32` / `parseHash32` in
`nix/libutil/hash.cc`).
"""

from __future__ import annotations

import re

__all__ = ["ALPHABET", "decode", "encode", "encoded_length", "is_valid"]

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"

# Characters of the alphabet, used to validate input before `int(..., 32)` (which would
# otherwise accept `e`, `o`, `t`, `u` and upper case).
_VALID = re.compile(r"[0-9a-df-np-sv-z]*")
# Map nix-base32 digits to the digits Python's int() understands in base 32.
_TO_STD = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")


def encoded_length(nbytes: int) -> int:
    """Length of the nix-base32 encoding of `nbytes` bytes (`hashLength32`)."""
    if nbytes <= 0:
        return 0
    return (nbytes * 8 - 1) // 5 + 1


def encode(data: bytes) -> str:
    """Encode `data` in nix-base32 (upstream `printHash32`)."""
    length = encoded_length(len(data))
    if length == 0:
        return ""
    value = int.from_bytes(data, "little")
    alphabet = ALPHABET
    return "".join([alphabet[(value >> (5 * k)) & 31] for k in range(length - 1, -1, -1)])


def _decoded_length(length: int) -> int | None:
    nbytes = length * 5 // 8
    return nbytes if encoded_length(nbytes) == length else None


def is_valid(text: str) -> bool:
    """True if `text` only has nix-base32 characters and a length some byte count encodes to."""
    return _decoded_length(len(text)) is not None and _VALID.fullmatch(text) is not None


def decode(text: str) -> bytes:
    """Decode nix-base32 `text` (upstream `parseHash32`).

    The number of bytes is the one whose encoding has `len(text)` characters.  Like upstream,
    bits of the first digit beyond the byte count are silently dropped.  Raises
    ``ValueError("invalid base-32 hash 'X'")`` for characters outside the alphabet or an
    impossible length.
    """
    nbytes = _decoded_length(len(text))
    if nbytes is None or _VALID.fullmatch(text) is None:
        raise ValueError(f"invalid base-32 hash '{text}'")
    if nbytes == 0:
        return b""
    value = int(text.translate(_TO_STD), 32)
    value &= (1 << (8 * nbytes)) - 1
    return value.to_bytes(nbytes, "little")
