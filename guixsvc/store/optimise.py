"""Store deduplication through the `<store>/.links` pool (upstream `optimise-store.cc`).

Identical regular files of at least 8192 bytes are replaced by hard links to one inode kept in
`<store>/.links/<key>`, where the key is the nix-base32 SHA-256 of the file's NAR serialisation
(so the executable bit is part of it).  The layout must match upstream exactly: the collector of
either implementation removes `.links` entries whose link count dropped to 1, and the keys of one
must be found by the other.

The NAR serialisation of a single regular file is hashed here directly (header tokens, the
contents streamed in large chunks, padding, closing token), without building the archive.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from guixsvc.store import base32, nar
from guixsvc.store.canonical import canonicalise_fd
from guixsvc.store.locks import (
    LVL_CHATTY,
    LVL_DEBUG,
    LVL_ERROR,
    LVL_INFO,
    LVL_TALKATIVE,
    MessageLog,
    SysError,
    emit,
)
from guixsvc.store.safefs import LEAF, Node, TreeChanged, open_nofollow, open_parent, walk

__all__ = [
    "DEDUPLICATION_MIN_SIZE",
    "LINKS_DIR",
    "OptimiseStats",
    "format_optimise_summary",
    "load_inode_hash",
    "nar_hash_regular_file",
    "optimise_path",
    "optimise_store",
]

#: Files smaller than this are never deduplicated (upstream `deduplicationMinSize`).
DEDUPLICATION_MIN_SIZE = 8192
LINKS_DIR = ".links"


def nar_hash_regular_file(path: str) -> bytes:
    """SHA-256 of the NAR serialisation of the regular file `path` (symlinks not followed):
    the `.links` key, so the executable bit is part of it."""
    pfd, name = open_parent(path)
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            raise SysError(f"opening file `{path}'", e.errno) from e
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"`{path}' is not a regular file")
        return _hash_regular(name, pfd, st, path)
    finally:
        os.close(pfd)


def _hash_regular(name: str, dir_fd: int, st: os.stat_result, display: str) -> bytes:
    """The `.links` key of entry `name` of `dir_fd`, read through an O_NOFOLLOW descriptor that
    must be the inode `st` describes."""
    try:
        fd = open_nofollow(name, dir_fd)
    except OSError as e:
        raise SysError(f"opening file `{display}'", e.errno) from e
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise TreeChanged(display)
        size = fst.st_size
        hasher = hashlib.sha256(nar.regular_prefix(bool(fst.st_mode & stat.S_IXUSR), size))
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise OSError(errno.EIO, f"reading file `{display}': unexpected end-of-file")
            hasher.update(chunk)
            left -= len(chunk)
        hasher.update(nar.regular_suffix(size))
        return hasher.digest()
    except SysError:
        raise
    except OSError as e:
        if e.errno == errno.EIO and e.strerror and e.strerror.startswith("reading"):
            raise
        raise SysError(f"reading file `{display}'", e.errno) from e
    finally:
        os.close(fd)


@dataclass
class OptimiseStats:
    files_linked: int = 0
    bytes_freed: int = 0
    blocks_freed: int = 0


def format_optimise_summary(stats: OptimiseStats) -> str:
    """Upstream's closing line of `optimiseStore`: `X.XX MiB freed by hard-linking N files`."""
    mib = stats.bytes_freed / (1024.0 * 1024.0)
    return f"{mib:.2f} MiB freed by hard-linking {stats.files_linked} files"


def load_inode_hash(store_dir: str) -> set[int]:
    """Inode numbers of every entry of `<store>/.links` (files already in the pool)."""
    links = f"{store_dir}/{LINKS_DIR}"
    try:
        with os.scandir(links) as it:
            return {entry.inode() for entry in it}
    except OSError as e:
        raise SysError(f"opening directory `{links}'", e.errno) from e


def _is_store_path(path: str, store_dir: str) -> bool:
    n = len(store_dir)
    return (
        path.startswith(store_dir)
        and len(path) >= n + 2
        and path[n] == "/"
        and path.find("/", n + 1) < 0
    )


