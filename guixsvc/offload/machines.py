"""`/etc/guix/machines.scm`: upstream's `build-machine` records, read as data.

Upstream `guix offload` evaluates the file as Guile code; we have no Scheme interpreter and do not
want one running as root in the daemon.  What real configurations contain is a literal form:

    (list (build-machine (name "host") (systems (list "x86_64-linux")) (user "bob")
                         (host-key "ssh-ed25519 AAAA...") (speed 2.)))

so this module reads Scheme data (strings, numbers, booleans, symbols, lists, `'()`, comments)
and interprets exactly that shape: `(list (build-machine (FIELD VALUE) ...) ...)`, lists of
strings as `(list "a" ...)` or `'("a" ...)`.  Anything else (`define`, `let`, quasiquote,
`string-append`, ...) is refused with `machines.scm:LINE:COLUMN: ...` naming where it is, so
nobody is left wondering why a clever configuration was half-understood.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_DAEMON_SOCKET = "/var/guix/daemon-socket/socket"


class MachinesError(Exception):
    """The machines file cannot be used; the message names the file, line and column."""


@dataclass(frozen=True)
class Symbol:
    name: str


@dataclass
class Datum:
    """A read value with its position (1-based line, 0-based column as Guile prints)."""

    value: object
    line: int
    col: int


@dataclass
class BuildMachine:
    """Upstream's `<build-machine>` record (guix/scripts/offload.scm), same defaults."""

    name: str
    user: str
    host_key: str
    systems: list[str]
    port: int = 22
    private_key: str | None = None
    compression: str = "zlib@openssh.com,zlib"
    compression_level: int = 3
    daemon_socket: str = DEFAULT_DAEMON_SOCKET
    overload_threshold: float | None = 0.6
    parallel_builds: int = 1
    speed: float = 1.0
    features: list[str] = field(default_factory=list)
    location: str = ""

    @property
    def key_file(self) -> str:
        """The private key: upstream's default is `$HOME/.ssh/id_rsa`."""
        if self.private_key:
            return self.private_key
        return os.path.join(os.environ.get("HOME", "/root"), ".ssh", "id_rsa")

    @property
    def slot_name(self) -> str:
        return f"{self.name}:{self.port}"


def default_machines_file() -> str:
    return os.path.join(os.environ.get("GUIX_CONFIGURATION_DIRECTORY", "/etc/guix"), "machines.scm")


# -- the reader ------------------------------------------------------------------------------

_DELIMITERS = set(" \t\n\r\f()[]\";'`,")


