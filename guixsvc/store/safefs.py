"""File-descriptor-relative, iterative tree operations for trees an untrusted party may touch.

The store is group-writable by the build users, build outputs and chroots belong to build users
while the daemon works on them as root, and `guix gc` removes whatever the store holds.  Any
operation that names a file by a path under such a tree can be redirected: between the moment
the daemon looks at `a/b` and the moment it chmods, chowns or unlinks `a/b`, somebody may have
replaced `a` with a symlink to `/etc`.  Long paths are the other hazard: a tree 3,000 levels
deep has names longer than PATH_MAX, so every path-based system call fails with ENAMETOOLONG
and a recursive walk overflows Python's stack.

Every walk here therefore works relative to directory file descriptors opened with
`O_NOFOLLOW|O_DIRECTORY` (never by a path below the starting directory), never recurses, and
keeps a bounded number of descriptors open however deep the tree is: when it has to climb back
to a directory whose descriptor it closed, it opens `..` from the child and checks that it is
the very directory (device and inode) it left, failing with `TreeChanged` otherwise.  Changes
of mode and owner go through a descriptor of the object itself (`O_PATH|O_NOFOLLOW`, then the
`/proc/self/fd` link), so they can only ever reach the inode that was examined.

Public entry points: `walk` (events for a tree), `remove_tree` (delete a tree whatever its
permissions; the one deletion routine of the daemon, GC and build code), `open_dir`,
`open_parent`, `chmod_node`, `chown_node`, and `open_nofollow`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from guixsvc.store.locks import SysError

__all__ = [
    "DIR_FLAGS",
    "ENTER",
    "LEAF",
    "LEAVE",
    "Node",
    "TreeChanged",
    "chmod_node",
    "chown_node",
    "open_dir",
    "open_nofollow",
    "open_parent",
    "remove_tree",
    "walk",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC

#: Directory descriptors a walk keeps open at most; deeper levels are reopened through `..`.
MAX_OPEN_DIRS = 64

ENTER = 1  # a directory, before its entries (node.fd is the directory's own descriptor)
LEAVE = 2  # a directory, after its entries (node.fd is still the directory's descriptor)
LEAF = 3  # anything else: regular file, symlink, special file (node.fd is None)

_HAVE_PROC = os.path.isdir("/proc/self/fd")


class TreeChanged(SysError):
    """The tree was modified under the walk in a way that would make it unsafe to go on."""

    def __init__(self, path: str) -> None:
        super().__init__(f"directory `{path}' was modified during the operation", errno.ESTALE)


@dataclass
class Node:
    """One event of `walk`.  Descriptors are only valid until the walk resumes."""

    kind: int
    parent_fd: int  # descriptor of the directory holding `name`
    name: str  # name relative to parent_fd
    path: str  # display name (the starting path joined with the names below it)
    st: os.stat_result  # lstat of the entry (for directories: fstat of `fd`)
    fd: int | None  # the directory's own descriptor (ENTER/LEAVE), else None
    depth: int  # 0 for the top node


def open_dir(name: str | bytes, dir_fd: int | None, display: str) -> int:
    """Open directory `name` (relative to `dir_fd`) without following a symlink in its place."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise SysError(f"opening directory `{display}'", e.errno) from e


def open_parent(path: str) -> tuple[int, str]:
    """A descriptor of `path`'s parent directory and `path`'s last component.

    The parent is the trusted prefix (store directory, state directory, a temporary directory
    the daemon created), so its own path may be followed normally.
    """
    path = path.rstrip("/") or "/"
    parent, _, name = path.rpartition("/")
    if not name or name in (".", ".."):
        raise SysError(f"invalid file name `{path}'", errno.EINVAL)
    try:
        fd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SysError(f"opening directory `{parent or '/'}'", e.errno) from e
    return fd, name


def open_nofollow(name: str | bytes, dir_fd: int | None, flags: int = os.O_RDONLY) -> int:
    """`openat(dir_fd, name, flags|O_NOFOLLOW|O_CLOEXEC|O_NOCTTY|O_NONBLOCK)`.

    O_NONBLOCK keeps a FIFO planted in place of a file from blocking the daemon; it has no
    effect on regular files.
    """
    return os.open(
        name,
        flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
        dir_fd=dir_fd,
    )


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_dev == b.st_dev and a.st_ino == b.st_ino


