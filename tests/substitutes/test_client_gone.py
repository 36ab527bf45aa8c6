"""`guixsvc publish` when a client goes away mid-download: a normal event, not a traceback.

Upstream's `guix substitute` reads a chunked NAR with Guile's chunked-input port, which leaves
the final CRLF unread; it then retries on a fresh connection and closes the old one, so the
server sees the client vanish while it finishes the response.  Clients that give up halfway
(Ctrl-C, timeouts) do the same.  Each such NAR logged "Cannot write to closing transport" with a
traceback.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.substitutes.helpers import Node, start_node, start_publish, stop_node


@pytest.fixture(scope="module", params=["streamed", "cached"])
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Node, str, str, bool]]:
    """A publish server streaming NARs made on the fly, or (--cache) sending baked ones with
    sendfile(2)."""
    from guixsvc.pki import keys

    cached = request.param == "cached"
    base = tmp_path_factory.mktemp("gone")
    n = start_node(base / "n", base / "n" / "store", None)
    try:
        keys.generate_key_files(str(n.conf))
        tree = base / "tree"
        tree.mkdir()
        (tree / "big").write_bytes(os.urandom(6_000_000))
        with n.client() as c:
            item = c.add_to_store("big", str(tree))
        cache = base / "cache"
        cache.mkdir()
        flags = ["-C", "gzip:1", *([f"--cache={cache}"] if cached else [])]
        _, url = start_publish(n, None, *flags)
        # Bake it: the first narinfo request starts the baking and answers 404.
        deadline = time.monotonic() + 60
        while True:
            s = _request(url, f"/{os.path.basename(item)[:32]}.narinfo")
            status = s.recv(65536)
            s.close()
            if status.startswith(b"HTTP/1.1 200"):
                break
            assert time.monotonic() < deadline, status[:200]
            time.sleep(0.2)
        yield n, url, item, cached
    finally:
        stop_node(n)


def _request(url: str, target: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return s


def _abort(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    s.close()


def _wait_quiet(log: Path, before: int) -> str:
    time.sleep(1.0)  # the server notices the reset on its next write
    return log.read_text(errors="replace")[before:]


@pytest.mark.parametrize("kind", ["gzip", "none"])
def test_client_gone_midway_is_no_traceback(node: tuple[Node, str, str, bool], kind: str) -> None:
    n, url, item, cached = node
    if kind == "none" and cached:
        pytest.skip("--cache serves only the baked compressions")
    log = n.root / "publish.log"
    before = len(log.read_text(errors="replace"))
    prefix = "/nar/" if kind == "none" else f"/nar/{kind}/"
    for _ in range(3):
        s = _request(url, prefix + os.path.basename(item))
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        _abort(s)
    new = _wait_quiet(log, before)
    assert "Traceback" not in new, new
    assert "Cannot write to closing transport" not in new, new
    # The server still serves.
    s = _request(url, "/nix-cache-info")
    try:
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
