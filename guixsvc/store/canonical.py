"""Canonical metadata of store items (upstream `canonicalisePathMetaData`, `local-store.cc`).

Everything that enters the store is normalised so that its metadata carries no information: every
non-symlink gets mode 0444 or 0555 (0555 when the owner-execute bit was set), every file an mtime of
1 (one second after the epoch, atime kept), and the owner becomes the daemon's effective uid/gid.
Only regular files, directories and symlinks are allowed.  Symlinks are never followed.

The walk works relative to directory descriptors (`dir_fd`, `O_NOFOLLOW`) so that a hostile tree
cannot redirect it through a symlinked directory, and stats every entry exactly once.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from guixsvc.store.locks import SysError

__all__ = [
    "MTIME_STORE",
    "CanonicalisationError",
    "InvalidOwnership",
    "UnsupportedFileType",
    "WrongTopLevelOwnership",
    "canonicalise",
    "canonicalise_timestamp_and_permissions",
    "make_writable",
    "writable_directory",
]

#: Modification time of every store file: one second into the epoch.
MTIME_STORE = 1
_MTIME_NS = MTIME_STORE * 1_000_000_000
_NS = 1_000_000_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CanonicalisationError(Exception):
    """A store item cannot be given canonical metadata."""


class UnsupportedFileType(CanonicalisationError):
    """`file ‘X’ has an unsupported type` (not a regular file, directory or symlink)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"file ‘{path}’ has an unsupported type")
        self.path = path


class InvalidOwnership(CanonicalisationError):
    """`invalid ownership on file `X'`: a build output file not owned by the build user.

    Upstream raises it as a `BuildError` (the build fails rather than the daemon).
    """

    def __init__(self, path: str) -> None:
        super().__init__(f"invalid ownership on file `{path}'")
        self.path = path


class WrongTopLevelOwnership(CanonicalisationError):
    def __init__(self, path: str) -> None:
        super().__init__(f"wrong ownership of top-level store path `{path}'")
        self.path = path


