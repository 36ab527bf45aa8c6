"""The embedded default: guix-daemon and guix publish on a self-contained local store, no root.

`make run` (README.md) starts this: it lays out a store, state, log and configuration directory
under one root, points upstream's environment variables at them, generates a signing key on
first use, and runs guix-daemon (socket `<root>/daemon.sock`) and guix publish (loopback, port
8080 by default) until interrupted, printing how to point a Guix client at them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


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


def _wait_for_unix(path: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return True
        except OSError:
            time.sleep(0.05)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guixsvc-devserver", description=__doc__)
    parser.add_argument("--root", default="local", help="directory holding the local store")
    parser.add_argument("--port", type=int, default=8080, help="port of guix publish")
    args = parser.parse_args(argv)
    env = local_environment(args.root)
    for name in ("NIX_STORE_DIR", "GUIX_STATE_DIRECTORY", "GUIX_CONFIGURATION_DIRECTORY"):
        os.makedirs(env[name], exist_ok=True)
    python = sys.executable
    conf = env["GUIX_CONFIGURATION_DIRECTORY"]
    if not os.path.exists(os.path.join(conf, "signing-key.sec")):
        subprocess.run(
            [python, "-m", "guixsvc.cli", "archive", "--generate-key"], env=env, check=True
        )
    socket_path = env["GUIX_DAEMON_SOCKET"]
    daemon = subprocess.Popen(
        [python, "-m", "guixsvc.daemon.cli", f"--listen={socket_path}", "--disable-chroot"],
        env=env,
    )
    children = [daemon]
    if _wait_for_unix(socket_path, daemon):
        children.append(
            subprocess.Popen(
                [
                    python,
                    "-m",
                    "guixsvc.cli",
                    "publish",
                    "--listen=127.0.0.1",
                    f"--port={args.port}",
                    "--compression=zstd:3",
                    "--compression=gzip:3",
                ],
                env=env,
            )
        )
    exports = " ".join(
        f"{k}={env[k]}" for k in ("GUIX_DAEMON_SOCKET", "NIX_STORE_DIR", "GUIX_STATE_DIRECTORY")
    )
    sys.stderr.write(
        f"guix-daemon is serving the store {env['NIX_STORE_DIR']}\n"
        f"guix publish serves it at http://127.0.0.1:{args.port}/ "
        f"(key {conf}/signing-key.pub)\n"
        f"point a Guix client at them with:\n  export {exports}\n"
        "press Ctrl-C to stop\n"
    )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    return max((child.wait() for child in children), default=0)


if __name__ == "__main__":
    sys.exit(main())
