"""An uncompressed NAR as framing bytes and file regions, so `guix publish` can hand large file
contents to the kernel with `sendfile` instead of copying them through Python.

`nar_parts` yields exactly the bytes of `guixsvc.store.nar.dump` (the tests compare them),
except that the contents of each regular file above `_SMALL_FILE` come as a `FileRegion` whose
descriptor stays open until the generator is resumed.  The walk is `nar.dump`'s: relative to
directory descriptors, never following symlinks, and a file replaced during the walk is an
error.  `send_file_region` writes a region to a socket that belongs to an asyncio (or uvloop)
transport: both loops lack a native `loop.sendfile` for every case (uvloop has none), so it
waits for writability on a duplicate of the socket's descriptor.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from guixsvc.store import nar
from guixsvc.store.nar import (  # the NAR tokens, shared with the writer
    _CLOSE,
    _CLOSE2,
    _CONTENTS,
    _DIRECTORY,
    _ENTRY,
    _EXECUTABLE,
    _FLUSH,
    _HEADER,
    _NODE,
    _REGULAR,
    _SMALL_FILE,
    _SYMLINK,
    _ZEROS,
    _pad_len,
    _read_exactly,
    _str,
)
from guixsvc.store.safefs import ENTER, LEAVE, TreeChanged, open_nofollow, walk


@dataclass(frozen=True)
class FileRegion:
    """`size` bytes of the open file `fd` from `offset` (closed by whoever opened it)."""

    fd: int
    size: int
    path: str
    offset: int = 0


def nar_parts(path: str) -> Iterator[bytes | FileRegion]:
    """The NAR of `path`: bytes for the structure and small files, regions for big files."""
    buf = bytearray(_HEADER)
    for node in walk(os.fsdecode(path), sort=True):
        kind, depth = node.kind, node.depth
        if kind == LEAVE:
            buf += _CLOSE2 if depth else _CLOSE
            if len(buf) >= _FLUSH:
                yield bytes(buf)
                buf.clear()
            continue
        if depth:
            buf += _ENTRY
            buf += _str(os.fsencode(node.name))
            buf += _NODE
        st = node.st
        mode = st.st_mode
        if kind == ENTER:
            buf += _DIRECTORY
        elif stat.S_ISREG(mode):
            size = st.st_size
            buf += _REGULAR
            if mode & stat.S_IXUSR:
                buf += _EXECUTABLE
            buf += _CONTENTS
            buf += size.to_bytes(8, "little")
            if size:
                fd = open_nofollow(node.name, node.parent_fd)
                try:
                    fst = os.fstat(fd)
                    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_size != size:
                        raise TreeChanged(node.path)
                    if size <= _SMALL_FILE:
                        for chunk in _read_exactly(fd, size, os.fsencode(node.path)):
                            buf += chunk
                    else:
                        yield bytes(buf)
                        buf.clear()
                        yield FileRegion(fd, size, node.path)
                finally:
                    os.close(fd)
                buf += _ZEROS[: _pad_len(size)]
            buf += _CLOSE2 if depth else _CLOSE
        elif stat.S_ISLNK(mode):
            buf += _SYMLINK
            buf += _str(os.readlink(os.fsencode(node.name), dir_fd=node.parent_fd))
            buf += _CLOSE2 if depth else _CLOSE
        else:
            raise nar.NarError(f"file `{node.path}' has an unsupported type")
        if len(buf) >= _FLUSH:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut = loop.create_future()
    loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def send_file_region(transport: asyncio.WriteTransport, region: FileRegion) -> None:
    """Send `region` on `transport`'s socket with `os.sendfile`, after what the transport has
    buffered.  Raises ConnectionError when the peer is gone, nar.NarError when the file
    shrank."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    loop = asyncio.get_running_loop()
    fd = os.dup(sock.fileno())
    try:
        while transport.get_write_buffer_size():  # let the transport flush the framing first
            await _writable(loop, fd)
            await asyncio.sleep(0)
            if transport.is_closing():
                raise ConnectionResetError("connection lost")
        offset, end = region.offset, region.offset + region.size
        while offset < end:
            try:
                n = os.sendfile(fd, region.fd, offset, end - offset)
            except BlockingIOError:
                await _writable(loop, fd)
                continue
            if n == 0:
                raise nar.NarError(f"unexpected end-of-file reading `{region.path}'")
            offset += n
    finally:
        os.close(fd)
