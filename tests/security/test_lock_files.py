"""Class 3: lock files planted in the group-writable store must not make root follow them.

The attacker (build group) plants `<path>.lock` before asking the daemon (as an ordinary
client) to add that very path.  Whatever was planted — a symlink to a file, to a missing
file, to a directory, a FIFO, a non-empty file meant to wedge the lock, a file the attacker
keeps locked, a hard link, a directory — the daemon must neither create, truncate, chmod nor
write anything outside the store, must not hang, and must leave no `.lock` behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient
from guixsvc.store.locks import PathLocks, SysError
from guixsvc.store.paths import StoreDir
from tests.conftest import Daemon
from tests.security.conftest import Attacker, as_user, snapshot, store_junk

CONTENTS = b"the item the attacker wants us to lock\n"


def _target(daemon: Daemon, name: str) -> str:
    sd = StoreDir(daemon.store_dir)
    return sd.display(sd.make_text_path(name, hashlib.sha256(CONTENTS).digest(), []))


def _plant(kind: str, lock: str, outside: Path) -> None:
    """Runs as the attacker."""
    if kind == "symlink-file":
        os.symlink(outside / "victim", lock)
    elif kind == "symlink-missing":
        os.symlink(outside / "created-by-root", lock)
    elif kind == "symlink-dir":
        os.symlink(outside / "dir", lock)
    elif kind == "fifo":
        os.mkfifo(lock, 0o666)
    elif kind == "nonempty":
        Path(lock).write_bytes(b"d")  # looks like a stale lock forever
    elif kind == "hardlink":
        own = Path(lock + ".mine")
        own.write_bytes(b"")
        os.link(own, lock)
        own.unlink()
    elif kind == "directory":
        os.mkdir(lock)
        os.mkdir(lock + "/sub")
        os.symlink(outside / "dir", lock + "/sub/escape")
    else:  # pragma: no cover
        raise ValueError(kind)


KINDS = [
    "symlink-file",
    "symlink-missing",
    "symlink-dir",
    "fifo",
    "nonempty",
    "hardlink",
    "directory",
]


@pytest.mark.parametrize("kind", KINDS)
def test_planted_lock_file(
    root_daemon: Daemon, attacker: Attacker, outside: Path, kind: str
) -> None:
    name = f"planted-{kind}"
    dest = _target(root_daemon, name)
    lock = dest + ".lock"
    before = snapshot(outside)
    attacker.run(lambda: _plant(kind, lock, outside))
    assert os.path.lexists(lock)

    sock = root_daemon.socket

    def add() -> str:
        with DaemonClient(sock) as c:
            return c.add_text_to_store(name, CONTENTS)

    # The attacker itself asks for the path (an untrusted client), with a bounded wait.
    added = attacker.run(add, timeout=60)
    assert added == dest
    with root_daemon.client() as c:
        assert c.is_valid_path(dest)
    assert Path(dest).read_bytes() == CONTENTS
    assert snapshot(outside) == before, "the daemon touched files outside the store"
    assert not (outside / "created-by-root").exists()
    assert store_junk(root_daemon.store_dir) == []
    assert root_daemon.process.poll() is None


def test_lock_held_by_attacker_does_not_wedge(
    root_daemon: Daemon, attacker: Attacker, outside: Path
) -> None:
    """The attacker creates the lock file and keeps it locked; the daemon must not wait."""
    name = "held-lock"
    dest = _target(root_daemon, name)
    lock = dest + ".lock"
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()

    def hold() -> None:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.write(ready_w, b"x")
        os.read(stop_r, 1)  # hold the lock until the test is done

    holder = threading.Thread(target=lambda: as_user(attacker.uid, attacker.gid, hold))
    holder.start()
    try:
        assert os.read(ready_r, 1) == b"x"
        with root_daemon.client() as c:
            assert c.add_text_to_store(name, CONTENTS) == dest
            assert c.is_valid_path(dest)
    finally:
        os.write(stop_w, b"x")
        holder.join(30)
        for fd in (ready_r, ready_w, stop_r, stop_w):
            os.close(fd)
    assert store_junk(root_daemon.store_dir) == []


def test_path_locks_refuse_to_follow(sec_root: Path, outside: Path) -> None:
    """The library level: PathLocks never opens through a symlink, even when it cannot remove
    it (here a symlink in a sticky directory owned by somebody else, as a non-root daemon
    would see it)."""
    store = sec_root / "store"
    store.mkdir()
    os.symlink(outside / "victim", store / "x.lock")
    before = snapshot(outside)
    with PathLocks([str(store / "x")]) as locks:
        locks.set_deletion(True)
        assert not (store / "x.lock").is_symlink()
    assert snapshot(outside) == before
    assert not os.path.lexists(store / "x.lock")


def test_open_lock_file_refuses_non_regular(sec_root: Path, outside: Path) -> None:
    from guixsvc.store.locks import UnsafeLockFile, open_lock_file

    os.mkfifo(sec_root / "fifo.lock")
    with pytest.raises(UnsafeLockFile, match="not a regular file"):
        open_lock_file(str(sec_root / "fifo.lock"), True)
    os.symlink(outside / "victim", sec_root / "sym.lock")
    with pytest.raises(SysError, match="opening lock file"):
        open_lock_file(str(sec_root / "sym.lock"), True)
    assert (outside / "victim").read_bytes() == b"precious\n"