class _Optimiser:
    def __init__(
        self, store_dir: str, inode_hash: set[int], stats: OptimiseStats, log: MessageLog | None
    ) -> None:
        self.store_dir = store_dir
        self.links_dir = f"{store_dir}/{LINKS_DIR}"
        self.inode_hash = inode_hash
        self.stats = stats
        self.log = log

    def path(self, top: str) -> None:
        """Deduplicate the regular files of the tree `top` (through `safefs.walk`: directory
        descriptors, no symlink followed, any depth)."""
        for node in walk(top):
            if node.kind != LEAF:
                continue
            if node.depth and node.st.st_ino in self.inode_hash:
                # Entries whose inode is already in .links need no work at all.
                emit(self.log, LVL_DEBUG, f"`{node.name}' is already linked")
                continue
            self.file(node)

    def file(self, node: Node) -> None:
        st, path = node.st, node.path
        if not stat.S_ISREG(st.st_mode) or st.st_size < DEDUPLICATION_MIN_SIZE:
            return
        if st.st_mode & stat.S_IWUSR:
            emit(self.log, LVL_ERROR, f"skipping suspicious writable file `{path}'")
            return
        if st.st_nlink > 1 and st.st_ino in self.inode_hash:
            emit(
                self.log,
                LVL_DEBUG,
                f"`{path}' is already linked, with {st.st_nlink - 2} other file(s).",
            )
            return

        digest = _hash_regular(node.name, node.parent_fd, st, path)
        link_path = f"{self.links_dir}/{base32.encode(digest)}"

        while True:
            if not os.path.lexists(link_path):
                try:
                    os.link(
                        node.name,
                        link_path,
                        src_dir_fd=node.parent_fd,
                        follow_symlinks=False,
                    )
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        # ext4's directory index is probably full: skip deduplicating this file.
                        emit(
                            self.log,
                            LVL_INFO,
                            f"cannot link `{link_path}' to `{path}': {os.strerror(e.errno)}",
                        )
                        return
                    if e.errno != errno.EEXIST:
                        raise SysError(f"cannot link `{link_path}' to `{path}'", e.errno) from e
                    # Somebody else created it first: use theirs.
                else:
                    self.inode_hash.add(st.st_ino)
                    return
            try:
                st_link = os.lstat(link_path)
            except OSError as e:
                raise SysError(f"getting attributes of path `{link_path}'", e.errno) from e
            if st.st_ino == st_link.st_ino:
                emit(self.log, LVL_DEBUG, f"`{path}' is already linked to `{link_path}'")
                return
            if st.st_size != st_link.st_size:
                emit(self.log, LVL_ERROR, f"removing corrupted link ‘{link_path}’")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link_path)
                continue
            break

        emit(self.log, LVL_TALKATIVE, f"linking ‘{path}’ to ‘{link_path}’")
        if self._replace(node, link_path):
            self.stats.files_linked += 1
            self.stats.bytes_freed += st.st_size
            self.stats.blocks_freed += st.st_blocks

    def _replace(self, node: Node, link_path: str) -> bool:
        st, path, pfd = node.st, node.path, node.parent_fd
        # The containing directory is read-only (0555) unless it is the store itself; it is
        # made writable (and restored) through its own descriptor.
        must_toggle = node.depth > 0
        if must_toggle:
            try:
                pst = os.fstat(pfd)
                os.chmod(pfd, stat.S_IMODE(pst.st_mode) | stat.S_IWUSR)
            except OSError as e:
                raise SysError(f"changing writability of `{os.path.dirname(path)}'", e.errno) from e
        try:
            temp = f"{self.store_dir}/.tmp-link-{os.getpid()}-{random.randrange(1 << 31)}"
            try:
                os.link(link_path, temp, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.EMLINK:
                    # Too many links to one inode (likely with small common files): ignore.
                    if st.st_size:
                        emit(self.log, LVL_INFO, f"`{link_path}' has maximum number of links")
                    return False
                raise SysError(f"cannot link `{temp}' to `{link_path}'", e.errno) from e
            try:
                os.rename(temp, node.name, dst_dir_fd=pfd)
            except OSError as e:
                try:
                    os.unlink(temp)
                except OSError:
                    emit(self.log, LVL_ERROR, f"unable to unlink `{temp}'")
                if e.errno == errno.EMLINK:
                    if st.st_size:
                        emit(self.log, LVL_INFO, f"`{link_path}' has maximum number of links")
                    return False
                raise SysError(f"cannot rename `{temp}' to `{path}'", e.errno) from e
            return True
        finally:
            if must_toggle:
                with contextlib.suppress(OSError):
                    canonicalise_fd(pfd, os.path.dirname(path))


def _ensure_links_dir(store_dir: str) -> None:
    links = f"{store_dir}/{LINKS_DIR}"
    try:
        os.mkdir(links)
    except FileExistsError:
        pass
    except OSError as e:
        raise SysError(f"creating directory `{links}'", e.errno) from e


def optimise_path(
    store_dir: str,
    path: str,
    *,
    inode_hash: set[int] | None = None,
    stats: OptimiseStats | None = None,
    log: MessageLog | None = None,
) -> tuple[int, int]:
    """Deduplicate the files of one store item (after adding it).

    Returns `(files_linked, bytes_freed)`.  Upstream starts each such call with an empty inode
    set, which is the default here; `stats`, if given, is updated too.
    """
    _ensure_links_dir(store_dir)
    own = OptimiseStats()
    _Optimiser(store_dir, inode_hash if inode_hash is not None else set(), own, log).path(path)
    if stats is not None:
        stats.files_linked += own.files_linked
        stats.bytes_freed += own.bytes_freed
        stats.blocks_freed += own.blocks_freed
    return own.files_linked, own.bytes_freed


def optimise_store(
    store_dir: str,
    paths: Iterable[str],
    *,
    before_path: Callable[[str], bool] | None = None,
    stats: OptimiseStats | None = None,
    log: MessageLog | None = None,
) -> tuple[int, int]:
    """Deduplicate every item of `paths` (OptimiseStore, RPC 34); returns `(bytes_freed,
    files_linked)`.

    Upstream adds each path as a temp root and skips it if it is no longer valid; do that in
    `before_path(path) -> bool` (return False to skip).  The `.links` inodes are loaded once.
    """
    _ensure_links_dir(store_dir)
    own = OptimiseStats()
    optimiser = _Optimiser(store_dir, load_inode_hash(store_dir), own, log)
    try:
        for path in paths:
            if before_path is not None and not before_path(path):
                continue  # probably collected meanwhile
            emit(log, LVL_CHATTY, f"hashing files in `{path}'")
            optimiser.path(path)
    finally:
        if stats is not None:
            stats.files_linked += own.files_linked
            stats.bytes_freed += own.bytes_freed
            stats.blocks_freed += own.blocks_freed
    return own.bytes_freed, own.files_linked
