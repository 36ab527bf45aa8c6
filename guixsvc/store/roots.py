"""Garbage-collector roots and the GC lock, with upstream's on-disk protocols.

The collector and the workers coordinate only through files in the state directory, so that this
daemon, upstream's guix-daemon and `guix gc` can share a store (`nix/libstore/gc.cc`):

* `gc.lock` — held exclusively by a collector, shared while a worker creates its temp-roots file
  and briefly by `SyncWithGC` (`GCLock`, `sync_with_gc`);
* `temproots/<pid>` — a worker's temporary roots, NUL-terminated store file names, guarded by a
  shared/exclusive lock dance with the collector (`TempRoots`, `read_temp_roots`);
* `gcroots/auto/<nix-base32 of sha1 of F>` → F — indirect roots (`add_indirect_root`);
* `gcroots/`, `manifests/`, `profiles/` — permanent roots found by scanning (`find_roots`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from guixsvc.store import base32
from guixsvc.store.locks import (
    LVL_DEBUG,
    LVL_ERROR,
    LVL_INFO,
    LockKind,
    MessageLog,
    SysError,
    debug_wanted,
    emit,
    lock_fd,
    open_lock_file,
)
from guixsvc.store.paths import InvalidStorePath

__all__ = [
    "GC_LOCK_NAME",
    "GC_ROOTS_DIR",
    "TEMP_ROOTS_DIR",
    "GCLock",
    "TempRoots",
    "TempRootsSnapshot",
    "abs_path",
    "add_indirect_root",
    "canon_path",
    "find_roots",
    "indirect_root_name",
    "is_in_dir",
    "make_symlink",
    "read_temp_roots",
    "sync_with_gc",
    "to_store_path",
]

GC_LOCK_NAME = "gc.lock"
TEMP_ROOTS_DIR = "temproots"
GC_ROOTS_DIR = "gcroots"


class _HasPath(Protocol):
    @property
    def path(self) -> str: ...


def _store_dir(store: str | _HasPath) -> str:
    return store if isinstance(store, str) else store.path


# --- path helpers (upstream's canonPath / absPath / isInDir / toStorePath) ---------------------


def canon_path(path: str) -> str:
    """Normalise an absolute path lexically: drop `.`, empty components and resolve `..`.

    No symlink is resolved (upstream `canonPath(path, false)`); unlike `os.path.normpath`, a
    leading `//` is not preserved.
    """
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: `{path}'")
    parts: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
        else:
            parts.append(comp)
    return "/" + "/".join(parts)


def abs_path(path: str, directory: str) -> str:
    """`path` made absolute relative to `directory` (which must be absolute), canonicalised."""
    if not path.startswith("/"):
        path = directory + "/" + path
    return canon_path(path)


def is_in_dir(path: str, directory: str) -> bool:
    """True if `path` lies strictly below `directory` (upstream `isInDir`, purely textual)."""
    n = len(directory)
    return (
        path.startswith("/")
        and path.startswith(directory)
        and len(path) >= n + 2
        and path[n] == "/"
    )


def to_store_path(path: str, store_dir: str) -> str:
    """Truncate a file name inside the store to its store item `<store>/<first component>`."""
    if not is_in_dir(path, store_dir):
        raise InvalidStorePath(path)
    slash = path.find("/", len(store_dir) + 1)
    return path if slash < 0 else path[:slash]


def _is_store_path(path: str, store_dir: str) -> bool:
    return is_in_dir(path, store_dir) and path.find("/", len(store_dir) + 1) < 0


# --- the global GC lock ----------------------------------------------------------------------


class GCLock:
    """`<state>/gc.lock` (mode 0600): exclusive for a collector, shared for everybody else.

    `acquire()` first tries without blocking; if it has to wait it prints upstream's
    ``waiting for the big garbage collector lock...`` (error level) and then blocks, unless
    `wait` is False, in which case it returns False.  `release()` closes the descriptor, which
    drops every lock this process holds on `gc.lock` (POSIX semantics, as upstream).
    """

    def __init__(
        self, state_dir: str, *, exclusive: bool = False, log: MessageLog | None = None
    ) -> None:
        self.path = f"{state_dir}/{GC_LOCK_NAME}"
        self.exclusive = exclusive
        self._log = log
        self._fd: int | None = None
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self, *, exclusive: bool | None = None, wait: bool = True) -> bool:
        """Take the lock (shared or exclusive); re-locking an open lock converts its mode."""
        if exclusive is not None:
            self.exclusive = exclusive
        kind: LockKind = "w" if self.exclusive else "r"
        if self._fd is not None and self._pid != os.getpid():
            self._drop_inherited()
        emit(self._log, LVL_DEBUG, f"acquiring global GC lock `{self.path}'")
        fresh = self._fd is None
        if fresh:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise SysError(f"opening global GC lock `{self.path}'", e.errno) from e
            self._pid = os.getpid()
        fd = self._fd
        assert fd is not None
        try:
            if not lock_fd(fd, kind, False):
                if not wait:
                    if fresh:
                        self.release()
                    return False
                emit(self._log, LVL_ERROR, "waiting for the big garbage collector lock...")
                lock_fd(fd, kind, True)
        except BaseException:
            if fresh:
                self.release()
            raise
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)

    def _drop_inherited(self) -> None:
        # A descriptor inherited across fork carries no lock for this process.
        self.release()

    def __enter__(self) -> GCLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def sync_with_gc(state_dir: str, *, log: MessageLog | None = None) -> None:
    """Wait until no collector runs: take `gc.lock` shared and release it (SyncWithGC, RPC 13)."""
    with GCLock(state_dir, log=log):
        pass


# --- temporary roots -------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class TempRoots:
    """This process's `<state>/temproots/<pid>` file (upstream `addTempRoot`).

    The file is created on the first `add()`: with `gc.lock` held shared, a stale file of the
    same name is unlinked and a fresh one created; after releasing `gc.lock` a shared lock is
    taken on the file and, if the file is not empty (a collector found it unlocked, deleted it and
    wrote ``d``), everything starts over.  Each `add()` upgrades to an exclusive lock (waiting for
    a collector that holds a shared lock on it), appends ``<path>\\0`` and downgrades again.
    `close()` closes and unlinks the file.
    """

    def __init__(self, state_dir: str, *, log: MessageLog | None = None) -> None:
        self.state_dir = state_dir
        self._log = log
        self._fd: int | None = None
        self._pid = os.getpid()
        self.path: str | None = None

    def _create(self) -> int:
        directory = f"{self.state_dir}/{TEMP_ROOTS_DIR}"
        while True:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise SysError(f"creating directory `{directory}'", e.errno) from e
            path = f"{directory}/{os.getpid()}"
            with GCLock(self.state_dir, log=self._log):
                # A file with our pid must be stale: no two live processes share a pid.
                with contextlib.suppress(OSError):
                    os.unlink(path)
                fd = open_lock_file(path, True)
                assert fd is not None
            try:
                emit(self._log, LVL_DEBUG, f"acquiring read lock on `{path}'")
                lock_fd(fd, "r", True)
                size = os.fstat(fd).st_size
            except OSError as e:
                os.close(fd)
                if isinstance(e, SysError):
                    raise
                raise SysError(f"statting `{path}'", e.errno) from e
            if size == 0:
                self.path = path
                self._pid = os.getpid()
                return fd
            # The collector deleted the file before we could lock it; try again.
            os.close(fd)

    def _ensure_fd(self) -> int:
        if self._fd is not None and self._pid != os.getpid():
            # Inherited from our parent: the file and its lock are the parent's.
            os.close(self._fd)
            self._fd = None
            self.path = None
        if self._fd is None:
            self._fd = self._create()
        return self._fd

    def _append(self, data: bytes) -> None:
        fd = self._ensure_fd()
        debug = debug_wanted(self._log)  # no message formatting per append otherwise
        if debug:
            emit(self._log, LVL_DEBUG, f"acquiring write lock on `{self.path}'")
        lock_fd(fd, "w", True)
        try:
            _write_all(fd, data)
        finally:
            if debug:
                emit(self._log, LVL_DEBUG, f"downgrading to read lock on `{self.path}'")
            lock_fd(fd, "r", True)

    def add(self, path: str) -> None:
        """Record `path` (a store file name) as a temporary root of this process."""
        self._append(os.fsencode(path) + b"\0")

    def add_many(self, paths: Iterable[str]) -> None:
        """Add several roots under a single exclusive-lock window (one write)."""
        data = b"".join(os.fsencode(p) + b"\0" for p in paths)
        if data:
            self._append(data)

    def close(self) -> None:
        """Close and unlink the temp-roots file (at worker exit)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.close(fd)
        finally:
            if self._pid == os.getpid() and self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            self.path = None

    def __enter__(self) -> TempRoots:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class TempRootsSnapshot:
    """The temp roots a collector read, plus the locked descriptors that freeze them.

    Keep it open (the shared locks block the owners' `add()`) until the deletion phase is over,
    then `close()` it.
    """

    roots: set[str] = field(default_factory=set)
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> TempRootsSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_temp_roots(
    state_dir: str, store: str | _HasPath, *, log: MessageLog | None = None
) -> TempRootsSnapshot:
    """Collector side of the temp-roots protocol (upstream `readTempRoots`).

    Call with `gc.lock` held exclusively.  A file whose exclusive lock can be taken without
    waiting belongs to a dead process: it is unlinked and marked with ``d``.  Otherwise a shared
    lock is taken (blocking) and kept in the returned snapshot.  A recorded name that is not a
    store path raises `InvalidStorePath`.  (As upstream, this process's own temp-roots file looks
    stale, because a process never conflicts with its own locks.)
    """
    store_dir = _store_dir(store)
    directory = f"{state_dir}/{TEMP_ROOTS_DIR}"
    snapshot = TempRootsSnapshot()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return snapshot
    except OSError as e:
        raise SysError(f"opening directory `{directory}'", e.errno) from e
    try:
        for name in names:
            path = f"{directory}/{name}"
            emit(log, LVL_DEBUG, f"reading temporary root file `{path}'")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # the owner removed it meanwhile
            except OSError as e:
                raise SysError(f"opening temporary roots file `{path}'", e.errno) from e
            try:
                if lock_fd(fd, "w", False):
                    emit(log, LVL_ERROR, f"removing stale temporary roots file `{path}'")
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    _write_all(fd, b"d")
                    os.close(fd)
                    continue
                emit(log, LVL_DEBUG, f"waiting for read lock on `{path}'")
                lock_fd(fd, "r", True)
                contents = _read_fd(fd)
            except BaseException:
                os.close(fd)
                raise
            snapshot.fds.append(fd)
            entries = contents.split(b"\0")
            entries.pop()  # text after the last NUL is not a complete entry
            for raw in entries:
                root = os.fsdecode(raw)
                if not _is_store_path(root, store_dir):
                    raise InvalidStorePath(root)
                snapshot.roots.add(root)
    except BaseException:
        snapshot.close()
        raise
    return snapshot


