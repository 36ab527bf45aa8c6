"""The in-memory narinfo answers of `guixsvc publish` (guixsvc.publish.memo) and its server
processes: a remembered narinfo is byte-identical to a freshly computed one, a path deleted by
the collector is a 404 at the next request, a path added after a 404 is served at the next
request, and `--workers=N` runs N processes that all serve and stop together."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.pki import keys
from guixsvc.protocol.ops import GCAction
from guixsvc.publish.memo import NarinfoMemo, item_signature
from guixsvc.store.paths import StoreDir
from tests.publish.test_publish import get
from tests.substitutes.helpers import Node, start_node, start_publish, stop_node, stop_proc

# -- the table alone ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memo_positive_entry_follows_the_item(tmp_path: Path) -> None:
    item = tmp_path / "store" / "aaaa-x"
    item.parent.mkdir()
    item.write_text("x")
    clock = Clock()
    memo = NarinfoMemo(str(tmp_path / "db"), clock=clock, positive_seconds=60)
    assert memo.get("aaaa") is None
    memo.put("aaaa", str(item), b"StorePath: x\n", item_signature(str(item)))
    assert memo.get("aaaa") == b"StorePath: x\n"
    # Deleted (the collector renames into trash): forgotten.
    item.rename(tmp_path / "trash")
    assert memo.get("aaaa") is None
    # Re-created with the same name: a new object, still forgotten.
    memo.put("aaaa", str(item), b"old\n", (0, 0, 0, 0))
    item.write_text("y")
    assert memo.get("aaaa") is None
    # And entries expire.
    memo.put("aaaa", str(item), b"new\n", item_signature(str(item)))
    assert memo.get("aaaa") == b"new\n"
    clock.now += 61
    assert memo.get("aaaa") is None
    # No signature (the item vanished before the daemon was asked): nothing remembered.
    memo.put("bbbb", str(tmp_path / "gone"), b"x\n", item_signature(str(tmp_path / "gone")))
    assert memo.get("bbbb") is None


def test_memo_negative_entry_follows_the_database(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    (db / "db.sqlite").write_bytes(b"0" * 100)
    (db / "db.sqlite-wal").write_bytes(b"")
    clock = Clock()
    memo = NarinfoMemo(str(db), clock=clock, negative_seconds=1)
    memo.put_missing("aaaa", memo.before_query())
    assert memo.get("aaaa") is NarinfoMemo.MISSING
    with open(db / "db.sqlite-wal", "ab") as f:  # a commit
        f.write(b"frame")
    assert memo.get("aaaa") is None
    memo.put_missing("aaaa", memo.before_query())
    assert memo.get("aaaa") is NarinfoMemo.MISSING
    clock.now += 1.5
    assert memo.get("aaaa") is None


def test_memo_is_bounded(tmp_path: Path) -> None:
    memo = NarinfoMemo(str(tmp_path), max_entries=3)
    sig = item_signature(str(tmp_path))
    for i in range(5):
        memo.put(f"h{i}", str(tmp_path), f"{i}\n".encode(), sig)
    assert [memo.get(f"h{i}") for i in range(5)] == [None, None, b"2\n", b"3\n", b"4\n"]


# -- through the server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("memo")
    n = start_node(base / "n", base / "n" / "store", None)
    try:
        keys.generate_key_files(str(n.conf))
        yield n
    finally:
        stop_node(n)


def _text_path(n: Node, name: str, text: str) -> str:
    store = StoreDir(str(n.store))
    return store.display(store.make_text_path(name, hashlib.sha256(text.encode()).digest()))


def test_remembered_narinfo_is_identical_deleted_path_is_404(node: Node) -> None:
    with node.client() as c:
        path = c.add_text_to_store("memo-del", "to be deleted", [])
    proc, url = start_publish(node, None, "-C", "zstd:3", "--workers=1", name="pub-del")
    try:
        hp = os.path.basename(path)[:32]
        first = get(f"{url}/{hp}.narinfo")
        assert first[0] == 200
        again = [get(f"{url}/{hp}.narinfo") for _ in range(3)]
        assert all(a[0] == 200 and a[2] == first[2] for a in again)
        assert all(a[1]["Content-Type"] == first[1]["Content-Type"] for a in again)
        # A second server computing it afresh gives the same bytes.
        proc2, url2 = start_publish(node, None, "-C", "zstd:3", "--workers=1", name="pub-del2")
        try:
            assert get(f"{url2}/{hp}.narinfo")[2] == first[2]
        finally:
            stop_proc(proc2)
        with node.client() as c:
            deleted, _ = c.collect_garbage(GCAction.DELETE_SPECIFIC, [path])
        assert deleted == [path] and not os.path.lexists(path)
        status, _, _ = get(f"{url}/{hp}.narinfo")
        assert status == 404
    finally:
        stop_proc(proc)


def test_new_path_is_served_right_after_a_404(node: Node) -> None:
    proc, url = start_publish(node, None, "-C", "zstd:3", "--workers=1", name="pub-new")
    try:
        path = _text_path(node, "memo-new", "appears later")
        hp = os.path.basename(path)[:32]
        for _ in range(3):  # remembered as missing
            assert get(f"{url}/{hp}.narinfo")[0] == 404
        with node.client() as c:
            assert c.add_text_to_store("memo-new", "appears later", []) == path
        status, _, body = get(f"{url}/{hp}.narinfo")
        assert status == 200 and body.startswith(f"StorePath: {path}\n".encode())
    finally:
        stop_proc(proc)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_worker_processes_serve_and_stop_together(node: Node) -> None:
    with node.client() as c:
        path = c.add_text_to_store("memo-workers", "served by all", [])
    proc, url = start_publish(node, None, "-C", "zstd:3", "--workers=3", name="pub-workers")
    try:
        expected = min(3, os.cpu_count() or 1)
        deadline = time.monotonic() + 20
        while len(children := _children(proc.pid)) < expected:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert len(children) == expected
        hp = os.path.basename(path)[:32]
        bodies = set()
        port = int(url.rsplit(":", 1)[1])
        for _ in range(20):  # separate connections, spread over the processes
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(f"GET /{hp}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                          .encode())  # fmt: skip
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            bodies.add(data.split(b"\r\n\r\n", 1)[1])
        assert len(bodies) == 1
        if expected > 1:
            # One process dies: the others are stopped and the service exits with an error.
            os.kill(children[-1], signal.SIGKILL)
            assert proc.wait(20) != 0
            for child in children:
                assert not os.path.exists(f"/proc/{child}") or _is_zombie(child)
    finally:
        stop_proc(proc)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_request_log_is_written_in_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several processes share stdout: each write() must be whole lines of at most PIPE_BUF."""
    from guixsvc.publish import metrics

    pieces: list[bytes] = []

    def fake_write(fd: int, data: memoryview) -> int:
        n = min(len(data), 3000)  # short writes happen too
        pieces.append(bytes(data[:n]))
        return n

    class Stream:
        def fileno(self) -> int:
            return 1

        def flush(self) -> None:
            pass

    monkeypatch.setattr(metrics.os, "write", fake_write)
    log = metrics.LineLog(Stream())
    lines = [f"GET /{'x' * (i % 700)}.narinfo\n" for i in range(400)]
    for line in lines:
        log.write(line)
    log.flush()
    assert b"".join(pieces) == "".join(lines).encode()
    assert all(len(p) <= 4096 for p in pieces)
    full = [p for p in pieces if len(p) < 3000]  # not cut short by the fake write
    assert full and all(p.endswith(b"\n") for p in full)
