"""Sending the big files of an uncompressed NAR with `sendfile`, so `guix publish` hands their
contents to the kernel instead of copying them through Python.

`guixsvc.store.nar.nar_parts` yields a NAR as framing bytes and `FileRegion`s (the tests check
that put together they are exactly `nar.dump`).  `send_file_region` writes a region to a socket
that belongs to an asyncio (or uvloop) transport: both loops lack a native `loop.sendfile` for
every case (uvloop has none), so it waits for writability on a duplicate of the socket's
descriptor.
"""

from __future__ import annotations

import asyncio
import os

from guixsvc.store import nar
from guixsvc.store.nar import FileRegion, nar_parts

__all__ = ["FileRegion", "nar_parts", "send_file_region"]


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
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
