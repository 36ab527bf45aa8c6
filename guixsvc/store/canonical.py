"""Canonical metadata of store items (upstream `canonicalisePathMetaData`, `local-store.cc`).

Everything that enters the store is normalised so that its metadata carries no information: every
non-symlink gets mode 0444 or 0555 (0555 when the owner-execute bit was set), every file an mtime of
1 (one second after the epoch, atime kept), and the owner becomes the daemon's effective uid/gid.
Only regular files, directories and symlinks are allowed.  Symlinks are never followed.

The walk is `safefs.walk`: relative to directory descriptors opened with `O_NOFOLLOW`, iterative
(any depth), and every mode/owner change goes through a descriptor of the very inode that was
examined, so a build user racing the daemon cannot redirect it outside the output.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from guixsvc.store.locks import SysError
from guixsvc.store.safefs import LEAVE, Node, chmod_node, chown_node, open_parent, walk

__all__ = [
    "MTIME_STORE",
    "CanonicalisationError",
    "InvalidOwnership",
    "UnsupportedFileType",
    "WrongTopLevelOwnership",
    "canonicalise",
    "canonicalise_fd",
    "canonicalise_timestamp_and_permissions",
    "make_writable",
    "writable_directory",
]

#: Modification time of every store file: one second into the epoch.
MTIME_STORE = 1
_MTIME_NS = MTIME_STORE * 1_000_000_000
_NS = 1_000_000_000


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
    display: str, name: str, dir_fd: int, st: os.stat_result, fd: int | None = None
) -> None:
    """Canonical mode and mtime for entry `name` of `dir_fd` (the inode `st` describes).

    Changes go through a descriptor of the object (`fd`, or an O_PATH|O_NOFOLLOW one checked
    against `st`), so a concurrently swapped entry can never redirect them.
    """
    mode = st.st_mode
    if not stat.S_ISLNK(mode):
        perm = mode & 0o7777
        if perm not in (0o444, 0o555):
            new = 0o444 | (0o111 if mode & stat.S_IXUSR else 0)
            chmod_node(name, dir_fd, st, new, display, fd=fd)
    # Upstream compares whole seconds (st_mtime is a time_t) and keeps the atime seconds.
    if st.st_mtime_ns // _NS != MTIME_STORE:
        atime_ns = (st.st_atime_ns // _NS) * _NS
        try:
            if fd is not None:
                os.utime(fd, ns=(atime_ns, _MTIME_NS))
            else:
                # utimensat(AT_SYMLINK_NOFOLLOW) only ever touches the entry itself.
                os.utime(name, ns=(atime_ns, _MTIME_NS), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise SysError(f"changing modification time of `{display}'", e.errno) from e


def canonicalise_timestamp_and_permissions(path: str) -> None:
    """Give one file canonical mode and mtime (not owner), without recursing or following."""
    pfd, name = open_parent(path)
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            raise SysError(f"getting attributes of path `{path}'", e.errno) from e
        _fix_timestamp_and_permissions(path, name, pfd, st)
    finally:
        os.close(pfd)


def canonicalise_fd(fd: int, display: str) -> None:
    """Canonical mode and mtime (not owner) for the object open as `fd` (e.g. a directory)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise SysError(f"getting attributes of path `{display}'", e.errno) from e
    _fix_timestamp_and_permissions(display, "", -1, st, fd)


class _Canonicaliser:
    def __init__(self, from_uid: int | None, inodes_seen: set[tuple[int, int]]) -> None:
        self.from_uid = from_uid
        self.seen = inodes_seen
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def node(self, node: Node) -> None:
        """Canonicalise one node (directories on ENTER, through their own descriptor)."""
        st, display = node.st, node.path
        mode = st.st_mode
        is_dir = stat.S_ISDIR(mode)
        if not (is_dir or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UnsupportedFileType(display)
        if self.from_uid is not None and st.st_uid != self.from_uid:
            # Not produced by the build user: only acceptable for hard links to files of this
            # build's outputs that we already canonicalised (and chowned) ourselves.
            if is_dir or (st.st_dev, st.st_ino) not in self.seen:
                raise InvalidOwnership(display)
            return
        self.seen.add((st.st_dev, st.st_ino))
        _fix_timestamp_and_permissions(display, node.name, node.parent_fd, st, node.fd)
        if st.st_uid != self.euid:
            if node.fd is not None:
                try:
                    os.chown(node.fd, self.euid, self.egid)
                except OSError as e:
                    raise SysError(f"changing owner of `{display}' to {self.euid}", e.errno) from e
            else:
                chown_node(node.name, node.parent_fd, st, self.euid, self.egid, display)

    def walk(self, top: str) -> os.stat_result:
        """Canonicalise the tree; return the top node's final attributes."""
        top_st: os.stat_result | None = None
        for node in walk(top):
            if node.kind == LEAVE:
                continue
            self.node(node)
            if node.depth == 0:
                top_st = (
                    os.fstat(node.fd)
                    if node.fd is not None
                    else os.stat(node.name, dir_fd=node.parent_fd, follow_symlinks=False)
                )
        assert top_st is not None
        return top_st


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
    st = walker.walk(path)
    if st.st_uid != walker.euid:
        raise WrongTopLevelOwnership(path)


def make_writable(path: str) -> None:
    """Add the owner-write bit to `path` (upstream `makeWritable` in `optimise-store.cc`).

    A symlink is left alone (it has no mode of its own, and its target must not be touched).
    """
    pfd, name = open_parent(path)
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            raise SysError(f"getting attributes of path `{path}'", e.errno) from e
        try:
            chmod_node(name, pfd, st, (st.st_mode | stat.S_IWUSR) & 0o7777, path)
        except SysError as e:
            raise SysError(f"changing writability of `{path}'", e.errno) from e
    finally:
        os.close(pfd)


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