# --- indirect roots --------------------------------------------------------------------------


def make_symlink(link: str, target: str) -> None:
    """Atomically (re)place `link` by a symlink to `target` via `<link>.tmp-<pid>-<rand>`."""
    parent = os.path.dirname(link) or "/"
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise SysError(f"creating directory `{parent}'", e.errno) from e
    temp = f"{link}.tmp-{os.getpid()}-{random.randrange(1 << 31)}"
    try:
        os.symlink(target, temp)
    except OSError as e:
        raise SysError(f"creating symlink from `{temp}' to `{target}'", e.errno) from e
    try:
        os.rename(temp, link)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise SysError(f"cannot rename `{temp}' to `{link}'", e.errno) from e


def indirect_root_name(file_name: str) -> str:
    """`<nix-base32 of the SHA-1 of the file name>` (32 characters), the name in `gcroots/auto`."""
    return base32.encode(hashlib.sha1(os.fsencode(file_name)).digest())


def add_indirect_root(state_dir: str, file_name: str) -> str:
    """Create `<state>/gcroots/auto/<h>` → `file_name` (AddIndirectRoot, RPC 12); return the link.

    `file_name` is made absolute relative to `/` and canonicalised first, as the RPC handler
    does, and the hash is taken over that string.
    """
    target = abs_path(file_name, "/")
    link = canon_path(f"{state_dir}/{GC_ROOTS_DIR}/auto/{indirect_root_name(target)}")
    make_symlink(link, target)
    return link