class _Reader:
    def __init__(self, text: str, file_name: str) -> None:
        self.text = text
        self.pos = 0
        self.file = file_name
        self.line = 1
        self.col = 0

    def error(self, line: int, col: int, message: str) -> MachinesError:
        return MachinesError(f"{self.file}:{line}:{col}: {message}")

    def _advance(self, n: int = 1) -> None:
        for _ in range(n):
            if self.text[self.pos] == "\n":
                self.line += 1
                self.col = 0
            else:
                self.col += 1
            self.pos += 1

    def _skip_space(self) -> None:
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c.isspace():
                self._advance()
            elif c == ";":
                while self.pos < len(text) and text[self.pos] != "\n":
                    self._advance()
            elif text.startswith("#|", self.pos):
                line, col = self.line, self.col
                end = text.find("|#", self.pos + 2)
                if end < 0:
                    raise self.error(line, col, "unterminated block comment")
                self._advance(end + 2 - self.pos)
            elif text.startswith("#;", self.pos):
                self._advance(2)
                self.read()
            else:
                return

    def at_end(self) -> bool:
        self._skip_space()
        return self.pos >= len(self.text)

    def read(self) -> Datum:
        self._skip_space()
        if self.pos >= len(self.text):
            raise self.error(self.line, self.col, "unexpected end of file")
        line, col = self.line, self.col
        c = self.text[self.pos]
        if c in "([":
            close = ")" if c == "(" else "]"
            self._advance()
            items: list[Datum] = []
            while True:
                self._skip_space()
                if self.pos >= len(self.text):
                    raise self.error(line, col, "unexpected end of file in list")
                if self.text[self.pos] in ")]":
                    if self.text[self.pos] != close:
                        raise self.error(self.line, self.col, "mismatched close paren")
                    self._advance()
                    return Datum(items, line, col)
                if self.text[self.pos] == "." and self._delimited(self.pos + 1):
                    raise self.error(self.line, self.col, "dotted pairs are not supported")
                items.append(self.read())
        if c in ")]":
            raise self.error(line, col, 'unexpected ")"')
        if c == '"':
            return Datum(self._string(line, col), line, col)
        if c == "'":
            self._advance()
            inner = self.read()
            return Datum([Datum(Symbol("quote"), line, col), inner], line, col)
        if c in "`,":
            raise self.error(line, col, "quasiquote is not supported: write the data literally")
        return self._atom(line, col)

    def _delimited(self, pos: int) -> bool:
        return pos >= len(self.text) or self.text[pos] in _DELIMITERS

    def _string(self, line: int, col: int) -> str:
        self._advance()
        out: list[str] = []
        escapes = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "f": "\f", "v": "\v",
                   "0": "\0", "\\": "\\", '"': '"'}  # fmt: skip
        while True:
            if self.pos >= len(self.text):
                raise self.error(line, col, "unterminated string")
            c = self.text[self.pos]
            if c == '"':
                self._advance()
                return "".join(out)
            if c == "\\":
                self._advance()
                if self.pos >= len(self.text):
                    raise self.error(line, col, "unterminated string")
                e = self.text[self.pos]
                if e in escapes:
                    out.append(escapes[e])
                    self._advance()
                elif e == "\n":  # line continuation: skip leading blanks of the next line
                    self._advance()
                    while self.pos < len(self.text) and self.text[self.pos] in " \t":
                        self._advance()
                elif e == "x":
                    end = self.text.find(";", self.pos)
                    try:
                        out.append(chr(int(self.text[self.pos + 1 : end], 16)))
                    except ValueError:
                        raise self.error(self.line, self.col, "invalid \\x escape") from None
                    self._advance(end + 1 - self.pos)
                else:
                    raise self.error(self.line, self.col, f"invalid escape \\{e} in string")
                continue
            out.append(c)
            self._advance()

    def _atom(self, line: int, col: int) -> Datum:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _DELIMITERS:
            self._advance()
        token = self.text[start : self.pos]
        if token in ("#t", "#true"):
            return Datum(True, line, col)
        if token in ("#f", "#false"):
            return Datum(False, line, col)
        if token.startswith("#"):
            raise self.error(line, col, f"unsupported syntax `{token}'")
        number = _number(token)
        if number is not None:
            return Datum(number, line, col)
        return Datum(Symbol(token), line, col)


def _number(token: str) -> int | float | None:
    try:
        return int(token)
    except ValueError:
        pass
    if any(ch.isdigit() for ch in token) and all(ch in "0123456789.+-eE" for ch in token):
        try:
            return float(token)
        except ValueError:
            return None
    return None


# -- interpretation --------------------------------------------------------------------------

_STRING_FIELDS = {"name", "user", "host-key", "private-key", "compression", "daemon-socket",
                  "system"}  # fmt: skip
_INT_FIELDS = {"port", "parallel-builds", "compression-level"}
_LIST_FIELDS = {"systems", "features"}
_REQUIRED = ("name", "user", "host-key")


def _head(d: Datum) -> str | None:
    if isinstance(d.value, list) and d.value and isinstance(d.value[0].value, Symbol):
        return d.value[0].value.name
    return None


