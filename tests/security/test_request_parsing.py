"""Class 8: request decoding is linear in the request's size, and one request is bounded.

Decoding work is measured by counting the primitive reads the decoder performs (deterministic,
unlike CPU time on a shared machine): a request delivered in small packets must not be
re-decoded from its start at every packet.  Against the daemon, an unprivileged client sends
an 8 MiB string in 4 KiB packets and then trailing small packets, and the daemon answers;
oversized strings and requests are refused with an error, and the daemon serves on.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from guixsvc.protocol import server as proto_server
from guixsvc.protocol.client import DaemonClient
from guixsvc.protocol.ops import WORKER_MAGIC_1, Op, Stderr
from guixsvc.protocol.server import NEED_DATA, Request, ServerConnection
from guixsvc.protocol.wire import MAX_STRING, WireReader, encode_int, encode_string, encode_strings
from guixsvc.store.paths import StoreDir
from tests.conftest import Daemon, recv_exact
from tests.security.conftest import Attacker

HANDSHAKE = encode_int(WORKER_MAGIC_1) + encode_int(0x163) + encode_int(0) + encode_int(0)


class CountingReader(WireReader):
    """The real reader, counting its string reads and the bytes they copy out of the buffer
    (the decoding work; a string it remembers from an earlier attempt costs no copy)."""

    __slots__ = ("copied", "reads")

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.copied = 0

    def read_bytes(self, limit: int = MAX_STRING) -> bytes:
        self.reads += 1
        remembered = self._pos in self._memo  # decoded before: no copy, no padding check
        value = super().read_bytes(limit)
        if not remembered:
            self.copied += len(value)
        return value


def _feed(request: bytes, packet: int) -> tuple[Request, CountingReader]:
    conn = ServerConnection(StoreDir("/gnu/store"))
    reader = CountingReader()
    conn.reader = reader
    conn.receive_data(HANDSHAKE)
    conn.next_event()
    event: object = NEED_DATA
    for i in range(0, len(request), packet):
        conn.receive_data(request[i : i + packet])
        event = conn.next_event()
    assert isinstance(event, Request)
    return event, reader


def _paths(n: int) -> list[str]:
    return [f"/gnu/store/{'a' * 32}-item-{i}" for i in range(n)]


def test_list_decoding_is_linear() -> None:
    """QueryValidPaths with N paths in 4 KiB packets: about N string reads, not N²/packets."""
    for n in (2000, 8000):
        request = encode_int(Op.QUERY_VALID_PATHS) + encode_strings(_paths(n)) + encode_int(0)
        event, reader = _feed(request, 4096)
        assert len(event.args[0]) == n
        assert reader.reads <= n + len(request) // 4096 + 10, (n, reader.reads)


def test_long_string_is_copied_once() -> None:
    """AddTextToStore: an 8 MiB text, then the references in 16-byte packets."""
    text = b"t" * (8 << 20)
    request = (
        encode_int(Op.ADD_TEXT_TO_STORE)
        + encode_string("big")
        + encode_string(text)
        + encode_strings(_paths(200))
    )
    head = len(request) - 200 * 64 - 8
    conn = ServerConnection(StoreDir("/gnu/store"))
    reader = CountingReader()
    conn.reader = reader
    conn.receive_data(HANDSHAKE)
    conn.next_event()
    for i in range(0, head, 4096):
        conn.receive_data(request[i : min(i + 4096, head)])
        assert conn.next_event() is NEED_DATA
    event: object = NEED_DATA
    for i in range(head, len(request), 16):
        conn.receive_data(request[i : i + 16])
        event = conn.next_event()
    assert isinstance(event, Request)
    assert event.args[1] == text
    # The text is copied out of the buffer once, not once per trailing packet.
    assert reader.copied < 2 * len(text), reader.copied


def test_request_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proto_server, "MAX_REQUEST", 1 << 20)
    conn = ServerConnection(StoreDir("/gnu/store"))
    conn.receive_data(HANDSHAKE)
    conn.next_event()
    request = encode_int(Op.QUERY_VALID_PATHS) + encode_strings(_paths(40000)) + encode_int(0)
    with pytest.raises(proto_server.ProtocolError, match=r"request is too large"):
        for i in range(0, len(request), 65536):
            conn.receive_data(request[i : i + 65536])
            conn.next_event()


def _session(sock: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(60)
    s.sendall(HANDSHAKE)
    recv_exact(s, 16)
    assert int.from_bytes(recv_exact(s, 8), "little") == Stderr.LAST
    return s


def _big_text_in_packets(sock: str) -> tuple[str, float]:
    """Runs as the attacker: 8 MiB in 4 KiB packets, then the references in 16-byte packets."""
    text = b"x" * (8 << 20)
    request = (
        encode_int(Op.ADD_TEXT_TO_STORE)
        + encode_string("eight-mib")
        + encode_string(text)
        + encode_strings([])
    )
    s = _session(sock)
    start = time.monotonic()
    for i in range(0, len(request) - 16, 4096):
        s.sendall(request[i : min(i + 4096, len(request) - 16)])
    for i in range(len(request) - 16, len(request), 8):
        s.sendall(request[i : i + 8])
    code = int.from_bytes(recv_exact(s, 8), "little")
    assert code == Stderr.LAST, code
    n = int.from_bytes(recv_exact(s, 8), "little")
    path = recv_exact(s, n + (-n) % 8)[:n].decode()
    s.close()
    return path, time.monotonic() - start


def test_daemon_takes_big_text_in_small_packets(root_daemon: Daemon, attacker: Attacker) -> None:
    sock = root_daemon.socket
    path, _ = attacker.run(lambda: _big_text_in_packets(sock))
    with root_daemon.client() as c:
        assert c.is_valid_path(path)
        assert c.query_path_info(path).nar_hash.endswith(
            hashlib.sha256(
                b"".join(
                    [
                        encode_string(b"nix-archive-1"),
                        encode_string(b"("),
                        encode_string(b"type"),
                        encode_string(b"regular"),
                        encode_string(b"contents"),
                    ]
                )
                + encode_string(b"x" * (8 << 20))
                + encode_string(b")")
            ).hexdigest()
        )


def _oversized_string(sock: str) -> str:
    s = _session(sock)
    s.sendall(encode_int(Op.ADD_TEXT_TO_STORE) + encode_string("x") + encode_int(MAX_STRING + 1))
    code = int.from_bytes(recv_exact(s, 8), "little")
    assert code == Stderr.ERROR, code
    n = int.from_bytes(recv_exact(s, 8), "little")
    message = recv_exact(s, n + (-n) % 8)[:n].decode()
    s.close()
    return message


def test_oversized_string_refused(root_daemon: Daemon, attacker: Attacker) -> None:
    sock = root_daemon.socket
    assert attacker.run(lambda: _oversized_string(sock)) == "string is too long"
    with DaemonClient(root_daemon.socket) as c:
        assert c.add_text_to_store("still-alive", b"yes")
    assert root_daemon.process.poll() is None
