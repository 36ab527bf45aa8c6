"""Streaming compressors and decompressors for nars: none, gzip, lzip, zstd (and xz, bzip2 when
reading).

``guix publish`` compresses nars on the fly or into its cache; ``guix substitute`` (our daemon's
substituter) decompresses them while unpacking.  Both sides stream: each object takes chunks and
returns chunks, so a nar is never held whole in memory.  gzip is zlib's gzip container (what
guile-zlib writes), zstd is the ``zstandard`` binding, lzip is the PyPI ``lzip`` binding of
lzlib (the same library guile-lzlib uses).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Protocol

import zstandard

__all__ = [
    "Compressor",
    "Decompressor",
    "compressor",
    "decompressor",
    "lzip_available",
]


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    decompress = compress

    def flush(self) -> bytes:
        return b""


class _Gzip:
    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(max(0, min(level, 9)), zlib.DEFLATED, 31)

    def compress(self, data: bytes) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush()


class _GunzipMembers:
    """gzip decompression across concatenated members, rejecting trailing garbage."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(31)

    def decompress(self, data: bytes) -> bytes:
        out = [self._z.decompress(data)]
        while self._z.eof and self._z.unused_data:
            rest = self._z.unused_data
            self._z = zlib.decompressobj(31)
            out.append(self._z.decompress(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        tail = self._z.flush()
        if not self._z.eof:
            raise ValueError("truncated gzip stream")
        return tail


class _Zstd:
    def __init__(self, level: int) -> None:
        self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush()


class _Unzstd:
    def __init__(self) -> None:
        self._z = zstandard.ZstdDecompressor().decompressobj()
        self._done = False

    def decompress(self, data: bytes) -> bytes:
        out = [self._z.decompress(data)]
        while self._z.eof and self._z.unused_data:
            rest = self._z.unused_data
            self._z = zstandard.ZstdDecompressor().decompressobj()
            out.append(self._z.decompress(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        if not self._z.eof:
            raise ValueError("truncated zstd stream")
        return b""


def lzip_available() -> bool:
    try:
        import lzip  # noqa: F401
    except ImportError:
        return False
    return True


class _Lzip:
    def __init__(self, level: int) -> None:
        import lzip

        self._e = lzip.BufferEncoder(level=max(0, min(level, 9)))

    def compress(self, data: bytes) -> bytes:
        return self._e.compress(data)

    def flush(self) -> bytes:
        return self._e.finish()


class _Unlzip:
    def __init__(self) -> None:
        from lzip import lzip as impl

        self._d = impl.lzip_extension.Decoder(1)

    def decompress(self, data: bytes) -> bytes:
        return self._d.decompress(data)

    def flush(self) -> bytes:
        out, rest = self._d.finish()
        if rest:
            raise ValueError("truncated lzip stream")
        return out


class _Stdlib:
    def __init__(self, obj: lzma.LZMADecompressor | bz2.BZ2Decompressor) -> None:
        self._d = obj

    def decompress(self, data: bytes) -> bytes:
        return self._d.decompress(data)

    def flush(self) -> bytes:
        if not self._d.eof:
            raise ValueError("truncated compressed stream")
        return b""


def compressor(kind: str, level: int) -> Compressor:
    """A streaming compressor for ``kind`` (``none``, ``gzip``, ``lzip``, ``zstd``)."""
    if kind == "none" or level == 0:
        return _Identity()
    if kind == "gzip":
        return _Gzip(level)
    if kind == "zstd":
        return _Zstd(level)
    if kind == "lzip":
        return _Lzip(level)
    raise ValueError(f"{kind}: unsupported compression type")


def decompressor(kind: str) -> Decompressor:
    """A streaming decompressor for a narinfo ``Compression`` value."""
    if kind == "none":
        return _Identity()
    if kind == "gzip":
        return _GunzipMembers()
    if kind == "zstd":
        return _Unzstd()
    if kind == "lzip":
        return _Unlzip()
    if kind == "xz":
        return _Stdlib(lzma.LZMADecompressor())
    if kind == "bzip2":
        return _Stdlib(bz2.BZ2Decompressor())
    raise ValueError(f"{kind}: unsupported compression type")
