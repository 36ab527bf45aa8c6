"""`make run` (guixsvc.devserver) as a person uses it: it starts both services on a temporary
root, prints shell lines that really work (the client environment they export keeps `guixsvc gc`
off the host's /var/guix), and says in one line when the port or the root is already in use."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.substitutes.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = (
    "GUIX_DAEMON_SOCKET",
    "NIX_STORE_DIR",
    "GUIX_STATE_DIRECTORY",
    "GUIX_DATABASE_DIRECTORY",
    "GUIX_LOG_DIRECTORY",
    "GUIX_CONFIGURATION_DIRECTORY",
)


def devserver(root: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    # The test run's own environment already points every store variable at a throw-away
    # directory (tests/conftest.py); the devserver overrides them all with `root`.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "guixsvc.devserver", f"--root={root}", f"--port={port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"), cwd=ROOT,
    )  # fmt: skip


def test_taken_port_is_reported_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "guixsvc.devserver", f"--root={tmp_path / 'r'}",
             f"--port={port}"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"guixsvc: port {port} is taken; try make run PORT=")
    suggested = int(lines[0].rsplit("=", 1)[1])
    assert suggested > port
    assert not (tmp_path / "r").exists()  # nothing was started or laid out


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        assert proc.poll() is None, out
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in:\n{log.read_text(errors='replace')}")


def test_run_prints_a_working_client_environment(tmp_path: Path) -> None:
    root, port, log = tmp_path / "local", free_port(), tmp_path / "devserver.log"
    proc = devserver(root, port, log)
    try:
        out = _wait_for(log, "Press Ctrl-C to stop.", proc)
        for sub in ("store", "state", "log", "etc/signing-key.pub", "etc/signing-key.sec"):
            assert (root / sub).exists(), sub
        # The printed lines, run by a shell: the venv's activate script, then the exports.
        start = out.index("In another shell")
        block = out[start : out.index("then, for example:")].splitlines()[1:]
        script = "\n".join(line.strip() for line in block)
        in_venv = sys.prefix != sys.base_prefix  # `make test` runs in .venv
        activate = f". {shlex.quote(os.path.join(sys.prefix, 'bin', 'activate'))}"
        assert script.startswith(activate) == in_venv, script
        shown = subprocess.run(
            ["sh", "-c", script + "\nenv; command -v guixsvc || true"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        env = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        expected = {
            "GUIX_DAEMON_SOCKET": "daemon.sock", "NIX_STORE_DIR": "store",
            "GUIX_STATE_DIRECTORY": "state", "GUIX_DATABASE_DIRECTORY": "state/db",
            "GUIX_LOG_DIRECTORY": "log", "GUIX_CONFIGURATION_DIRECTORY": "etc",
        }  # fmt: skip
        for name in VARIABLES:
            assert env[name] == str(root / expected[name]), name
        if in_venv:
            assert shown.splitlines()[-1] == os.path.join(sys.prefix, "bin", "guixsvc")
        # With exactly that environment, `guixsvc gc --list-roots` asks our daemon and reads
        # our state directory (only its profiles root), never the host's /var/guix.
        client_env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
        client_env.update({name: env[name] for name in VARIABLES}, PYTHONPATH=str(ROOT))
        roots = subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "gc", "--list-roots"],
            capture_output=True, text=True, env=client_env, timeout=60,
        )  # fmt: skip
        assert roots.returncode == 0, roots.stderr
        assert roots.stdout.splitlines() == [str(root / "state" / "profiles")]
        # The printed examples (but the build one, whose .drv is a placeholder) run as shown,
        # from the checkout, in that shell environment.
        examples = out[out.index("then, for example:") : out.index("Press Ctrl-C")]
        examples = [line.strip() for line in examples.splitlines()[1:]]
        assert examples[0] == "guixsvc gc --list-roots"
        assert "guixsvc download ./README.md" in examples
        assert any(line.startswith("guixsvc build ") for line in examples)
        if in_venv:
            ran = subprocess.run(
                ["sh", "-c", script + "\nguixsvc download ./README.md"],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            assert ran.returncode == 0, ran.stderr
            assert ran.stdout.splitlines()[0].startswith(f"{root / 'store'}/")
            assert ran.stdout.splitlines()[0].endswith("-README.md")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/nix-cache-info", timeout=20) as r:
            assert f"StoreDir: {root / 'store'}\n" in r.read().decode()
        # A second `make run` on the same root (another port) stops at once and says why.
        second = subprocess.run(
            [sys.executable, "-m", "guixsvc.devserver", f"--root={root}",
             f"--port={free_port()}"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
        assert second.returncode == 1
        assert second.stderr == (
            f"guixsvc: a daemon already listens on {root / 'daemon.sock'} "
            "(another make run on this root?)\n"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, log.read_text(errors="replace")
    with socket.socket() as again:  # publish is gone: the port is free again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