def _fix_timestamp_and_permissions(
    display: str, name: str, dir_fd: int | None, st: os.stat_result
) -> None:
    mode = st.st_mode
    if not stat.S_ISLNK(mode):
        perm = mode & 0o7777
        if perm not in (0o444, 0o555):
            new = stat.S_IFMT(mode) | 0o444 | (0o111 if mode & stat.S_IXUSR else 0)
            try:
                # Not a symlink (we just lstat'ed it), so following is moot; Linux has no
                # lchmod anyway.
                os.chmod(name, new & 0o7777, dir_fd=dir_fd)
            except OSError as e:
                raise SysError(f"changing mode of `{display}' to {new:o}", e.errno) from e
    # Upstream compares whole seconds (st_mtime is a time_t) and keeps the atime seconds.
    if st.st_mtime_ns // _NS != MTIME_STORE:
        atime_ns = (st.st_atime_ns // _NS) * _NS
        try:
            os.utime(name, ns=(atime_ns, _MTIME_NS), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise SysError(f"changing modification time of `{display}'", e.errno) from e


def canonicalise_timestamp_and_permissions(path: str) -> None:
    """Give one file canonical mode and mtime (not owner), without recursing or following."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise SysError(f"getting attributes of path `{path}'", e.errno) from e
    _fix_timestamp_and_permissions(path, path, None, st)


class _Canonicaliser:
    def __init__(self, from_uid: int | None, inodes_seen: set[tuple[int, int]]) -> None:
        self.from_uid = from_uid
        self.seen = inodes_seen
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def node(self, display: str, name: str, dir_fd: int | None, st: os.stat_result) -> bool:
        """Canonicalise one node; return True if it is a directory to descend into."""
        mode = st.st_mode
        is_dir = stat.S_ISDIR(mode)
        if not (is_dir or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UnsupportedFileType(display)
        if self.from_uid is not None and st.st_uid != self.from_uid:
            # Not produced by the build user: only acceptable for hard links to files of this
            # build's outputs that we already canonicalised (and chowned) ourselves.
            if is_dir or (st.st_dev, st.st_ino) not in self.seen:
                raise InvalidOwnership(display)
            return False
        self.seen.add((st.st_dev, st.st_ino))
        _fix_timestamp_and_permissions(display, name, dir_fd, st)
        if st.st_uid != self.euid:
            try:
                os.chown(name, self.euid, self.egid, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as e:
                raise SysError(f"changing owner of `{display}' to {self.euid}", e.errno) from e
        return is_dir

    def walk(self, top: str) -> None:
        try:
            st = os.lstat(top)
        except OSError as e:
            raise SysError(f"getting attributes of path `{top}'", e.errno) from e
        if not self.node(top, top, None, st):
            return
        # Stack of open directory descriptors with the entries still to visit; one descriptor
        # per level (the listing is read completely before descending, as upstream does).
        stack: list[tuple[int, str, Iterator[tuple[str, os.stat_result]]]] = []
        try:
            fd = self._open_dir(top, top, None)
            stack.append((fd, top, iter(self._list(fd, top))))
            while stack:
                dfd, ddisplay, entries = stack[-1]
                item = next(entries, None)
                if item is None:
                    stack.pop()
                    os.close(dfd)
                    continue
                name, cst = item
                child = f"{ddisplay}/{name}"
                if self.node(child, name, dfd, cst):
                    cfd = self._open_dir(child, name, dfd)
                    stack.append((cfd, child, iter(self._list(cfd, child))))
        finally:
            for dfd, _, _ in stack:
                os.close(dfd)

    @staticmethod
    def _open_dir(display: str, name: str, dir_fd: int | None) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            raise SysError(f"opening directory `{display}'", e.errno) from e

    @staticmethod
    def _list(fd: int, display: str) -> list[tuple[str, os.stat_result]]:
        result: list[tuple[str, os.stat_result]] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        result.append((entry.name, entry.stat(follow_symlinks=False)))
                    except OSError as e:
                        raise SysError(
                            f"getting attributes of path `{display}/{entry.name}'", e.errno
                        ) from e
        except SysError:
            raise
        except OSError as e:
            raise SysError(f"reading directory `{display}'", e.errno) from e
        return result


def canonicalise(
    path: str, *, uid: int | None = None, inodes_seen: set[tuple[int, int]] | None = None
) -> None:
    """Recursively give `path` canonical metadata (upstream `canonicalisePathMetaData`).

    `uid`: the build user whose files these must be (None: accept any owner).  A file owned by
    somebody else is only accepted if its (dev, inode) is in `inodes_seen`, i.e. a hard link to
    a file already canonicalised for the same build; pass one shared set for all outputs of a
    build.  Raises `UnsupportedFileType`, `InvalidOwnership`, `WrongTopLevelOwnership` or
    `SysError`.
    """
    seen = inodes_seen if inodes_seen is not None else set()
    walker = _Canonicaliser(uid, seen)
    walker.walk(path)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise SysError(f"getting attributes of path `{path}'", e.errno) from e
    if st.st_uid != walker.euid:
        raise WrongTopLevelOwnership(path)


def make_writable(path: str) -> None:
    """Add the owner-write bit to `path` (upstream `makeWritable` in `optimise-store.cc`)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise SysError(f"getting attributes of path `{path}'", e.errno) from e
    try:
        os.chmod(path, (st.st_mode | stat.S_IWUSR) & 0o7777)
    except OSError as e:
        raise SysError(f"changing writability of `{path}'", e.errno) from e


@contextlib.contextmanager
def writable_directory(path: str) -> Iterator[None]:
    """Make a store directory writable for the block, then restore mode 0555/0444 and mtime 1.

    Restoring errors are ignored, like upstream's `MakeReadOnly` destructor.
    """
    make_writable(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            canonicalise_timestamp_and_permissions(path)
