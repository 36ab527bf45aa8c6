"""Primitive encoding of the worker protocol: 64-bit little-endian ints and padded strings.

Both ends of the protocol (our daemon and our client) and the NAR format share these encodings
(spec/worker-protocol.md §2).  Encoders are plain functions returning bytes; `WireReader` decodes
from a buffer that grows as data arrives and raises `Incomplete` when it runs dry, so callers can
retry a whole message once more bytes came in (the h11 style: no I/O here).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

_U64 = struct.Struct("<Q")
_PAD = b"\0" * 8

#: Largest string we accept from a peer.  Upstream has no limit below 4 GiB; a cap keeps a
#: hostile client from making a worker allocate unbounded memory.
MAX_STRING = 256 * 1024 * 1024

#: Largest request (opcode and arguments, not the NAR payloads that follow some requests) the
#: daemon buffers: one string of MAX_STRING bytes plus room for the other fields.  Upstream
#: reads requests field by field without a total bound; a worker buffering more than this is
#: under attack, not serving a client.
MAX_REQUEST = MAX_STRING + 1024 * 1024

# Strings at least this long are decoded once and remembered by position (see WireReader).
_MEMO_MIN = 4096


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

    Re-decoding a message from its start each time a packet arrives must not cost the size of
    what was already buffered, or one client can make a worker spend seconds of CPU per
    megabyte (issue 12).  Two things keep the total work linear in the message size:

    - `need`: after `Incomplete`, the buffer length below which decoding cannot get further
      (the failing primitive's exact size); `ready()` is False until that much arrived;
    - a memo of decoded values by buffer position: long strings (so they are copied and
      checked once) and lists, including a partially decoded list's items, so a re-decode
      resumes a list where it stopped instead of at its first item.  The memo is dropped
      whenever positions change (`compact`, `take`, `unread`, a buffer reset).
    """

    __slots__ = ("_buf", "_lists", "_mark", "_memo", "_pos", "need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._mark = 0
        self._memo: dict[int, tuple[object, int]] = {}
        self._lists: dict[int, tuple[list[object], int, int]] = {}
        self.need = 0

    def _forget(self) -> None:
        if self._memo:
            self._memo.clear()
        if self._lists:
            self._lists.clear()
        self.need = 0

    def _incomplete(self, need: int) -> Incomplete:
        self.need = need
        return Incomplete()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = self._mark = 0
            self._forget()
        self._buf += data

    def available(self) -> int:
        return len(self._buf) - self._pos

    def pending(self) -> int:
        """Bytes buffered since the mark (the size of the message being decoded, so far)."""
        return len(self._buf) - self._mark

    def ready(self) -> bool:
        """False while the last `Incomplete` certainly still holds (not enough new bytes)."""
        return len(self._buf) >= self.need

    def mark(self) -> None:
        self._mark = self._pos

    def rewind(self) -> None:
        self._pos = self._mark

    def compact(self) -> None:
        self._forget()
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._mark = self._pos

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
        self._forget()
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the buffer (what a payload consumer did not use)."""
        if data:
            self._buf[: self._pos] = data
            self._pos = self._mark = 0
            self._forget()

    def read_u64(self) -> int:
        pos = self._pos
        if len(self._buf) - pos < 8:
            raise self._incomplete(pos + 8)
        self._pos = pos + 8
        return _U64.unpack_from(self._buf, pos)[0]

    def read_int(self) -> int:
        value = self.read_u64()
        if value >> 32:
            raise ProtocolError("implementation cannot deal with > 32-bit integers")
        return value

    def read_bytes(self, limit: int = MAX_STRING) -> bytes:
        pos = self._pos
        hit = self._memo.get(pos)
        if hit is not None:
            value, end = hit
            assert isinstance(value, bytes)
            if len(value) <= limit:
                self._pos = end
                return value
        buf = self._buf
        if len(buf) - pos < 8:
            raise self._incomplete(pos + 8)
        n = _U64.unpack_from(buf, pos)[0]
        if n >> 32:
            raise ProtocolError("implementation cannot deal with > 32-bit integers")
        if n > limit:
            raise ProtocolError("string is too long")
        padded = n + ((-n) % 8)
        start = pos + 8
        if len(buf) - start < padded:
            raise self._incomplete(start + padded)
        if padded != n and any(buf[start + n : start + padded]):
            raise ProtocolError("non-zero padding")
        self._pos = start + padded
        value = bytes(buf[start : start + n])
        if n >= _MEMO_MIN:
            self._memo[pos] = (value, self._pos)
        return value

    def read_string(self) -> str:
        return self.read_bytes().decode("utf-8", "surrogateescape")

    def read_list(self, item: Callable[[WireReader], T]) -> list[T]:
        """A count, then that many items decoded by `item`; resumable across `Incomplete`."""
        start = self._pos
        hit = self._memo.get(start)
        if hit is not None:
            self._pos = hit[1]
            return hit[0]  # type: ignore[return-value]
        partial = self._lists.pop(start, None)
        if partial is not None:
            items, count, self._pos = partial
        else:
            count = self.read_int()
            items = []
        while len(items) < count:
            before = self._pos
            try:
                items.append(item(self))
            except Incomplete:
                self._lists[start] = (items, count, before)
                raise
        self._memo[start] = (items, self._pos)
        return items  # type: ignore[return-value]

    def read_strings(self) -> list[str]:
        return self.read_list(WireReader.read_string)

    def read_pairs(self) -> list[tuple[str, str]]:
        return self.read_list(_read_pair)


def _read_pair(reader: WireReader) -> tuple[str, str]:
    return reader.read_string(), reader.read_string()
