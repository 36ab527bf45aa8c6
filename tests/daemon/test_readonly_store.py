"""A store on a read-only mount (what gnu-store.mount sets up): the daemon, as root, makes it
writable in a mount namespace of its own, and everybody else still sees it read-only."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import start_daemon, stop_daemon

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount"),
    pytest.mark.skipif(not shutil.which("mount"), reason="no mount (util-linux)"),
]


def test_daemon_writes_to_a_read_only_store_mount(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
        assert os.statvfs(store).f_flag & os.ST_RDONLY
        d = start_daemon(tmp_path)
        try:
            with d.client() as c:
                path = c.add_text_to_store("written", b"through the daemon's namespace")
                assert c.is_valid_path(path)
            assert Path(path).read_bytes() == b"through the daemon's namespace"
            # Outside the daemon the store is as read-only as before.
            assert os.statvfs(store).f_flag & os.ST_RDONLY
            with pytest.raises(OSError) as info:
                (store / "intruder").write_text("no")
            assert info.value.errno == errno.EROFS
        finally:
            stop_daemon(d)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)
