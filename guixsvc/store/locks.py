"""POSIX record locks and the `<path>.lock` protocol shared with upstream guix-daemon.

Every lock the daemon takes (`gc.lock`, `temproots/<pid>`, `db/big-lock`, `<path>.lock`,
`userpool/<uid>`) is an `fcntl` whole-file record lock (`F_SETLK`/`F_SETLKW` with `F_RDLCK` or
`F_WRLCK`, `l_start = l_len = 0`), exactly as upstream's `lockFile` in
`nix/libstore/pathlocks.cc`.  Using the same kind of lock is what lets this daemon, upstream's C++
daemon and `guix gc` coexist on one store.  `flock(2)` locks would not interact with them.

Remember the POSIX semantics: locks belong to the *process*, a process never conflicts with its own
locks, closing *any* descriptor of a file drops all of the process's locks on that file, and locks
are not inherited across `fork()`.

This module also holds two small things the other store modules share: `SysError` (an `OSError`
whose text reads like upstream's `SysError`, "<what>: <strerror>") and the message-callback type
used to report upstream's diagnostics (levels of upstream's `Verbosity` enum).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Literal

__all__ = [
    "LVL_CHATTY",
    "LVL_DEBUG",
    "LVL_ERROR",
    "LVL_INFO",
    "LVL_TALKATIVE",
    "LVL_VOMIT",
    "LockError",
    "LockKind",
    "MessageLog",
    "PathLocks",
    "SysError",
    "UnsafeLockFile",
    "debug_wanted",
    "delete_lock_file",
    "emit",
    "lock_fd",
    "open_lock_file",
    "path_is_locked_by_me",
]

# Upstream's `Verbosity` (nix/libutil/types.hh).
LVL_ERROR = 0
LVL_INFO = 1
LVL_TALKATIVE = 2
LVL_CHATTY = 3
LVL_DEBUG = 4
LVL_VOMIT = 5

#: A sink for upstream-style diagnostics: ``log(level, message)`` with an upstream verbosity level.
MessageLog = Callable[[int, str], None]

_logger = logging.getLogger("guixsvc.store")
_PY_LEVELS = {
    LVL_ERROR: logging.ERROR,
    LVL_INFO: logging.INFO,
}


def debug_wanted(log: MessageLog | None) -> bool:
    """Whether a debug message to `log` could go anywhere: callers on hot paths test this
    before formatting one (with no `log`, Python logging's DEBUG level decides)."""
    return log is not None or _logger.isEnabledFor(logging.DEBUG)


def emit(log: MessageLog | None, level: int, message: str) -> None:
    """Report `message` at upstream verbosity `level` to `log`, or to Python logging if None."""
    if log is not None:
        log(level, message)
    else:
        _logger.log(_PY_LEVELS.get(level, logging.DEBUG), "%s", message)


class SysError(OSError):
    """An `OSError` whose text is upstream's `SysError` form: ``<what>: <strerror>``."""

    def __init__(self, what: str, err: int | None) -> None:
        code = err if err is not None else 0
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what

    def __str__(self) -> str:
        return str(self.strerror)


class LockError(Exception):
    """Logic errors of the lock protocol (e.g. re-acquiring a lock this process already holds)."""


LockKind = Literal["r", "w", "u"]

_FCNTL_KIND = {"r": fcntl.LOCK_SH, "w": fcntl.LOCK_EX, "u": fcntl.LOCK_UN}


def lock_fd(fd: int, kind: LockKind, wait: bool) -> bool:
    """Take (`"r"` shared, `"w"` exclusive) or drop (`"u"`) a whole-file fcntl lock on `fd`.

    Returns False only when `wait` is False and another process holds a conflicting lock.
    `fcntl.lockf` is `fcntl(F_SETLK[W])` with whole-file `struct flock` on Linux, i.e. the
    very call upstream makes; EINTR is retried by Python itself.
    """
    try:
        op = _FCNTL_KIND[kind]
    except KeyError:
        raise ValueError(f"invalid lock kind {kind!r}") from None
    if not wait and kind != "u":  # unlocking never blocks (and lockf rejects UN|NB)
        op |= fcntl.LOCK_NB
    try:
        fcntl.lockf(fd, op)
    except OSError as e:
        if not wait and e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise SysError("acquiring/releasing lock", e.errno) from e
    return True


class UnsafeLockFile(SysError):
    """A lock file that is not a plain regular file (a planted FIFO, directory, device...)."""

    def __init__(self, path: str, err: int = errno.EINVAL) -> None:
        super().__init__(f"opening lock file `{path}'", err)
        self.strerror = f"opening lock file `{path}': not a regular file"
        self.path = path


def open_lock_file(path: str, create: bool) -> int | None:
    """Open `path` read-write (creating it with mode 0600 if `create`), close-on-exec.

    Returns None if the file does not exist and `create` is False (upstream's `openLockFile`).
    A symlink in place of the file is never followed (SysError with ELOOP) and anything but a
    regular file is refused with `UnsafeLockFile`, so a lock file planted in a directory others
    can write to cannot make the daemon create, truncate or block on a file elsewhere.
    """
    flags = (
        os.O_RDWR
        | os.O_CLOEXEC
        | os.O_NOFOLLOW
        | os.O_NONBLOCK
        | os.O_NOCTTY
        | (os.O_CREAT if create else 0)
    )
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if not create and e.errno == errno.ENOENT:
            return None
        raise SysError(f"opening lock file `{path}'", e.errno) from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise SysError(f"opening lock file `{path}'", e.errno) from e
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeLockFile(path)
    return fd


def _open_own_lock_file(path: str, log: MessageLog | None) -> int:
    """Open (creating) a `<path>.lock` in the store, replacing anything planted there.

    The store is writable by the build group, so `X.lock` may be a symlink, a FIFO, a hard link
    or a file somebody else owns (and could lock, or fill, to wedge us forever).  The daemon
    creates its lock files itself, so anything that is not a regular file with one link owned
    by our effective uid is removed (unlink never follows) and created afresh.
    """
    euid = os.geteuid()
    for _ in range(_LOCK_OPEN_ATTEMPTS):
        try:
            fd = open_lock_file(path, True)
        except SysError as e:
            if not isinstance(e, UnsafeLockFile) and e.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            _remove_planted(path, None, log)
            continue
        assert fd is not None
        st = os.fstat(fd)
        if st.st_uid == euid and st.st_nlink == 1:
            return fd
        os.close(fd)
        _remove_planted(path, st, log)
    raise SysError(f"opening lock file `{path}'", errno.EBUSY)


def _remove_planted(path: str, st: os.stat_result | None, log: MessageLog | None) -> None:
    """Unlink `path` if it is (still) the entry `st` describes (any entry if `st` is None)."""
    try:
        cur = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SysError(f"getting attributes of path `{path}'", e.errno) from e
    if st is not None and (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
        return
    emit(log, LVL_ERROR, f"removing unexpected lock file `{path}'")
    try:
        if stat.S_ISDIR(cur.st_mode):
            from guixsvc.store.safefs import remove_tree  # safefs imports this module

            remove_tree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SysError(f"removing unexpected lock file `{path}'", e.errno) from e


def delete_lock_file(path: str, fd: int) -> None:
    """Unlink a lock file we hold and mark it stale with the byte ``d`` for processes waiting on it.

    The unlink result is ignored (removing the file is only an optimisation, as upstream says).
    """
    with contextlib.suppress(OSError):
        os.unlink(path)
    _write_all(fd, b"d")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# Lock files this process holds through PathLocks.  fcntl locks never conflict within one process,
# so this is the only way to detect a self-deadlock (upstream keeps the same global set).  A forked
# child holds none of its parent's locks, hence the reset.
_locked_paths: set[str] = set()

# How often PathLocks replaces a planted or stale lock file before giving up (an attacker
# racing us at every attempt only earns an error, not a hang).
_LOCK_OPEN_ATTEMPTS = 64


def _forget_locks_in_child() -> None:
    _locked_paths.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def path_is_locked_by_me(path: str) -> bool:
    """True if this process holds `<path>.lock` through a `PathLocks` object."""
    return path + ".lock" in _locked_paths


class PathLocks:
    """Exclusive locks on `<path>.lock` for a set of store paths (upstream `PathLocks`).

    Paths are locked in sorted order (bytewise), which prevents deadlocks between processes.
    After locking a lock file, a non-zero size means its previous owner deleted it (and wrote
    ``d`` into it), so the lock is stale and we start over with a fresh file.
    """

    def __init__(
        self,
        paths: Iterable[str] | None = None,
        wait_msg: str = "",
        *,
        log: MessageLog | None = None,
    ) -> None:
        self._fds: list[tuple[int, str]] = []
        self._delete = False
        self._log = log
        self._pid = os.getpid()
        if paths is not None:
            self.lock(paths, wait=True, wait_msg=wait_msg)

    def lock(self, paths: Iterable[str], wait: bool = True, wait_msg: str = "") -> bool:
        """Lock every path; with `wait` False, release everything and return False on contention.

        `wait_msg` (if non-empty) is printed at error level before blocking, like upstream.
        """
        if self._fds:
            raise LockError("PathLocks object already holds locks")
        self._pid = os.getpid()
        for path in sorted(set(paths), key=os.fsencode):
            lock_path = path + ".lock"
            if lock_path in _locked_paths:
                raise LockError("deadlock: trying to re-acquire self-held lock")
            for _attempt in range(_LOCK_OPEN_ATTEMPTS):
                fd = _open_own_lock_file(lock_path, self._log)
                try:
                    if not lock_fd(fd, "w", False):
                        if not wait:
                            os.close(fd)
                            self.unlock()
                            return False
                        if wait_msg:
                            emit(self._log, LVL_ERROR, wait_msg)
                        lock_fd(fd, "w", True)
                    st = os.fstat(fd)
                except BaseException:
                    os.close(fd)
                    raise
                if st.st_size == 0:
                    break
                # The previous holder deleted this file: somebody else may already have a
                # fresh one, so drop this descriptor (and its lock) and retry.  If the name
                # still refers to this very file, its deleter failed to unlink it (or it was
                # planted with contents): unlink it so that the retry can make progress.
                emit(self._log, LVL_DEBUG, f"open lock file `{lock_path}' has become stale")
                try:
                    _remove_planted(lock_path, st, self._log)
                finally:
                    os.close(fd)
            else:
                self.unlock()
                raise SysError(f"opening lock file `{lock_path}'", errno.EBUSY)
            self._fds.append((fd, lock_path))
            _locked_paths.add(lock_path)
        return True

    def unlock(self) -> None:
        """Release all locks (deleting the lock files first if `set_deletion(True)` was called)."""
        fds, self._fds = self._fds, []
        if os.getpid() != self._pid:
            # Inherited across fork: the locks belong to the parent; just drop our copies.
            for fd, _ in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return
        for fd, lock_path in fds:
            try:
                if self._delete:
                    delete_lock_file(lock_path, fd)
            finally:
                _locked_paths.discard(lock_path)
                try:
                    os.close(fd)
                except OSError:
                    emit(
                        self._log,
                        LVL_ERROR,
                        f"error (ignored): cannot close lock file on `{lock_path}'",
                    )

    def set_deletion(self, delete: bool) -> None:
        """Whether `unlock()` removes the lock files (and marks them stale with ``d``)."""
        self._delete = delete

    @property
    def locked(self) -> bool:
        return bool(self._fds)

    def __enter__(self) -> PathLocks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unlock()

    def __del__(self) -> None:
        try:
            if self._fds:
                self.unlock()
        except Exception:
            pass
