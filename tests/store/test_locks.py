"""Tests for guixsvc.store.locks: real fcntl record locks seen from other processes.

The oracle is the kernel: another (forked) process probes our locks with raw `fcntl(F_GETLK)` /
`F_SETLK` calls built by hand with `struct flock`, which is what upstream's C++ daemon does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

import pytest

from guixsvc.store import locks
from guixsvc.store.locks import (
    LVL_ERROR,
    LockError,
    PathLocks,
    delete_lock_file,
    lock_fd,
    open_lock_file,
    path_is_locked_by_me,
)
from tests.store.forked import Child

# struct flock on Linux x86-64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding).
_FLOCK = "hhqqi4x"


def _getlk(path: str, kind: int) -> tuple[int, int, int, int]:
    """Raw F_GETLK for a whole-file lock of `kind`: (type, start, len, pid) of a conflict."""
    fd = os.open(path, os.O_RDWR)
    try:
        req = struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)
        ltype, _, start, length, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, req))
        return ltype, start, length, pid
    finally:
        os.close(fd)


def _try_setlk(path: str, kind: int) -> bool:
    """Raw non-blocking F_SETLK from this process; True if granted."""
    fd = os.open(path, os.O_RDWR)
    try:
        req = struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLK, req)
        except OSError as e:
            assert e.errno in (errno.EACCES, errno.EAGAIN)
            return False
        return True
    finally:
        os.close(fd)


def _probe_in_child(path: str, kind: int) -> tuple[bool, tuple[int, int, int, int]]:
    result: dict[str, str] = {}

    def probe(c: Child) -> None:
        got = _getlk(path, kind)
        ok = _try_setlk(path, kind)
        c.send(f"{int(ok)} {' '.join(map(str, got))}")

    child = Child(probe)
    result["line"] = child.recv()
    assert child.join() == 0
    ok, *rest = result["line"].split()
    a, b, c_, d = map(int, rest)
    return ok == "1", (a, b, c_, d)


def test_lock_fd_is_posix_record_lock_on_whole_file(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert lock_fd(fd, "w", False)
        ok, (ltype, start, length, pid) = _probe_in_child(path, fcntl.F_RDLCK)
        assert not ok
        assert (ltype, start, length, pid) == (fcntl.F_WRLCK, 0, 0, os.getpid())

        # Downgrade: readers may share it, writers may not.
        assert lock_fd(fd, "r", True)
        ok, _ = _probe_in_child(path, fcntl.F_RDLCK)
        assert ok
        ok, (ltype, _, _, pid) = _probe_in_child(path, fcntl.F_WRLCK)
        assert not ok
        assert (ltype, pid) == (fcntl.F_RDLCK, os.getpid())

        assert lock_fd(fd, "u", False)
        ok, (ltype, _, _, _) = _probe_in_child(path, fcntl.F_WRLCK)
        assert ok and ltype == fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_lock_fd_nonblocking_contention_and_blocking_wait(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    open(path, "w").close()

    def holder(c: Child) -> None:
        fd = os.open(path, os.O_RDWR)
        req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        fcntl.fcntl(fd, fcntl.F_SETLKW, req)
        c.send("locked")
        c.wait_for()
        time.sleep(0.3)
        os.close(fd)

    child = Child(holder)
    assert child.recv() == "locked"
    fd = os.open(path, os.O_RDWR)
    try:
        assert not lock_fd(fd, "r", False)
        assert not lock_fd(fd, "w", False)
        child.tell("go")
        start = time.monotonic()
        assert lock_fd(fd, "w", True)
        assert time.monotonic() - start >= 0.2
    finally:
        os.close(fd)
    assert child.join() == 0


def test_lock_fd_rejects_unknown_kind(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError):
            lock_fd(fd, "x", True)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_open_lock_file(tmp_path: Path) -> None:
    path = str(tmp_path / "l")
    assert open_lock_file(path, False) is None
    old = os.umask(0)
    try:
        fd = open_lock_file(path, True)
    finally:
        os.umask(old)
    assert fd is not None
    try:
        assert os.stat(path).st_mode & 0o7777 == 0o600
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        open_lock_file(str(tmp_path / "missing" / "l"), True)
    assert str(info.value).startswith(f"opening lock file `{tmp_path}/missing/l': ")


def test_delete_lock_file_marks_stale(tmp_path: Path) -> None:
    path = str(tmp_path / "l")
    fd = open_lock_file(path, True)
    assert fd is not None
    keep = os.open(path, os.O_RDONLY)
    delete_lock_file(path, fd)
    os.close(fd)
    assert not os.path.exists(path)
    assert os.read(keep, 10) == b"d"
    os.close(keep)


def test_path_locks_lock_files_and_exclusion(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with PathLocks([b, a, a]) as pl:
        assert pl.locked
        assert path_is_locked_by_me(a) and path_is_locked_by_me(b)
        for p in (a, b):
            st = os.stat(p + ".lock")
            assert st.st_size == 0 and st.st_mode & 0o777 == 0o600
            ok, (ltype, _, _, pid) = _probe_in_child(p + ".lock", fcntl.F_RDLCK)
            assert not ok and ltype == fcntl.F_WRLCK and pid == os.getpid()
    assert not path_is_locked_by_me(a)
    # Released, but not deleted.
    assert os.path.exists(a + ".lock")
    ok, _ = _probe_in_child(a + ".lock", fcntl.F_WRLCK)
    assert ok


def test_path_locks_self_deadlock_detected(tmp_path: Path) -> None:
    p = str(tmp_path / "x")
    with (
        PathLocks([p]),
        pytest.raises(LockError, match="deadlock: trying to re-acquire self-held lock"),
    ):
        PathLocks([p])
    # After release, locking again is fine.
    with PathLocks([p]):
        pass


def test_path_locks_nowait_releases_everything(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def holder(c: Child) -> None:
        fd = os.open(b + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        c.send("locked")
        c.wait_for()

    child = Child(holder)
    assert child.recv() == "locked"
    pl = PathLocks()
    assert pl.lock([a, b], wait=False) is False
    assert not pl.locked
    assert not path_is_locked_by_me(a)
    ok, _ = _probe_in_child(a + ".lock", fcntl.F_WRLCK)
    assert ok  # `a' was released again
    child.tell("done")
    assert child.join() == 0
    assert pl.lock([a, b], wait=False) is True
    pl.unlock()


def test_path_locks_wait_message_and_stale_file_retry(tmp_path: Path) -> None:
    """A waiter that obtains a lock on a deleted lock file (size 1, `d') must retry."""
    p = str(tmp_path / "item")
    holder = PathLocks([p])
    holder.set_deletion(True)

    def waiter(c: Child) -> None:
        log: list[tuple[int, str]] = []
        c.send("starting")
        pl = PathLocks(log=lambda lvl, msg: log.append((lvl, msg)))
        pl.lock([p], wait=True, wait_msg="waiting for lock on item")
        st = os.stat(p + ".lock")
        c.send(str(st.st_size))
        for lvl, msg in log:
            c.send(f"{lvl} {msg}")
        c.send("end")
        c.wait_for()
        pl.unlock()

    child = Child(waiter)
    assert child.recv() == "starting"
    time.sleep(0.3)  # let the child block on our lock
    assert not child.poll(0)
    holder.unlock()  # unlinks the lock file and writes `d' into it
    assert child.recv() == "0"  # the file it finally locked is a fresh, empty one
    log = []
    while (line := child.recv()) != "end":
        log.append(line)
    assert log == [
        f"{LVL_ERROR} waiting for lock on item",
        f"{locks.LVL_DEBUG} open lock file `{p}.lock' has become stale",
    ]
    ok, (ltype, _, _, pid) = _probe_in_child(p + ".lock", fcntl.F_WRLCK)
    assert not ok and ltype == fcntl.F_WRLCK and pid == child.pid
    child.tell("done")
    assert child.join() == 0


def test_path_locks_deletion_removes_files(tmp_path: Path) -> None:
    p = str(tmp_path / "x")
    pl = PathLocks([p])
    pl.set_deletion(True)
    pl.unlock()
    assert not os.path.exists(p + ".lock")


def test_fork_forgets_self_held_locks(tmp_path: Path) -> None:
    p = str(tmp_path / "x")
    with PathLocks([p]):

        def child_side(c: Child) -> None:
            c.send(str(int(path_is_locked_by_me(p))))

        child = Child(child_side)
        assert child.recv() == "0"
        assert child.join() == 0
        assert path_is_locked_by_me(p)


def test_sys_error_text() -> None:
    e = locks.SysError("doing `x'", errno.ENOENT)
    assert str(e) == f"doing `x': {os.strerror(errno.ENOENT)}"
    assert e.errno == errno.ENOENT and isinstance(e, OSError)


def test_emit_uses_callback() -> None:
    got: list[tuple[int, str]] = []
    locks.emit(lambda lvl, msg: got.append((lvl, msg)), LVL_ERROR, "hello")
    assert got == [(LVL_ERROR, "hello")]
