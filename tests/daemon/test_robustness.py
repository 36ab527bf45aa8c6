"""Bad input ends one session with an error and never the daemon; nothing half-registered."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.protocol.ops import WORKER_MAGIC_1, Op, Stderr
from guixsvc.protocol.wire import encode_int, encode_string
from guixsvc.store import nar
from tests.conftest import (
    Daemon,
    launcher_env_flags,
    recv_exact,
    start_daemon,
    stop_daemon,
    store_env,
)


def raw_session(daemon: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.settimeout(10)
    s.sendall(encode_int(WORKER_MAGIC_1))
    assert len(recv_exact(s, 16)) == 16
    s.sendall(encode_int(0x163) + encode_int(0) + encode_int(0))
    assert int.from_bytes(recv_exact(s, 8), "little") == Stderr.LAST
    return s


def read_error(s: socket.socket) -> str:
    assert int.from_bytes(recv_exact(s, 8), "little") == Stderr.ERROR
    n = int.from_bytes(recv_exact(s, 8), "little")
    message = recv_exact(s, n + (-n) % 8)[:n].decode()
    assert int.from_bytes(recv_exact(s, 8), "little") == 1  # status
    return message


def assert_closed(s: socket.socket) -> None:
    assert s.recv(1) == b""


def still_serving(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.is_valid_path(c.add_text_to_store("alive", b"alive"))
    assert daemon.process.poll() is None


def no_leftovers(daemon: Daemon) -> None:
    names = [n for n in os.listdir(daemon.store_dir) if n not in (".links",)]
    with sqlite3.connect(daemon.db_path) as db:
        valid = {os.path.basename(r[0]) for r in db.execute("select path from ValidPaths")}
    assert [n for n in names if not n.endswith(".lock") and n not in valid] == []


def test_garbage_handshake(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.settimeout(10)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert_closed(s)
    still_serving(daemon)


def test_unknown_opcode_closes_the_session(daemon: Daemon) -> None:
    s = raw_session(daemon)
    s.sendall(encode_int(2))
    assert read_error(s) == "invalid operation 2"
    assert_closed(s)
    still_serving(daemon)


def test_path_outside_the_store(daemon: Daemon) -> None:
    s = raw_session(daemon)
    s.sendall(encode_int(Op.QUERY_PATH_INFO) + encode_string("/etc/passwd"))
    assert read_error(s) == "path `/etc/passwd' is not in the store"
    assert_closed(s)
    # IsValidPath checks inside work mode: the session survives (upstream behaviour).
    with daemon.client() as c:
        with pytest.raises(DaemonError, match="is not in the store"):
            c.is_valid_path("/etc/passwd")
        with pytest.raises(DaemonError, match="is not in the store"):
            c.is_valid_path(daemon.store_dir + "/../../etc/passwd")
        assert c.query_all_valid_paths() == []
    still_serving(daemon)


def test_truncated_nar_leaves_nothing(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big").write_bytes(os.urandom(300_000))
    archive = b"".join(nar.dump(str(tmp_path / "t")))
    s = raw_session(daemon)
    header = encode_int(Op.ADD_TO_STORE) + encode_string("t") + encode_int(1) + encode_int(1)
    s.sendall(header + encode_string("sha256") + archive[: len(archive) // 2])
    time.sleep(0.3)
    s.close()
    time.sleep(0.3)
    still_serving(daemon)
    no_leftovers(daemon)


def test_malformed_nar_is_an_error_and_closes(daemon: Daemon) -> None:
    s = raw_session(daemon)
    bad = encode_string("nix-archive-1") + encode_string("(") + encode_string("type")
    bad += encode_string("directory") + encode_string("entry") + encode_string("(")
    bad += encode_string("name") + encode_string("..") + encode_string("node")
    header = encode_int(Op.ADD_TO_STORE) + encode_string("t") + encode_int(1) + encode_int(1)
    s.sendall(header + encode_string("sha256") + bad)
    assert "invalid file name" in read_error(s)
    assert_closed(s)
    still_serving(daemon)
    no_leftovers(daemon)


def test_client_killed_during_import_leaves_nothing(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big").write_bytes(os.urandom(200_000))
    archive = b"".join(nar.dump(str(tmp_path / "t")))
    s = raw_session(daemon)
    s.sendall(encode_int(Op.IMPORT_PATHS))
    assert int.from_bytes(recv_exact(s, 8), "little") == Stderr.READ
    recv_exact(s, 8)
    s.sendall(encode_string(encode_int(1) + archive[:30_000]))
    time.sleep(0.2)
    s.close()
    time.sleep(0.3)
    still_serving(daemon)
    no_leftovers(daemon)


def _add_same(socket_path: str, n: int) -> str:
    with DaemonClient(socket_path) as c:
        return c.add_text_to_store("shared", b"same contents" * n)


def test_concurrent_clients_adding_the_same_item(daemon: Daemon) -> None:
    with multiprocessing.get_context("fork").Pool(8) as pool:
        results = pool.starmap(_add_same, [(daemon.socket, 1000)] * 16)
    assert len(set(results)) == 1
    with sqlite3.connect(daemon.db_path) as db:
        assert db.execute("select count(*) from ValidPaths").fetchone()[0] == 1
    no_leftovers(daemon)


def test_tcp_listener(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = start_daemon(tmp_path, f"--listen=127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                c = DaemonClient(f"guix://127.0.0.1:{port}")
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with c:
            p = c.add_text_to_store("over-tcp", b"tcp")
            assert c.is_valid_path(p)
            with pytest.raises(DaemonError, match="disabled for remote hosts"):
                c.collect_garbage(0)
    finally:
        stop_daemon(d)


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
def test_systemd_socket_activation(tmp_path: Path) -> None:
    env = store_env(tmp_path)
    sock = str(tmp_path / "activated.sock")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", sock, *launcher_env_flags(env),
         sys.executable, "-m", "guixsvc.daemon.cli", "--disable-chroot"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with DaemonClient(sock) as c:
            assert c.is_valid_path(c.add_text_to_store("activated", b"yes"))
        with DaemonClient(sock) as c:  # a second connection to the same daemon
            assert len(c.query_all_valid_paths()) == 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "socket-activated with 1 socket(s)" in out
    # The daemon never created its default socket: it used the inherited one.
    assert not os.path.exists(os.path.join(env["GUIX_STATE_DIRECTORY"], "daemon-socket"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_follow_the_main_process(tmp_path: Path) -> None:
    """However the main process dies, idle workers exit; a busy one finishes its session."""
    d = start_daemon(tmp_path)
    try:
        client = d.client()
        client.add_text_to_store("before", b"x")
        with open(f"/proc/{d.process.pid}/task/{d.process.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        assert len(workers) >= 2  # the busy one and at least one idle
        d.process.kill()
        d.process.wait()
        with client:
            time.sleep(0.5)
            assert client.is_valid_path(client.add_text_to_store("after", b"y"))
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, [p for p in workers if _alive(p)]
            time.sleep(0.05)
    finally:
        stop_daemon(d)
