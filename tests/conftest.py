"""Shared fixtures: a real guix-daemon (ours) on a temporary store, driven over its socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient
from tests import hostguard

_HOST_STATE = pytest.StashKey[hostguard.Snapshot]()
_DECOY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Snapshot the host's Guix paths and point inherited store variables at a throw-away root."""
    config.stash[_HOST_STATE] = hostguard.snapshot()
    decoy = tempfile.mkdtemp(prefix="guixsvc-tests-decoy-")
    config.stash[_DECOY] = decoy
    os.environ.pop("GUIX_DAEMON_SOCKET", None)
    os.environ.update(
        NIX_STORE_DIR=os.path.join(decoy, "store"),
        GUIX_STATE_DIRECTORY=os.path.join(decoy, "state"),
        GUIX_DATABASE_DIRECTORY=os.path.join(decoy, "state", "db"),
        GUIX_LOG_DIRECTORY=os.path.join(decoy, "log"),
        GUIX_CONFIGURATION_DIRECTORY=os.path.join(decoy, "etc"),
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when any test changed the host's /gnu/store, /var/guix, /etc/guix or logs."""
    config = session.config
    if _HOST_STATE not in config.stash:
        return
    changed = hostguard.differences(config.stash[_HOST_STATE], hostguard.snapshot())
    shutil.rmtree(config.stash[_DECOY], ignore_errors=True)
    if changed:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        text = "the test run changed the host's Guix state:\n  " + "\n  ".join(changed)
        if reporter is not None:
            reporter.write_line(text, red=True, bold=True)
        else:
            sys.stderr.write(text + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def launcher_env_flags(env: dict[str, str], flag: str = "--setenv=") -> list[str]:
    """`--setenv=VAR=VALUE` for each store variable, PYTHONPATH and PATH: launchers drop them.

    systemd-socket-activate passes its child only HOME, TERM, PATH and LISTEN_*; without these the
    daemon would fall back to the host's /gnu/store and /var/guix."""
    names = (*hostguard.STORE_VARIABLES, "PYTHONPATH", "PATH")
    return [f"{flag}{name}={env[name]}" for name in names if name in env]


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
    """Wait until the daemon serves: it listens first, as upstream, and answers a handshake
    once the store is initialised (so a test may then touch the store directly)."""
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("daemon did not start:\n" + log.read_text())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(sock)
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.02)
            continue
        try:
            DaemonClient(sock).close()
            return
        except (OSError, EOFError):
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


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Up to `n` bytes from `s`: fewer only when the peer closed the connection."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
