"""Shared fixtures: a real guix-daemon (ours) on a temporary store, driven over its socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient


@dataclass
class Daemon:
    root: Path
    socket: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    @property
    def store_dir(self) -> str:
        return self.env["NIX_STORE_DIR"]

    @property
    def state_dir(self) -> str:
        return self.env["GUIX_STATE_DIRECTORY"]

    @property
    def conf_dir(self) -> str:
        return self.env["GUIX_CONFIGURATION_DIRECTORY"]

    @property
    def db_path(self) -> str:
        return os.path.join(self.env["GUIX_DATABASE_DIRECTORY"], "db.sqlite")

    def client(self, **kwargs: object) -> DaemonClient:
        return DaemonClient(self.socket, **kwargs)  # type: ignore[arg-type]

    def stderr(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")


def store_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        NIX_STORE_DIR=str(root / "store"),
        GUIX_STATE_DIRECTORY=str(root / "state"),
        GUIX_DATABASE_DIRECTORY=str(root / "state" / "db"),
        GUIX_LOG_DIRECTORY=str(root / "log"),
        GUIX_CONFIGURATION_DIRECTORY=str(root / "etc"),
    )
    (root / "etc").mkdir(parents=True, exist_ok=True)
    return env


def start_daemon(root: Path, *extra: str) -> Daemon:
    env = store_env(root)
    sock = str(root / "daemon.sock")
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guixsvc.daemon.cli",
            f"--listen={sock}",
            "--disable-chroot",
            *extra,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for_socket(sock, proc, root / "daemon.log")
    return Daemon(root, sock, env, proc)


def wait_for_socket(sock: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the daemon accepts connections (the file exists from bind(), before listen())."""
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("daemon did not start:\n" + log.read_text())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(sock)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.02)


def stop_daemon(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(10)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)
        assert d.process.returncode == 0, d.stderr()