# --- permanent roots -------------------------------------------------------------------------

_IGNORED_ERRNOS = (errno.EACCES, errno.ENOENT, errno.ENOTDIR)


def _path_exists(path: str) -> bool:
    try:
        os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return True


class _RootScanner:
    def __init__(
        self,
        state_dir: str,
        store_dir: str,
        is_valid: Callable[[str], bool],
        log: MessageLog | None,
    ) -> None:
        self.store_dir = store_dir
        self.is_valid = is_valid
        self.log = log
        self.auto_dir = f"{state_dir}/{GC_ROOTS_DIR}/auto"
        self.roots: dict[str, str] = {}

    def found(self, link: str, target: str) -> None:
        item = to_store_path(target, self.store_dir)
        if self.is_valid(item):
            self.roots[link] = item
        else:
            emit(self.log, LVL_INFO, f"skipping invalid root from `{link}' to `{item}'")

    def scan(self, top: str) -> None:
        # (path, kind) with kind "d", "l", "f", "?" (unknown: lstat it), "o" (other).
        stack: list[tuple[str, str]] = [(top, "?")]
        while stack:
            path, kind = stack.pop()
            try:
                if kind == "?":
                    kind = _mode_kind(os.lstat(path).st_mode)
                if kind == "d":
                    children: list[tuple[str, str]] = []
                    with os.scandir(path) as it:
                        for entry in it:
                            children.append((entry.path, _entry_kind(entry)))
                    stack.extend(reversed(children))
                elif kind == "l":
                    self.symlink(path)
                elif kind == "f":
                    item = f"{self.store_dir}/{os.path.basename(path)}"
                    if self.is_valid(item):
                        self.roots[path] = item
            except OSError as e:
                # Only permanent failures are ignored.
                if e.errno in _IGNORED_ERRNOS:
                    emit(self.log, LVL_INFO, f"cannot read potential root `{path}'")
                elif isinstance(e, SysError):
                    raise
                else:
                    raise SysError(f"reading potential root `{path}'", e.errno) from e

    def symlink(self, path: str) -> None:
        target = os.readlink(path)
        if is_in_dir(target, self.store_dir):
            self.found(path, target)
            return
        # An indirect root: a link to a (user-owned) link into the store.
        target = abs_path(target, os.path.dirname(path))
        if not _path_exists(target):
            if is_in_dir(path, self.auto_dir):
                emit(self.log, LVL_INFO, f"removing stale link from `{path}' to `{target}'")
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return
        if not stat.S_ISLNK(os.lstat(target).st_mode):
            return
        target2 = os.readlink(target)
        if is_in_dir(target2, self.store_dir):
            self.found(target, target2)