class _Interpreter:
    def __init__(self, reader: _Reader, warn: list[str]) -> None:
        self.r = reader
        self.warnings = warn

    def refuse(self, d: Datum, what: str) -> MachinesError:
        return self.r.error(d.line, d.col, what)

    def machines(self, d: Datum) -> list[BuildMachine]:
        head = _head(d)
        if (
            head == "quote"
            and isinstance(d.value, list)
            and d.value == [d.value[0], d.value[1]]
            and d.value[1].value == []
        ):
            return []
        if head != "list":
            raise self.refuse(d, self._not_data(d, "expected `(list (build-machine ...) ...)'"))
        return [self.machine(m) for m in d.value[1:]]  # type: ignore[index]

    def _not_data(self, d: Datum, expected: str) -> str:
        head = _head(d)
        if head is not None and head not in ("list", "build-machine", "quote"):
            return (
                f"`({head} ...)' is Scheme code, which is not supported here; "
                f"{expected} with literal values only"
            )
        return expected

    def machine(self, d: Datum) -> BuildMachine:
        if _head(d) != "build-machine":
            raise self.refuse(d, self._not_data(d, "expected `(build-machine (FIELD VALUE) ...)'"))
        values: dict[str, object] = {}
        for f in d.value[1:]:  # type: ignore[index]
            if (
                not isinstance(f.value, list)
                or len(f.value) != 2
                or not isinstance(f.value[0].value, Symbol)
            ):
                raise self.refuse(f, "build-machine: expected `(FIELD VALUE)'")
            name = f.value[0].value.name
            if name in values:
                raise self.refuse(f, f"build-machine: duplicate field initializer `{name}'")
            values[name] = self.field_value(name, f.value[1])
        missing = [n for n in _REQUIRED if n not in values]
        if "systems" not in values and "system" not in values:
            missing.append("systems")
        if missing:
            raise self.refuse(d, f"build-machine: missing field initializers ({' '.join(missing)})")
        location = f"{self.r.file}:{d.line}:{d.col}"
        if "system" in values:
            self.warnings.append(
                f"{location}: warning: The 'system' field is deprecated, please use 'systems' "
                "instead."
            )
        systems = values.get("systems") or [values["system"]]
        threshold = values.get("overload-threshold", 0.6)
        return BuildMachine(
            name=str(values["name"]),
            user=str(values["user"]),
            host_key=str(values["host-key"]),
            systems=list(systems),  # type: ignore[call-overload]
            port=int(values.get("port", 22)),  # type: ignore[call-overload]
            private_key=values.get("private-key"),  # type: ignore[arg-type]
            compression=str(values.get("compression", "zlib@openssh.com,zlib")),
            compression_level=int(values.get("compression-level", 3)),  # type: ignore[call-overload]
            daemon_socket=str(values.get("daemon-socket", DEFAULT_DAEMON_SOCKET)),
            overload_threshold=None if threshold is False else float(threshold),  # type: ignore[arg-type]
            parallel_builds=int(values.get("parallel-builds", 1)),  # type: ignore[call-overload]
            speed=float(values.get("speed", 1.0)),  # type: ignore[arg-type]
            features=list(values.get("features", [])),  # type: ignore[call-overload]
            location=location,
        )

    def field_value(self, name: str, v: Datum) -> object:
        if name in _STRING_FIELDS:
            if not isinstance(v.value, str):
                raise self.refuse(v, self._not_data(v, f"build-machine: `{name}' must be a string"))
            return v.value
        if name in _INT_FIELDS:
            if not isinstance(v.value, int) or isinstance(v.value, bool) or v.value < 0:
                raise self.refuse(
                    v, self._not_data(v, f"build-machine: `{name}' must be a non-negative integer")
                )
            return v.value
        if name == "speed":
            if not isinstance(v.value, int | float) or isinstance(v.value, bool):
                raise self.refuse(v, self._not_data(v, "build-machine: `speed' must be a number"))
            return float(v.value)
        if name == "overload-threshold":
            if v.value is False:
                return False
            if not isinstance(v.value, int | float) or isinstance(v.value, bool):
                raise self.refuse(
                    v,
                    self._not_data(v, "build-machine: `overload-threshold' must be a number or #f"),
                )
            return float(v.value)
        if name in _LIST_FIELDS:
            return self.strings(name, v)
        raise self.refuse(v, f"build-machine: extraneous field initializers ({name})")

    def strings(self, name: str, v: Datum) -> list[str]:
        head = _head(v)
        items: list[Datum]
        if head == "list":
            items = v.value[1:]  # type: ignore[index]
        elif head == "quote" and isinstance(v.value[1].value, list):  # type: ignore[index]
            items = v.value[1].value  # type: ignore[index]
        else:
            raise self.refuse(
                v, self._not_data(v, f"build-machine: `{name}' must be `(list \"...\" ...)'")
            )
        for item in items:
            if not isinstance(item.value, str):
                raise self.refuse(item, f"build-machine: `{name}' must be a list of strings")
        return [str(item.value) for item in items]


def parse_machines(
    text: str, file_name: str = "machines.scm", warnings: list[str] | None = None
) -> list[BuildMachine]:
    """The machines of a machines.scm text; raises MachinesError naming line and column."""
    reader = _Reader(text, file_name)
    interp = _Interpreter(reader, warnings if warnings is not None else [])
    result: list[BuildMachine] | None = None
    while not reader.at_end():
        d = reader.read()
        if _head(d) == "use-modules" and result is None:
            continue  # harmless: the file may import (gnu) etc.; nothing is evaluated
        if result is not None:
            raise reader.error(
                d.line, d.col, "only one expression, the list of machines, is allowed"
            )
        result = interp.machines(d)
    return result or []


def load_machines(
    file_name: str | None = None, warnings: list[str] | None = None
) -> list[BuildMachine]:
    """Upstream `build-machines`: a missing file is an empty list; other errors raise."""
    file_name = file_name or default_machines_file()
    try:
        with open(file_name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MachinesError(f"failed to open machine file '{file_name}': {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise MachinesError(f"failed to load machine file '{file_name}': {exc}") from None
    return parse_machines(text, file_name, warnings)