@contextlib.contextmanager
def _path_fd(name: str, dir_fd: int, st: os.stat_result, display: str) -> Iterator[int]:
    """An O_PATH descriptor of entry `name`, checked to be the inode `st` describes."""
    try:
        fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise SysError(f"opening `{display}'", e.errno) from e
    try:
        cur = os.fstat(fd)
        # Device and inode, and (should the inode number have been reused after the entry was
        # replaced) file type and owner must be those that were examined.
        if (
            not _same(cur, st)
            or stat.S_IFMT(cur.st_mode) != stat.S_IFMT(st.st_mode)
            or cur.st_uid != st.st_uid
        ):
            raise TreeChanged(display)
        yield fd
    finally:
        os.close(fd)


def chmod_node(
    name: str, dir_fd: int, st: os.stat_result, mode: int, display: str, *, fd: int | None = None
) -> None:
    """Set the permission bits of the entry `name` that `st` describes, never following links.

    `fd` may be a descriptor of the object itself (directories).  Otherwise the entry is opened
    with O_PATH|O_NOFOLLOW and checked against `st`; the change then goes through its
    `/proc/self/fd` link, which can only reach that inode.  Symlinks have no mode of their own.
    """
    if stat.S_ISLNK(st.st_mode):
        return
    try:
        if fd is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(fd, mode & 0o7777)
            return
        if not _HAVE_PROC:  # pragma: no cover - Linux always has /proc in our deployments
            os.chmod(name, mode & 0o7777, dir_fd=dir_fd)
            return
        with _path_fd(name, dir_fd, st, display) as pfd:
            os.chmod(f"/proc/self/fd/{pfd}", mode & 0o7777)
    except SysError:
        raise
    except OSError as e:
        raise SysError(f"changing mode of `{display}' to {mode & 0o7777:o}", e.errno) from e


def chown_node(
    name: str, dir_fd: int, st: os.stat_result, uid: int, gid: int, display: str
) -> None:
    """Change the owner of entry `name` (the inode `st` describes), never following links.

    `fchownat(AT_SYMLINK_NOFOLLOW)` only ever changes the entry itself; the inode check makes
    sure a swapped entry (a hard link to something else) is not touched either.
    """
    try:
        if stat.S_ISLNK(st.st_mode) or not _HAVE_PROC:
            cur = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not _same(cur, st):
                raise TreeChanged(display)
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            return
        with _path_fd(name, dir_fd, st, display) as pfd:
            os.chown(f"/proc/self/fd/{pfd}", uid, gid)
    except SysError:
        raise
    except OSError as e:
        raise SysError(f"changing owner of `{display}' to {uid}", e.errno) from e


class _Level:
    __slots__ = ("entries", "fd", "name", "path", "st")

    def __init__(
        self, fd: int, name: str, path: str, st: os.stat_result, entries: list[str]
    ) -> None:
        self.fd = fd  # -1 while closed (reopened through `..` of the level below)
        self.name = name
        self.path = path
        self.st = st
        self.entries = entries  # remaining names, in reverse order (pop from the end)


def _list(fd: int, display: str, sort: bool) -> list[str]:
    try:
        with os.scandir(fd) as it:
            names = [entry.name for entry in it]
    except OSError as e:
        raise SysError(f"reading directory `{display}'", e.errno) from e
    if sort:
        names.sort(key=os.fsencode)
    names.reverse()
    return names