def _mode_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISREG(mode):
        return "f"
    return "o"


def _entry_kind(entry: os.DirEntry[str]) -> str:
    try:
        if entry.is_symlink():
            return "l"
        if entry.is_dir(follow_symlinks=False):
            return "d"
        if entry.is_file(follow_symlinks=False):
            return "f"
    except OSError:
        return "?"
    return "o"


def find_roots(
    state_dir: str,
    store: str | _HasPath,
    is_valid: Callable[[str], bool],
    *,
    log: MessageLog | None = None,
) -> dict[str, str]:
    """Scan `gcroots/`, `manifests/` (if present) and `profiles/` for permanent roots.

    Returns root file → store item, sorted by root file name (upstream's `Roots` map, what
    FindRoots (RPC 14) sends).  Only items for which `is_valid` is true are included.  Stale links
    under `gcroots/auto` are deleted.
    """
    scanner = _RootScanner(state_dir, _store_dir(store), is_valid, log)
    scanner.scan(f"{state_dir}/{GC_ROOTS_DIR}")
    manifests = f"{state_dir}/manifests"
    if _path_exists(manifests):
        scanner.scan(manifests)
    scanner.scan(f"{state_dir}/profiles")
    return dict(sorted(scanner.roots.items(), key=lambda kv: os.fsencode(kv[0])))
