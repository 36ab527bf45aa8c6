"""The embedded default: guix-daemon and guix publish on a self-contained local store, no root.

`make run` (README.md) starts this: it lays out a store, state, log and configuration directory
under one root, points upstream's environment variables at them, generates a signing key on
first use, and runs guix-daemon (socket `<root>/daemon.sock`) and guix publish (loopback, port
8080 unless `--port`/`make run PORT=N`) until interrupted.  Once both answer it prints the exact
shell lines that put the tools on PATH and point a client at them.  A port that is taken, or a
daemon already serving the same root, is reported in one line before anything starts.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

PROG = "guixsvc"

#: The variables a client needs, in the order they are printed.
CLIENT_VARIABLES = (
    "GUIX_DAEMON_SOCKET",
    "NIX_STORE_DIR",
    "GUIX_STATE_DIRECTORY",
    "GUIX_DATABASE_DIRECTORY",
    "GUIX_LOG_DIRECTORY",
    "GUIX_CONFIGURATION_DIRECTORY",
)


def local_environment(root: str) -> dict[str, str]:
    root = os.path.abspath(root)
    env = dict(os.environ)
    env.update(
        NIX_STORE_DIR=os.path.join(root, "store"),
        GUIX_STATE_DIRECTORY=os.path.join(root, "state"),
        GUIX_DATABASE_DIRECTORY=os.path.join(root, "state", "db"),
        GUIX_LOG_DIRECTORY=os.path.join(root, "log"),
        GUIX_CONFIGURATION_DIRECTORY=os.path.join(root, "etc"),
        GUIX_DAEMON_SOCKET=os.path.join(root, "daemon.sock"),
    )
    return env


def port_problem(port: int, host: str = "127.0.0.1") -> str | None:
    """Why guix publish could not listen on `host:port`, or None.  Binds the way publish does
    (SO_REUSEADDR), so a port only in TIME_WAIT is not reported."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OverflowError:
            return f"port {port} is out of range (1-65535)"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is taken; try make run PORT={free_port_after(port, host)}"
            return f"cannot listen on port {port}: {exc.strerror}"
    return None


def free_port_after(port: int, host: str = "127.0.0.1") -> int:
    """The first port above `port` that can be bound now (8181 if none of the next 100)."""
    for candidate in range(port + 1, min(port + 101, 65536)):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    return 8181


def _unix_answers(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
        return True
    except OSError:
        return False


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.05)
    return False


def client_instructions(env: dict[str, str], port: int) -> str:
    """What `make run` prints once both services answer: shell lines to copy."""
    conf = env["GUIX_CONFIGURATION_DIRECTORY"]
    lines = [
        f"{PROG}: guix-daemon serves the store {env['NIX_STORE_DIR']} "
        f"on {env['GUIX_DAEMON_SOCKET']}",
        f"{PROG}: guix publish serves it at http://127.0.0.1:{port}/ "
        f"(signing key {conf}/signing-key.pub)",
        "",
        "In another shell, put the tools on PATH and point them at these services:",
    ]
    activate = os.path.join(sys.prefix, "bin", "activate")
    if sys.prefix != sys.base_prefix and os.path.exists(activate):
        lines.append(f"  . {shlex.quote(activate)}")
    exports = [f"{name}={shlex.quote(env[name])}" for name in CLIENT_VARIABLES]
    lines.append("  export " + " \\\n    ".join(exports))
    lines += [
        "then, for example:",
        "  guixsvc gc --list-roots",
        "  guixsvc download ./README.md",
        "  guixsvc build /path/to/foo.drv",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines) + "\n"


def _fail(message: str, children: Sequence[subprocess.Popen[bytes]] = ()) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    _stop(children)
    return 1


def _stop(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guixsvc-devserver", description=__doc__)
    parser.add_argument("--root", default="local", help="directory holding the local store")
    parser.add_argument("--port", type=int, default=8080, help="port of guix publish")
    args = parser.parse_args(argv)
    env = local_environment(args.root)
    socket_path = env["GUIX_DAEMON_SOCKET"]
    problem = port_problem(args.port)
    if problem is not None:
        return _fail(problem)
    if _unix_answers(socket_path):
        return _fail(f"a daemon already listens on {socket_path} (another make run on this root?)")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    children: list[subprocess.Popen[bytes]] = []
    try:
        return _serve(env, args.port, children)
    except KeyboardInterrupt:
        _stop(children)
        return 0


def _serve(env: dict[str, str], port: int, children: list[subprocess.Popen[bytes]]) -> int:
    """Start both services (appending them to `children`) and wait until one stops."""
    for name in ("NIX_STORE_DIR", "GUIX_STATE_DIRECTORY", "GUIX_LOG_DIRECTORY"):
        os.makedirs(env[name], exist_ok=True)
    conf = env["GUIX_CONFIGURATION_DIRECTORY"]
    os.makedirs(conf, exist_ok=True)
    python = sys.executable
    if not os.path.exists(os.path.join(conf, "signing-key.sec")):
        subprocess.run(
            [python, "-m", "guixsvc.cli", "archive", "--generate-key"], env=env, check=True
        )
    socket_path = env["GUIX_DAEMON_SOCKET"]
    daemon = subprocess.Popen(
        [python, "-m", "guixsvc.daemon.cli", f"--listen={socket_path}", "--disable-chroot"],
        env=env,
    )
    children.append(daemon)
    if not _wait(lambda: _unix_answers(socket_path), daemon):
        return _fail(f"guix-daemon did not start on {socket_path}", children)
    publish = subprocess.Popen(
        [python, "-m", "guixsvc.cli", "publish", "--listen=127.0.0.1", f"--port={port}",
         "--compression=zstd:3", "--compression=gzip:3"],
        env=env,
    )  # fmt: skip
    children.append(publish)
    if not _wait(lambda: _tcp_answers(port), publish):
        return _fail(f"guix publish did not start on port {port}", children)
    sys.stderr.write(client_instructions(env, port))
    sys.stderr.flush()
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    name = "guix-daemon" if daemon.poll() is not None else "guix publish"
    return _fail(f"{name} stopped unexpectedly", children)


if __name__ == "__main__":
    sys.exit(main())
