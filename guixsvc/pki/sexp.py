"""S-expressions exactly as libgcrypt reads and writes them.

Guix keeps keys, signatures and the ACL as libgcrypt S-expressions: it parses them with
``gcry_sexp_new`` (one scanner for the canonical ``(3:abc)`` and the advanced
``(abc "text" #hex# |base64|)`` forms) and prints them with ``gcry_sexp_sprint`` in the
*advanced* format (Guile-Gcrypt's ``canonical-sexp->string``).  Other Guix installations compare
these texts structurally but hash and sign exact bytes, so this module reproduces libgcrypt's
scanner and printer, quirks included, without calling libgcrypt.

Representation: an atom is ``bytes`` (libgcrypt has no token/string distinction: every atom is
an octet string); a list is a ``tuple`` of elements.  Structural equality (what Guix's
``authorized-key?`` uses) is therefore plain ``==``.  The empty list ``()`` also stands for
libgcrypt's NULL S-expression (what parsing ``""`` or ``"()"`` yields).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TypeAlias

__all__ = [
    "MAX_DEPTH",
    "SExp",
    "SExpError",
    "find_token",
    "is_token",
    "nth",
    "nth_data",
    "parse",
    "to_advanced",
    "to_canonical",
]

SExp: TypeAlias = bytes | tuple["SExp", ...]

#: Deepest list nesting we accept.  libgcrypt has no limit, but nothing legitimate comes close
#: and a bound keeps hostile input (e.g. a signature sent by a daemon client) cheap to reject.
MAX_DEPTH = 256

# libgcrypt error codes (gpg-error numbering) and their gcry_strerror texts.
_ERR_INV_LEN_SPEC = 201
_ERR_STRING_TOO_LONG = 202
_ERR_UNMATCHED_PAREN = 203
_ERR_BAD_CHARACTER = 205
_ERR_BAD_QUOTATION = 206
_ERR_ZERO_PREFIX = 207
_ERR_NESTED_DH = 208
_ERR_UNMATCHED_DH = 209
_ERR_UNEXPECTED_PUNC = 210
_ERR_BAD_HEX_CHAR = 211
_ERR_ODD_HEX_NUMBERS = 212
_ERR_EINVAL = 32816  # GPG_ERR_EINVAL (system error code space)
_ERR_TOO_DEEP = -1  # ours

_MESSAGES = {
    _ERR_INV_LEN_SPEC: "Invalid length specifier in S-expression",
    _ERR_STRING_TOO_LONG: "String too long in S-expression",
    _ERR_UNMATCHED_PAREN: "Unmatched parentheses in S-expression",
    _ERR_BAD_CHARACTER: "Bad character in S-expression",
    _ERR_BAD_QUOTATION: "Bad quotation in S-expression",
    _ERR_ZERO_PREFIX: "Zero prefix in S-expression",
    _ERR_NESTED_DH: "Nested display hints in S-expression",
    _ERR_UNMATCHED_DH: "Unmatched display hints",
    _ERR_UNEXPECTED_PUNC: "Unexpected reserved punctuation in S-expression",
    _ERR_BAD_HEX_CHAR: "Bad hexadecimal character in S-expression",
    _ERR_ODD_HEX_NUMBERS: "Odd hexadecimal numbers in S-expression",
    _ERR_EINVAL: "Invalid argument",
    _ERR_TOO_DEEP: "S-expression nested too deeply",
}


class SExpError(ValueError):
    """A text libgcrypt would refuse.

    ``str()`` is libgcrypt's error string; ``source`` is what ``gcry_strsource`` says
    (upstream prints ``SOURCE: MESSAGE``, e.g. ``failed to read public key: gcrypt: ...``).
    """

    source = "gcrypt"

    def __init__(self, code: int, offset: int) -> None:
        super().__init__(_MESSAGES[code])
        self.code = code
        self.offset = offset


# Character classes of libgcrypt's scanner.  NUL counts as a token character there because
# the scanner tests membership with strchr(), which also finds the terminating NUL.
_TOKEN_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-./_:*+=\x00"
)
_WHITESPACE = frozenset(b" \t\v\f\r\n")
_DIGITS = frozenset(b"0123456789")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_OCT_DIGITS = frozenset(b"01234567")
_B64_VALUES = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_SIMPLE_ESCAPES = {
    ord("b"): 0x08,
    ord("t"): 0x09,
    ord("v"): 0x0B,
    ord("n"): 0x0A,
    ord("f"): 0x0C,
    ord("r"): 0x0D,
    ord('"'): 0x22,
    ord("'"): 0x27,
    ord("\\"): 0x5C,
}

_TOKEN_RUN = re.compile(rb"[A-Za-z0-9\-./_:*+=\x00]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_HEX_BODY = re.compile(rb"[0-9A-Fa-f \t\v\f\r\n]*")
_B64_BODY = re.compile(rb"[A-Za-z0-9+/=]*")
_QUOTED_PLAIN = re.compile(rb'[^"\\]*')
_NOT_WHITESPACE = re.compile(rb"[^ \t\v\f\r\n]")


def _unquote(buf: bytes, start: int) -> tuple[bytes, int] | None:
    """Scan a quoted string whose opening quote is at ``start``.

    Returns the decoded bytes and the index after the closing quote, or None when the buffer
    ends first (libgcrypt then silently drops the unfinished string).  Escapes are validated
    and decoded the way libgcrypt's scanner and ``unquote_string`` do.
    """
    out = bytearray()
    n = len(buf)
    i = start + 1
    while True:
        m = _QUOTED_PLAIN.match(buf, i)
        assert m is not None
        out += m.group()
        i = m.end()
        if i >= n:
            return None
        if buf[i] == 0x22:  # closing quote
            return bytes(out), i + 1
        # Backslash escape.
        i += 1
        if i >= n:
            return None
        c = buf[i]
        if c in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[c])
            i += 1
        elif c in _OCT_DIGITS:
            if not (i + 2 < n and buf[i + 1] in _OCT_DIGITS and buf[i + 2] in _OCT_DIGITS):
                raise SExpError(_ERR_BAD_QUOTATION, i)
            out.append(((c - 48) * 64 + (buf[i + 1] - 48) * 8 + (buf[i + 2] - 48)) & 0xFF)
            i += 3
        elif c == 0x78:  # \xHH
            if not (i + 2 < n and buf[i + 1] in _HEX_DIGITS and buf[i + 2] in _HEX_DIGITS):
                raise SExpError(_ERR_BAD_QUOTATION, i)
            out.append(int(buf[i + 1 : i + 3], 16))
            i += 3
        elif c == 0x0D:  # line continuation: \ CR [LF]
            i += 2 if i + 1 < n and buf[i + 1] == 0x0A else 1
        elif c == 0x0A:  # line continuation: \ LF [CR]
            i += 2 if i + 1 < n and buf[i + 1] == 0x0D else 1
        else:
            raise SExpError(_ERR_BAD_QUOTATION, i)


def _b64decode(chars: bytes) -> bytes:
    """Decode like libgpg-error's ``gpgrt_b64dec_proc``: stop at the first ``=``, flushing
    a pending partial byte only when exactly one character of the quantum was seen."""
    out = bytearray()
    state = 0
    val = 0
    for ch in chars:
        if ch == 0x3D:  # '='
            if state == 1:
                out.append(val)
            break
        c = _B64_VALUES[ch]
        if state == 0:
            val = (c << 2) & 0xFF
            state = 1
        elif state == 1:
            out.append(val | ((c >> 4) & 3))
            val = (c << 4) & 0xF0
            state = 2
        elif state == 2:
            out.append(val | ((c >> 2) & 15))
            val = (c << 6) & 0xC0
            state = 3
        else:
            out.append(val | (c & 0x3F))
            state = 0
    return bytes(out)


def parse(text: bytes | bytearray | memoryview | str) -> SExp:
    """Parse ``text`` the way ``gcry_sexp_new(..., autodetect=1)`` does.

    A ``str`` is taken as ISO-8859-1 (as Guile-Gcrypt passes strings to libgcrypt).  Canonical
    and advanced syntax may be mixed freely.  Returns the first top-level element; ``()`` when
    there is none (libgcrypt's NULL S-expression, e.g. for ``""``, ``"()"`` or a lone
    top-level token, which libgcrypt drops).  Raises :class:`SExpError` with libgcrypt's
    message for text libgcrypt refuses.
    """
    buf = text.encode("latin-1") if isinstance(text, str) else bytes(text)
    n = len(buf)
    stack: list[list[SExp]] = [[]]
    disphint = False
    i = 0
    while i < n:
        c = buf[i]
        if c == 0x28:  # (
            if disphint:
                raise SExpError(_ERR_UNMATCHED_DH, i)
            if len(stack) > MAX_DEPTH:
                raise SExpError(_ERR_TOO_DEEP, i)
            stack.append([])
            i += 1
        elif c == 0x29:  # )
            if disphint:
                raise SExpError(_ERR_UNMATCHED_DH, i)
            if len(stack) == 1:
                raise SExpError(_ERR_UNMATCHED_PAREN, i)
            done = tuple(stack.pop())
            stack[-1].append(done)
            i += 1
        elif c in _WHITESPACE:
            m = _NOT_WHITESPACE.search(buf, i)
            i = m.start() if m else n
        elif c in _DIGITS:
            if c == 0x30:
                raise SExpError(_ERR_ZERO_PREFIX, i)
            m = _DIGIT_RUN.match(buf, i)
            assert m is not None
            j = m.end()
            if j >= n:
                break  # unfinished length prefix at the end: ignored, as libgcrypt does
            d = buf[j]
            if d == 0x3A:  # ':' -- verbatim octets
                length = int(buf[i:j])
                if length > n - j - 1:
                    raise SExpError(_ERR_STRING_TOO_LONG, j)
                stack[-1].append(buf[j + 1 : j + 1 + length])
                i = j + 1 + length
            elif d in b'"#|':
                i = j  # the length before a string, hex or base64 atom is ignored
            else:
                raise SExpError(_ERR_INV_LEN_SPEC, j)
        elif c == 0x22:  # "
            res = _unquote(buf, i)
            if res is None:
                break
            stack[-1].append(res[0])
            i = res[1]
        elif c == 0x23:  # #hex#
            m = _HEX_BODY.match(buf, i + 1)
            assert m is not None
            j = m.end()
            if j >= n:
                break
            if buf[j] != 0x23:
                raise SExpError(_ERR_BAD_HEX_CHAR, j)
            digits = bytes(ch for ch in m.group() if ch not in _WHITESPACE)
            if len(digits) % 2:
                raise SExpError(_ERR_ODD_HEX_NUMBERS, j)
            stack[-1].append(bytes.fromhex(digits.decode("ascii")))
            i = j + 1
        elif c == 0x7C:  # |base64|
            m = _B64_BODY.match(buf, i + 1)
            assert m is not None
            j = m.end()
            if j >= n:
                break
            if buf[j] != 0x7C:
                raise SExpError(_ERR_BAD_CHARACTER, j)
            if j == i + 1:
                raise SExpError(_ERR_EINVAL, j)
            stack[-1].append(_b64decode(m.group()))
            i = j + 1
        elif c == 0x5B:  # [ display hint: libgcrypt keeps the hint's atoms as plain atoms
            if disphint:
                raise SExpError(_ERR_NESTED_DH, i)
            disphint = True
            i += 1
        elif c == 0x5D:  # ]
            if not disphint:
                raise SExpError(_ERR_UNMATCHED_DH, i)
            disphint = False
            i += 1
        elif c in _TOKEN_CHARS:
            m = _TOKEN_RUN.match(buf, i)
            assert m is not None
            j = m.end()
            if j >= n:
                break  # a token is only stored when a following character ends it
            stack[-1].append(buf[i:j])
            i = j
        elif c in b"{&\\":
            raise SExpError(_ERR_UNEXPECTED_PUNC, i)
        else:
            raise SExpError(_ERR_BAD_CHARACTER, i)
    if len(stack) > 1:
        raise SExpError(_ERR_UNMATCHED_PAREN, n)
    top = stack[0]
    return top[0] if top else ()


# --- printing -------------------------------------------------------------------------------

_OPEN = 0
_CLOSE = 1


def _events(sexp: SExp) -> list[int | bytes]:
    """Flatten ``sexp`` into libgcrypt's internal stream: _OPEN, _CLOSE or an atom."""
    if isinstance(sexp, bytes):
        return [sexp]
    if sexp == ():
        return []  # the NULL S-expression
    out: list[int | bytes] = []
    stack: list[Iterator[SExp]] = [iter((sexp,))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            if stack:
                out.append(_CLOSE)
        elif isinstance(item, bytes):
            out.append(item)
        else:
            if len(stack) > MAX_DEPTH + 1:
                raise SExpError(_ERR_TOO_DEEP, 0)
            out.append(_OPEN)
            stack.append(iter(item))
    return out


def to_canonical(sexp: SExp) -> bytes:
    """``gcry_sexp_sprint`` in GCRYSEXP_FMT_CANON: ``(4:data(4:hash...))``, no newline."""
    if sexp == ():
        return b"()"
    parts: list[bytes] = []
    for ev in _events(sexp):
        if ev == _OPEN:
            parts.append(b"(")
        elif ev == _CLOSE:
            parts.append(b")")
        else:
            assert isinstance(ev, bytes)
            parts.append(b"%d:" % len(ev))
            parts.append(ev)
    return b"".join(parts)


_TOKEN_OK = _TOKEN_CHARS
# Bytes that force hex output (control and C1 characters other than the escapable ones).
# NUL is absent on purpose: libgcrypt's strchr() test lets it through.
_BINARY = frozenset(set(range(0x01, 0x20)) - set(b"\b\t\v\n\f\r") | set(range(0x7F, 0xA1)))
_STRING_ESCAPES = {
    0x08: b"\\b",
    0x09: b"\\t",
    0x0B: b"\\v",
    0x0A: b"\\n",
    0x0C: b"\\f",
    0x0D: b"\\r",
    0x22: b'\\"',
    0x27: b"\\'",
    0x5C: b"\\\\",
}
_STRING_MAP = [
    _STRING_ESCAPES.get(b, b"\\x%02x" % b if b < 0x20 or 0x7F <= b <= 0xA0 else bytes((b,)))
    for b in range(256)
]
_DIGIT_START = frozenset(b"0123456789")


def _atom_advanced(atom: bytes) -> bytes:
    """Render one atom as libgcrypt's ``suitable_encoding`` decides: token, string or hex."""
    if not atom:
        return b'""'
    first = atom[0]
    if first & 0x80 or first == 0 or not _BINARY.isdisjoint(atom):
        return b"#" + atom.hex().upper().encode("ascii") + b"#"
    if first not in _DIGIT_START and _TOKEN_OK.issuperset(atom):
        return atom
    return b'"' + b"".join(_STRING_MAP[b] for b in atom) + b'"'


def to_advanced(sexp: SExp) -> bytes:
    """``gcry_sexp_sprint`` in GCRYSEXP_FMT_ADVANCED (Guile-Gcrypt's ``canonical-sexp->string``).

    Byte-for-byte libgcrypt's layout: a newline and ``depth`` spaces before every nested list,
    a space after every atom that is not last in its list, a newline plus indentation after a
    ``)`` that is followed by an atom, and a final newline.  Returns Latin-1 bytes (atoms may
    carry bytes 0xA1-0xFF verbatim inside quoted strings).
    """
    events = _events(sexp) if sexp != () else [_OPEN, _CLOSE]
    parts: list[bytes] = []
    indent = 0
    count = len(events)
    for idx, ev in enumerate(events):
        nxt = events[idx + 1] if idx + 1 < count else None
        if ev == _OPEN:
            if indent:
                parts.append(b"\n" + b" " * indent)
            parts.append(b"(")
            indent += 1
        elif ev == _CLOSE:
            parts.append(b")")
            indent -= 1
            if nxt is not None and nxt != _OPEN:
                parts.append(b"\n" + b" " * indent)
        else:
            assert isinstance(ev, bytes)
            parts.append(_atom_advanced(ev))
            if nxt != _CLOSE:
                parts.append(b" ")
    parts.append(b"\n")
    return b"".join(parts)


# --- navigation (libgcrypt's find_token / nth / nth_data) -----------------------------------


def find_token(sexp: SExp, token: bytes | str) -> tuple[SExp, ...] | None:
    """``gcry_sexp_find_token``: the first list, in pre-order (``sexp`` itself included), whose
    first element is the atom ``token``; None if there is none."""
    tok = token.encode("latin-1") if isinstance(token, str) else token
    if isinstance(sexp, bytes):
        return None
    stack: list[tuple[SExp, ...]] = [sexp]
    while stack:
        lst = stack.pop()
        if lst and lst[0] == tok:
            return lst
        stack.extend(item for item in reversed(lst) if isinstance(item, tuple))
    return None


def nth(sexp: SExp, index: int) -> tuple[SExp, ...] | None:
    """``gcry_sexp_nth``: element ``index`` of the list if it is itself a list, else None."""
    if isinstance(sexp, bytes) or not 0 <= index < len(sexp):
        return None
    item = sexp[index]
    return item if isinstance(item, tuple) else None


def nth_data(sexp: SExp, index: int) -> bytes | None:
    """``gcry_sexp_nth_data``: element ``index`` of the list if it is an atom, else None."""
    if isinstance(sexp, bytes):
        return sexp if index == 0 else None
    if not 0 <= index < len(sexp):
        return None
    item = sexp[index]
    return item if isinstance(item, bytes) else None


def is_token(atom: bytes) -> bool:
    """Guile-Gcrypt's ``token-string?``: would ``canonical-sexp->sexp`` make ``atom`` a symbol
    (non-empty, token characters only, not starting with a digit)?  ASCII letters only; Guile
    would also accept non-ASCII Latin-1 letters, which never occur in Guix keys."""
    return bool(atom) and atom[0] not in _DIGIT_START and (_TOKEN_OK - {0}).issuperset(atom)
