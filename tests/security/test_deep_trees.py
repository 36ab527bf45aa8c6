"""Class 6: deep trees.  An ordinary user sends archives of thousands of nested directories.

Within the documented bound (`nar.MAX_NAR_DEPTH`) they are imported, hashed, exported and
collected like any item, although their file names are far longer than PATH_MAX; beyond it
they are refused with an error.  Either way no staging entry or `.lock` stays in the store,
the daemon lives on, and `guix gc` keeps working for everybody.  A daemon restarted after a
worker crashed mid-import sweeps what it left.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient
from guixsvc.protocol.ops import WORKER_MAGIC_1, GCAction, Op, Stderr
from guixsvc.protocol.wire import encode_int, encode_string
from guixsvc.store import nar
from guixsvc.store.safefs import walk
from tests.conftest import Daemon, recv_exact, start_daemon, stop_daemon
from tests.security.conftest import Attacker, snapshot, store_junk


def deep_nar(depth: int, name: bytes = b"d") -> bytes:
    """A NAR of `depth` nested directories with a file at the bottom."""
    out = bytearray(nar._HEADER)
    for _ in range(depth):
        out += nar._DIRECTORY + nar._ENTRY + nar._str(name) + nar._NODE
    out += nar._REGULAR + nar._CONTENTS + (3).to_bytes(8, "little") + b"end" + bytes(5)
    out += nar._CLOSE + nar._CLOSE2 * depth
    return bytes(out)


def _chunks(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _add(sock: str, name: str, data: bytes) -> str:
    with DaemonClient(sock) as c:
        return c.add_nar_to_store(name, _chunks(data))


def _gc(daemon: Daemon) -> list[str]:
    with daemon.client() as c:
        deleted, _ = c.collect_garbage(GCAction.DELETE_DEAD)
    return deleted


@pytest.mark.parametrize("depth", [3000, 5000])
def test_deep_archive_round_trip(root_daemon: Daemon, attacker: Attacker, depth: int) -> None:
    data = deep_nar(depth)
    sock = root_daemon.socket
    path = attacker.run(lambda: _add(sock, f"deep-{depth}", data))
    with root_daemon.client() as c:
        assert c.is_valid_path(path)
        info = c.query_path_info(path)
        assert info.nar_size == len(data)
        exported = c.export_path(path, sign=False)
    assert data in exported
    assert max(node.depth for node in walk(path)) == depth
    assert store_junk(root_daemon.store_dir) == []
    assert path in _gc(root_daemon)  # the session ended: nothing keeps it
    assert not os.path.lexists(path)
    assert store_junk(root_daemon.store_dir) == []
    _gc(root_daemon)  # and the collector still works afterwards
    assert root_daemon.process.poll() is None


def _raw_add(sock: str, name: str, data: bytes, cut: int | None) -> str:
    """AddToStore by hand; with `cut`, hang up after that many NAR bytes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(60)
    s.sendall(encode_int(WORKER_MAGIC_1))
    recv_exact(s, 16)
    s.sendall(encode_int(0x163) + encode_int(0) + encode_int(0))
    assert int.from_bytes(recv_exact(s, 8), "little") == Stderr.LAST
    s.sendall(
        encode_int(Op.ADD_TO_STORE)
        + encode_string(name)
        + encode_int(1)
        + encode_int(1)
        + encode_string("sha256")
    )
    with contextlib.suppress(OSError):  # the daemon may stop reading at the error
        s.sendall(data if cut is None else data[:cut])
    if cut is not None:
        s.close()
        return ""
    code = int.from_bytes(recv_exact(s, 8), "little")
    assert code == Stderr.ERROR, code
    n = int.from_bytes(recv_exact(s, 8), "little")
    message = recv_exact(s, n + (-n) % 8)[:n].decode()
    s.close()
    return message


def test_too_deep_archive_refused_cleanly(root_daemon: Daemon, attacker: Attacker) -> None:
    data = deep_nar(nar.MAX_NAR_DEPTH + 1)
    sock = root_daemon.socket
    message = attacker.run(lambda: _raw_add(sock, "too-deep", data, None))
    assert message == f"bad archive: directory tree deeper than {nar.MAX_NAR_DEPTH} levels"
    with root_daemon.client() as c:
        assert c.add_text_to_store("alive", b"yes")
    assert store_junk(root_daemon.store_dir) == []
    _gc(root_daemon)
    assert root_daemon.process.poll() is None


def test_long_names_bounded(root_daemon: Daemon, attacker: Attacker) -> None:
    """Long names make the quadratic case (path length times depth): bounded by MAX_NAR_PATH."""
    data = deep_nar(1000, b"n" * 200)  # 201 * 1000 characters > MAX_NAR_PATH
    sock = root_daemon.socket
    message = attacker.run(lambda: _raw_add(sock, "long-names", data, None))
    assert message == f"bad archive: file name longer than {nar.MAX_NAR_PATH} bytes"
    assert store_junk(root_daemon.store_dir) == []


def test_client_hangs_up_mid_deep_archive(root_daemon: Daemon, attacker: Attacker) -> None:
    data = deep_nar(5000)
    sock = root_daemon.socket
    attacker.run(lambda: _raw_add(sock, "cut", data, len(data) // 2))
    # The worker notices the hang-up, removes its staging tree and serves the next client.
    with root_daemon.client() as c:
        c.add_text_to_store("after-cut", b"ok")
    deadline = time.monotonic() + 60  # the worker may still be restoring what it received
    while store_junk(root_daemon.store_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store_junk(root_daemon.store_dir) == []
    _gc(root_daemon)


def test_restart_sweeps_what_crashed_workers_left(
    sec_root: Path, attacker: Attacker, outside: Path
) -> None:
    """Junk a crashed worker leaves (a deep staging tree, the `.lock` of a path it was
    installing, a chroot) and a lock file the attacker planted are gone after a restart."""
    d = start_daemon(sec_root, f"--build-users-group={attacker.group}")
    with d.client() as c:
        c.query_all_valid_paths()
    stop_daemon(d)
    store = d.store_dir
    staged = f"{store}/nix-{2**22 + 12345}-0"  # a pid that does not run
    with nar.RestoreSink(staged) as sink:
        parser = nar.NarParser(sink)
        parser.feed(deep_nar(3000))
    os.chmod(staged, 0o555)
    Path(f"{store}/{'a' * 32}-crashed.lock").write_bytes(b"")
    os.makedirs(f"{store}/{'b' * 32}-crashed.drv.chroot/tmp")
    planted = f"{store}/{'c' * 32}-x.lock"
    attacker.run(lambda: os.symlink(outside / "victim", planted))
    before = snapshot(outside)
    d = start_daemon(sec_root, f"--build-users-group={attacker.group}")
    try:
        with d.client() as c:
            c.query_all_valid_paths()
        assert store_junk(store) == []
        assert snapshot(outside) == before
    finally:
        stop_daemon(d)


def test_deep_archive_refused_error_is_upstream_style() -> None:
    with pytest.raises(nar.NarError, match=r"^bad archive: directory tree deeper than"):
        nar.NarParser(nar.NullSink()).feed(deep_nar(nar.MAX_NAR_DEPTH + 1))
