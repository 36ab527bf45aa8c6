"""Messages of ours that upstream's CLI showed differently against our daemon than against
upstream's (side by side with the 2022 `guix gc`, issue 14); checked here with our own `guix
gc`, which prints the daemon's messages the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonError
from tests.conftest import start_daemon, stop_daemon
from tests.substitutes.helpers import free_port


def _gc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "gc", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_gc_reports_whole_mib_freed_as_upstream(tmp_path: Path) -> None:
    # gc.cc deletePathRecursive: format("[%1% MiB] deleting '%2%'") with an integer number of
    # MiB (bytes / (1024 * 1024)), not "[0.00 MiB]".
    d = start_daemon(tmp_path)
    try:
        env = dict(d.env, GUIX_DAEMON_SOCKET=d.socket)
        with d.client() as c:
            small = c.add_text_to_store("small", "x")
            big = c.add_text_to_store("big", "y" * (3 * 1024 * 1024 + 10))
        r = _gc(env, "-D", small)
        assert r.returncode == 0, r.stderr
        assert f"[0 MiB] deleting '{small}'\n" in r.stderr
        r = _gc(env)
        assert r.returncode == 0, r.stderr
        assert f"] deleting '{big}'\n" in r.stderr
        assert "MiB] deleting" in r.stderr and ".00 MiB]" not in r.stderr
    finally:
        stop_daemon(d)


def test_verify_messages_are_upstreams(tmp_path: Path) -> None:
    # local-store.cc verifyStore: "reading the store...", then (lvlInfo) "checking path
    # existence...", and with contents (lvlInfo) "checking hashes...".
    d = start_daemon(tmp_path)
    try:
        env = dict(d.env, GUIX_DAEMON_SOCKET=d.socket)
        r = _gc(env, "--verify")
        assert (r.returncode, r.stderr) == (0, "reading the store...\nchecking path existence...\n")
        r = _gc(env, "--verify=contents")
        assert (r.returncode, r.stderr) == (
            0,
            "reading the store...\nchecking path existence...\nchecking hashes...\n",
        )
    finally:
        stop_daemon(d)


def test_unreachable_substitute_servers_are_warned_in_upstreams_words(tmp_path: Path) -> None:
    # guix/substitutes.scm call-with-connection-error-handling: "~a: host not found: ~a" (a
    # getaddrinfo error) and "~a: connection failed: ~a" (strerror), as warnings of `guix
    # substitute`; not Python's "[Errno 111] ..." text.
    port = free_port()  # nothing listens there
    urls = f"http://127.0.0.1:{port} http://nonexistent.invalid"
    d = start_daemon(tmp_path, f"--substitute-urls={urls}")
    try:
        lines: list[str] = []
        with d.client(log=lines.append) as c:
            missing = f"{d.env['NIX_STORE_DIR']}/{'0' * 32}-nope"
            assert c.query_substitutable_paths([missing]) == []
        text = "".join(lines)
        assert (
            "guix substitute: warning: 127.0.0.1: connection failed: Connection refused\n" in text
        ), text
        assert "guix substitute: warning: nonexistent.invalid: host not found: " in text, text
        assert "[Errno" not in text
    finally:
        stop_daemon(d)


def test_missing_derivation_is_reported_with_upstreams_quotes(tmp_path: Path) -> None:
    # build.cc: format("cannot build missing derivation ‘%1%’"), as `guix build` shows it.
    d = start_daemon(tmp_path)
    try:
        lines: list[str] = []
        drv = f"{d.env['NIX_STORE_DIR']}/{'0' * 32}-nope.drv"
        with d.client(log=lines.append) as c, pytest.raises(DaemonError):
            c.build_paths([drv])
        assert f"cannot build missing derivation ‘{drv}’\n" in "".join(lines), lines
    finally:
        stop_daemon(d)
