"""The embedded default: the services on a self-contained local store, no root needed.

`make run` (README.md) starts this: it lays out a store, state, log and configuration directory
under one root, points upstream's environment variables at them, and runs guix-daemon there
(socket `<root>/daemon.sock`) until interrupted, printing how to point a Guix client at it.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guixsvc-devserver", description=__doc__)
    parser.add_argument("--root", default="local", help="directory holding the local store")
    args = parser.parse_args(argv)
    env = local_environment(args.root)
    for name in ("NIX_STORE_DIR", "GUIX_STATE_DIRECTORY", "GUIX_CONFIGURATION_DIRECTORY"):
        os.makedirs(env[name], exist_ok=True)
    socket_path = os.path.join(os.path.abspath(args.root), "daemon.sock")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "guixsvc.daemon.cli", f"--listen={socket_path}", "--disable-chroot"],
        env=env,
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(socket_path) and daemon.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    exports = " ".join(
        f"{k}={env[k]}"
        for k in ("NIX_STORE_DIR", "GUIX_STATE_DIRECTORY", "GUIX_CONFIGURATION_DIRECTORY")
    )
    sys.stderr.write(
        f"guix-daemon is serving the store {env['NIX_STORE_DIR']}\n"
        f"point a Guix client at it with:\n"
        f"  export GUIX_DAEMON_SOCKET={socket_path} {exports}\n"
        "press Ctrl-C to stop\n"
    )
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return daemon.wait()
    except KeyboardInterrupt:
        daemon.send_signal(signal.SIGTERM)
        return daemon.wait()


if __name__ == "__main__":
    sys.exit(main())