def _lstat(name: str, dir_fd: int | None, display: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SysError(f"getting attributes of path `{display}'", e.errno) from e


def walk(
    path: str | None = None,
    *,
    dir_fd: int | None = None,
    name: str | None = None,
    sort: bool = False,
    missing_ok: bool = False,
    fix_access: bool = False,
) -> Iterator[Node]:
    """Walk a tree in pre-order (ENTER), post-order (LEAVE) and leaves (LEAF), without recursion.

    The tree is `path`, or entry `name` of the directory `dir_fd` (then `path`, if given, is
    only the display name).  `sort` sorts each directory bytewise (NAR order).  An entry that
    vanishes during the walk is skipped; the top node missing yields nothing if `missing_ok`,
    else raises FileNotFoundError.  A directory replaced by something else between its lstat and
    its opening is reported as what it now is; a directory moved away from under the walk
    raises TreeChanged.  At most MAX_OPEN_DIRS + 2 descriptors are open at a time.
    `fix_access` gives u+rwx to directories the daemon may not open (removal as non-root).
    """
    own_parent = False
    if dir_fd is None:
        if path is None:
            raise ValueError("walk needs a path or a dir_fd and name")
        dir_fd, name = open_parent(path)
        own_parent = True
    elif name is None:
        raise ValueError("walk with dir_fd needs a name")
    display = path if path is not None else name
    levels: list[_Level] = []
    try:
        st = _lstat(name, dir_fd, display)
        if st is None:
            if missing_ok:
                return
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), display)
        yield from _walk_from(dir_fd, name, display, st, sort, fix_access, levels, missing_ok)
    finally:
        for level in levels:
            if level.fd >= 0:
                os.close(level.fd)
        if own_parent:
            os.close(dir_fd)


def _enter(
    parent_fd: int, name: str, display: str, fix_access: bool
) -> tuple[int | None, os.stat_result | None]:
    """Open directory entry `name`; returns (fd, fstat) or (None, new lstat) if it is no longer
    a directory (None, None if it vanished).  With `fix_access`, a directory we may not read
    gets u+rwx first (through an O_PATH descriptor checked to be a directory)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            return None, _lstat(name, parent_fd, display)
        if not (fix_access and e.errno == errno.EACCES and _HAVE_PROC):
            raise SysError(f"opening directory `{display}'", e.errno) from e
        try:
            pfd = os.open(name, _PATH_FLAGS, dir_fd=parent_fd)
        except OSError as e2:
            raise SysError(f"opening directory `{display}'", e2.errno) from e2
        try:
            pst = os.fstat(pfd)
            if not stat.S_ISDIR(pst.st_mode):
                return None, pst
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(pst.st_mode) | 0o700)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e2:
            raise SysError(f"making `{display}' writable", e2.errno) from e2
        finally:
            os.close(pfd)
    return fd, os.fstat(fd)


def _walk_from(
    top_parent: int,
    top_name: str,
    top_display: str,
    top_st: os.stat_result,
    sort: bool,
    fix_access: bool,
    levels: list[_Level],
    missing_ok: bool,
) -> Iterator[Node]:
    if not stat.S_ISDIR(top_st.st_mode):
        yield Node(LEAF, top_parent, top_name, top_display, top_st, None, 0)
        return
    fd, st = _enter(top_parent, top_name, top_display, fix_access)
    if fd is None:
        if st is not None:
            yield Node(LEAF, top_parent, top_name, top_display, st, None, 0)
            return
        if missing_ok:
            return
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), top_display)
    assert st is not None
    levels.append(_Level(fd, top_name, top_display, st, []))
    yield Node(ENTER, top_parent, top_name, top_display, st, fd, 0)
    levels[-1].entries = _list(fd, top_display, sort)
    while levels:
        cur = levels[-1]
        depth = len(levels) - 1
        if cur.entries:
            child = cur.entries.pop()
            cdisplay = f"{cur.path}/{child}"
            cst = _lstat(child, cur.fd, cdisplay)
            if cst is None:
                continue
            if not stat.S_ISDIR(cst.st_mode):
                yield Node(LEAF, cur.fd, child, cdisplay, cst, None, depth + 1)
                continue
            cfd, nst = _enter(cur.fd, child, cdisplay, fix_access)
            if cfd is None:
                if nst is not None:
                    yield Node(LEAF, cur.fd, child, cdisplay, nst, None, depth + 1)
                continue
            assert nst is not None
            levels.append(_Level(cfd, child, cdisplay, nst, []))
            # Bound the open descriptors: the top level and the last MAX_OPEN_DIRS stay open.
            victim = len(levels) - 1 - MAX_OPEN_DIRS
            if victim >= 1 and levels[victim].fd >= 0:
                os.close(levels[victim].fd)
                levels[victim].fd = -1
            yield Node(ENTER, cur.fd, child, cdisplay, nst, cfd, depth + 1)
            levels[-1].entries = _list(cfd, cdisplay, sort)
            continue
        # Directory finished: make sure its parent is open, report LEAVE, close it.
        levels.pop()
        try:
            if levels:
                parent = levels[-1]
                if parent.fd < 0:
                    try:
                        pfd = os.open("..", DIR_FLAGS, dir_fd=cur.fd)
                    except OSError as e:
                        raise SysError(f"opening directory `{parent.path}'", e.errno) from e
                    if not _same(os.fstat(pfd), parent.st):
                        os.close(pfd)
                        raise TreeChanged(parent.path)
                    parent.fd = pfd
                pfd_now = parent.fd
            else:
                pfd_now = top_parent
            yield Node(LEAVE, pfd_now, cur.name, cur.path, cur.st, cur.fd, len(levels))
        finally:
            os.close(cur.fd)


def _unlink_entry(name: str, dir_fd: int, display: str) -> bool:
    """Unlink a non-directory; False if it turned out to be a directory (swapped in)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        return False
    except OSError as e:
        if e.errno == errno.EPERM:
            # Linux reports EISDIR, but POSIX allows EPERM for a directory.
            st = _lstat(name, dir_fd, display)
            if st is not None and stat.S_ISDIR(st.st_mode):
                return False
        raise SysError(f"cannot unlink `{display}'", e.errno) from e
    return True


