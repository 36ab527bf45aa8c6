"""Two stores at one path: node A (daemon + `guixsvc publish`) lives in a private mount
namespace where A's store directory is bind-mounted over the shared path; node B's daemon runs
on the real directory.  Substitutes need both sides to have the same store directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient
from guixsvc.store.safefs import remove_tree

ROOT = Path(__file__).resolve().parents[2]


def need_unshare() -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) (Debian package util-linux)")
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make mount namespaces: {probe.stderr.decode().strip()}")


@dataclass
class Node:
    root: Path
    store: Path
    env: dict[str, str]
    socket: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self) -> DaemonClient:
        return DaemonClient(self.socket)

    @property
    def conf(self) -> Path:
        return Path(self.env["GUIX_CONFIGURATION_DIRECTORY"])

    def log(self, name: str = "daemon") -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


def node_env(root: Path, store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        NIX_STORE_DIR=str(store),
        GUIX_STATE_DIRECTORY=str(root / "state"),
        GUIX_DATABASE_DIRECTORY=str(root / "state" / "db"),
        GUIX_LOG_DIRECTORY=str(root / "log"),
        GUIX_CONFIGURATION_DIRECTORY=str(root / "etc"),
        PYTHONPATH=str(ROOT),
    )
    env.pop("XDG_CACHE_HOME", None)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    return env


def _wrap(real_store: Path | None, shared: Path, argv: list[str]) -> list[str]:
    if real_store is None:
        return argv
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
            str(real_store), str(shared), *argv]  # fmt: skip


def spawn(
    node: Node, name: str, argv: list[str], real_store: Path | None
) -> subprocess.Popen[bytes]:
    log = open(node.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        _wrap(real_store, node.store, argv), env=node.env, stdout=log, stderr=subprocess.STDOUT
    )
    node.procs.append(proc)
    return proc


def start_node(
    root: Path,
    shared: Path,
    real_store: Path | None,
    *flags: str,
    daemon: Sequence[str] = (sys.executable, "-m", "guixsvc.daemon.cli"),
) -> Node:
    """A daemon (ours, or the command `daemon`) whose store directory is `shared`; with
    `real_store`, backed by that directory in a private mount namespace."""
    root.mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)
    if real_store is not None:
        real_store.mkdir(parents=True, exist_ok=True)
    env = node_env(root, shared)
    sock = str(root / "daemon.sock")
    node = Node(root, shared, env, sock)
    proc = spawn(
        node, "daemon",
        [*daemon, f"--listen={sock}", "--disable-chroot", *flags],
        real_store,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:  # until it serves (it listens before the store is initialised, as upstream)
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(node)
            raise RuntimeError("daemon did not start:\n" + node.log())
        try:
            DaemonClient(sock).close()
            return node
        except (OSError, EOFError):
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("publish did not start:\n" + log.read_text(errors="replace"))
        time.sleep(0.05)


def start_publish(
    node: Node, real_store: Path | None, *flags: str, name: str = "publish"
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    node.env["GUIX_DAEMON_SOCKET"] = node.socket
    proc = spawn(
        node, name,
        [sys.executable, "-m", "guixsvc.cli", "publish", "--listen=127.0.0.1", f"--port={port}",
         *flags],
        real_store,
    )  # fmt: skip
    wait_port(port, proc, node.root / f"{name}.log")
    return proc, f"http://127.0.0.1:{port}"


def stop_proc(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_node(node: Node) -> None:
    for proc in reversed(node.procs):
        stop_proc(proc)


def wipe_store(shared: Path) -> None:
    """Empty the shared directory (B's store) between B nodes."""
    if shared.exists():
        for entry in os.listdir(shared):
            remove_tree(str(shared / entry))
