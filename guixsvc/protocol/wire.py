"""Primitive encoding of the worker protocol: 64-bit little-endian ints and padded strings.

Both ends of the protocol (our daemon and our client) and the NAR format share these encodings
(spec/worker-protocol.md §2).  Encoders are plain functions returning bytes; `WireReader` decodes
from a buffer that grows as data arrives and raises `Incomplete` when it runs dry, so callers can
retry a whole message once more bytes came in (the h11 style: no I/O here).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

_U64 = struct.Struct("<Q")
_PAD = b"\0" * 8

#: Largest string we accept from a peer.  Upstream has no limit below 4 GiB; a cap keeps a
#: hostile client from making a worker allocate unbounded memory.
MAX_STRING = 256 * 1024 * 1024


class ProtocolError(Exception):
    """Malformed data on the wire; the connection cannot go on after this."""


class Incomplete(Exception):
    """Not enough buffered bytes to decode the next value."""


def encode_int(value: int) -> bytes:
    return _U64.pack(value)


def encode_bool(value: bool) -> bytes:
    return _U64.pack(1 if value else 0)


def padding(length: int) -> bytes:
    return _PAD[: (-length) % 8]


def encode_string(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    n = len(value)
    return b"".join((_U64.pack(n), value, _PAD[: (-n) % 8]))


def encode_strings(values: Iterable[bytes | str]) -> bytes:
    items = list(values)
    return _U64.pack(len(items)) + b"".join(encode_string(v) for v in items)


def encode_pairs(pairs: Iterable[tuple[bytes | str, bytes | str]]) -> bytes:
    items = list(pairs)
    return _U64.pack(len(items)) + b"".join(encode_string(k) + encode_string(v) for k, v in items)


class WireReader:
    """A growing byte buffer with a read position.

    `mark()`/`rewind()` let a caller decode a whole message atomically: on `Incomplete` it rewinds
    and waits for more data.  `compact()` drops bytes already consumed.
    """

    __slots__ = ("_buf", "_mark", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._mark = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = self._mark = 0
        self._buf += data

    def available(self) -> int:
        return len(self._buf) - self._pos

    def mark(self) -> None:
        self._mark = self._pos

    def rewind(self) -> None:
        self._pos = self._mark

    def compact(self) -> None:
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = self._mark = 0

    def take(self, limit: int) -> bytes:
        """Remove and return up to `limit` raw bytes (for payloads with their own framing)."""
        end = min(len(self._buf), self._pos + limit)
        data = bytes(self._buf[self._pos : end])
        self._pos = end
        self.compact()
        return data

    def take_all(self) -> bytes:
        """Remove and return every buffered byte."""
        data = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = self._mark = 0
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the buffer (what a payload consumer did not use)."""
        if data:
            self._buf[: self._pos] = data
            self._pos = self._mark = 0

    def read_u64(self) -> int:
        pos = self._pos
        if len(self._buf) - pos < 8:
            raise Incomplete
        self._pos = pos + 8
        return _U64.unpack_from(self._buf, pos)[0]

    def read_int(self) -> int:
        value = self.read_u64()
        if value >> 32:
            raise ProtocolError("implementation cannot deal with > 32-bit integers")
        return value

    def read_bytes(self, limit: int = MAX_STRING) -> bytes:
        pos = self._pos
        buf = self._buf
        if len(buf) - pos < 8:
            raise Incomplete
        n = _U64.unpack_from(buf, pos)[0]
        if n >> 32:
            raise ProtocolError("implementation cannot deal with > 32-bit integers")
        if n > limit:
            raise ProtocolError("string is too long")
        padded = n + ((-n) % 8)
        if len(buf) - pos - 8 < padded:
            raise Incomplete
        start = pos + 8
        if padded != n and any(buf[start + n : start + padded]):
            raise ProtocolError("non-zero padding")
        self._pos = start + padded
        return bytes(buf[start : start + n])

    def read_string(self) -> str:
        return self.read_bytes().decode("utf-8", "surrogateescape")

    def read_strings(self) -> list[str]:
        count = self.read_int()
        return [self.read_string() for _ in range(count)]

    def read_pairs(self) -> list[tuple[str, str]]:
        count = self.read_int()
        return [(self.read_string(), self.read_string()) for _ in range(count)]