def remove_tree(
    path: str | None = None,
    *,
    dir_fd: int | None = None,
    name: str | None = None,
    link_threshold: int = -1,
    retries: int = 8,
) -> int:
    """Delete the tree at `path` (or entry `name` of directory `dir_fd`) whatever its modes.

    Never follows a symlink: every directory is opened with O_NOFOLLOW relative to its parent's
    descriptor, made writable through its own descriptor, emptied with `unlinkat` and removed
    with `unlinkat(AT_REMOVEDIR)` from its parent.  A symlink is removed, never its target;
    no path longer than one name is ever given to the kernel, so any depth works.  Entries
    swapped or added concurrently are dealt with by retrying (at most `retries` times).
    Never descends into another file system (a mount point below the top fails with EXDEV).
    A missing tree frees nothing.  Returns the total size of the removed non-directories with
    at most `link_threshold` hard links (upstream `_deletePath`'s bytesFreed); raises SysError.
    """
    if dir_fd is None:
        if path is None:
            raise ValueError("remove_tree needs a path or a dir_fd and name")
        pfd, name = open_parent(path)
        try:
            return _remove(pfd, name, path, link_threshold, retries)
        finally:
            os.close(pfd)
    if name is None:
        raise ValueError("remove_tree with dir_fd needs a name")
    return _remove(dir_fd, name, path if path is not None else name, link_threshold, retries)


def _remove(parent_fd: int, name: str, display: str, link_threshold: int, retries: int) -> int:
    freed = 0
    for _attempt in range(retries + 1):
        again = False
        top_dev: int | None = None
        for node in walk(display, dir_fd=parent_fd, name=name, missing_ok=True, fix_access=True):
            if node.kind == ENTER:
                assert node.fd is not None
                if top_dev is None:
                    top_dev = node.st.st_dev
                elif node.st.st_dev != top_dev:
                    # A mount point (a chroot's bind mount left behind, say): never delete
                    # another file system's contents.
                    raise SysError(f"cannot unlink `{node.path}'", errno.EXDEV)
                mode = stat.S_IMODE(node.st.st_mode)
                if mode & 0o700 != 0o700:
                    try:
                        os.chmod(node.fd, mode | 0o700)
                    except OSError as e:
                        raise SysError(f"making `{node.path}' writable", e.errno) from e
            elif node.kind == LEAF:
                if _unlink_entry(node.name, node.parent_fd, node.path):
                    if node.st.st_nlink <= link_threshold:
                        freed += node.st.st_size
                else:
                    again = True  # a directory appeared in its place: next round
            else:
                try:
                    os.rmdir(node.name, dir_fd=node.parent_fd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        again = True  # something was added meanwhile: next round
                    else:
                        raise SysError(f"cannot unlink `{node.path}'", e.errno) from e
        if not again:
            return freed
    raise SysError(f"cannot unlink `{display}'", errno.ENOTEMPTY)
