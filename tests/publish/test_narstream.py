"""`guixsvc.publish.narstream`: the framing + file regions of an uncompressed NAR put together
are byte for byte `nar.dump`, and `send_file_region` delivers a region over a transport's
socket after what the transport had buffered (asyncio's loop and uvloop's when installed)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from guixsvc.publish.narstream import FileRegion, nar_parts, send_file_region
from guixsvc.store import nar


def _tree(root: Path) -> Path:
    top = root / "item"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "small").write_bytes(b"s" * 100)
    (top / "empty").write_bytes(b"")
    (top / "big").write_bytes(os.urandom(300_001))
    (top / "sub" / "exe").write_bytes(b"#!/bin/sh\n" + b"x" * 70_000)
    os.chmod(top / "sub" / "exe", 0o555)
    (top / "sub" / "deeper" / "edge").write_bytes(b"e" * (64 * 1024))
    (top / "sub" / "link").symlink_to("../big")
    return top


def _join(path: Path) -> tuple[bytes, int]:
    out = bytearray()
    regions = 0
    for part in nar_parts(str(path)):
        if isinstance(part, FileRegion):
            regions += 1
            out += os.pread(part.fd, part.size, 0)
        else:
            out += part
    return bytes(out), regions


@pytest.mark.parametrize("which", ["item", "item/big", "item/small", "item/sub/link"])
def test_parts_are_the_nar(tmp_path: Path, which: str) -> None:
    _tree(tmp_path)
    path = tmp_path / which
    data, regions = _join(path)
    assert data == b"".join(nar.dump(str(path)))
    assert regions == {"item": 2, "item/big": 1}.get(which, 0)


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop_kind", _loops())
def test_send_file_region_after_buffered_bytes(tmp_path: Path, loop_kind: str) -> None:
    blob = tmp_path / "blob"
    payload = os.urandom(3 << 20)  # far more than a socket buffer: EAGAIN happens
    blob.write_bytes(payload)
    head = b"H" * (1 << 20)  # more than the socket takes at once: the transport buffers

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        received = bytearray()

        async def read() -> None:
            while len(received) < len(head) + len(payload):
                chunk = await loop.sock_recv(peer, 1 << 16)
                assert chunk
                received.extend(chunk)

        reader = asyncio.ensure_future(read())
        transport.write(head)
        fd = os.open(blob, os.O_RDONLY)
        try:
            await send_file_region(transport, FileRegion(fd, len(payload), str(blob)))
        finally:
            os.close(fd)
        await asyncio.wait_for(reader, 60)
        transport.close()
        peer.close()
        return bytes(received)

    if loop_kind == "uvloop":
        import uvloop

        got = uvloop.run(main())
    else:
        got = asyncio.run(main())
    assert got == head + payload
