"""The daemon run by an ordinary user (the README's embedded default) on a store it owns."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient
from tests.conftest import store_env

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
#: The test's own interpreter may live where `nobody` cannot read (e.g. under /root); the
#: daemon's core needs only the standard library, so the system Python runs it from the source.
SYSTEM_PYTHON = "/usr/bin/python3"


def _readable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *path.parents])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no system Python 3")
@pytest.mark.skipif(not _readable_by_others(REPO), reason="source tree not readable by nobody")
def test_daemon_as_unprivileged_user() -> None:
    # pytest's tmp_path lies under a directory only root may enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="guixsvc-unpriv-"))
    try:
        _run_unprivileged(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_unprivileged(tmp_path: Path) -> None:
    root = tmp_path / "unpriv"
    root.mkdir()
    env = store_env(root)
    for path in (root, tmp_path, root / "etc"):
        os.chown(path, NOBODY, NOBODY)
    sock = str(root / "daemon.sock")
    log = root / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-m", "guixsvc.daemon.cli", f"--listen={sock}"],
            env={**env, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT, cwd="/",
            user=NOBODY, group=NOBODY, extra_groups=[],
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "f").write_bytes(b"x" * 10_000)
        with DaemonClient(sock) as c:
            text = c.add_text_to_store("unpriv", b"made by nobody")
            tree = c.add_to_store("tree", str(tmp_path / "t"))
            assert c.is_valid_path(text) and c.is_valid_path(tree)
        for item in (text, tree):
            st = os.lstat(item)
            assert st.st_uid == NOBODY and st.st_mtime == 1
            assert stat.S_IMODE(st.st_mode) in (0o444, 0o555)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
    finally:
        proc.terminate()
        proc.wait(10)
    assert "not running as root" in log.read_text()
