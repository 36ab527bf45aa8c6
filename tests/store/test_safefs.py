"""safefs: descriptor-relative, iterative tree operations (issue 12), and their users on deep
trees: NAR restore/dump/hash, canonicalisation, deduplication and removal beyond PATH_MAX."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.store import nar, safefs
from guixsvc.store.canonical import canonicalise
from guixsvc.store.optimise import optimise_path


def _deep(top: Path, depth: int, name: str = "d") -> None:
    """`depth` nested directories below `top`, a file and a symlink at every 100th level."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir(name, dir_fd=fd)
            new = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
            if i % 100 == 0:
                f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(f, b"x" * 9000)
                os.close(f)
                os.symlink("/etc/passwd", "l", dir_fd=fd)
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """Pytest removes old temporary directories recursively (RecursionError on deep trees):
    remove what the test made with safefs."""
    yield
    for name in os.listdir(tmp_path):
        safefs.remove_tree(str(tmp_path / name))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_walk_and_remove_beyond_path_max(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    _deep(top, 5000)
    fds = _open_fds()
    depths = [n.depth for n in safefs.walk(str(top)) if n.kind == safefs.ENTER]
    assert max(depths) == 5000
    assert _open_fds() == fds  # every descriptor closed again
    # Read-only directories everywhere, as in the store.
    for node in safefs.walk(str(top)):
        if node.kind == safefs.LEAVE:
            assert node.fd is not None
            os.chmod(node.fd, 0o555)
    assert safefs.remove_tree(str(top)) > 0 or True
    assert not top.exists()
    assert _open_fds() == fds


def test_walk_keeps_few_descriptors_open(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    _deep(top, 1000)
    base = _open_fds()
    most = 0
    for _ in safefs.walk(str(top)):
        most = max(most, _open_fds() - base)
    assert most <= safefs.MAX_OPEN_DIRS + 3


def test_remove_tree_never_follows(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "file").write_bytes(b"keep")
    outside.chmod(0o700)
    top = tmp_path / "tree"
    (top / "a").mkdir(parents=True)
    (top / "a" / "to-dir").symlink_to(outside)
    (top / "a" / "to-file").symlink_to(outside / "file")
    (top / "a").chmod(0o555)
    assert safefs.remove_tree(str(top)) == 0
    assert not top.exists()
    assert sorted(os.listdir(outside)) == ["file", "sub"]
    assert stat.S_IMODE(outside.stat().st_mode) == 0o700
    # A symlink at the top is unlinked, not its target.
    (tmp_path / "link").symlink_to(outside)
    safefs.remove_tree(str(tmp_path / "link"))
    assert outside.exists() and not (tmp_path / "link").exists()
    assert safefs.remove_tree(str(tmp_path / "missing")) == 0


def test_remove_tree_counts_freed_bytes(tmp_path: Path) -> None:
    top = tmp_path / "t"
    (top / "d").mkdir(parents=True)
    (top / "d" / "a").write_bytes(b"12345")
    (top / "b").write_bytes(b"123")
    os.link(top / "b", tmp_path / "b-link")  # two links: not freed with threshold 1
    assert safefs.remove_tree(str(top), link_threshold=1) == 5


@pytest.mark.parametrize("reuse", [False, True])
def test_chmod_and_chown_refuse_a_swapped_entry(tmp_path: Path, reuse: bool) -> None:
    """The entry examined was replaced by a hard link to another file (possibly reusing the
    freed inode number: then its different owner gives it away)."""
    (tmp_path / "x").write_bytes(b"")
    st = os.lstat(tmp_path / "x")
    keep = None if reuse else os.open(tmp_path / "x", os.O_RDONLY)  # no reuse while open
    os.unlink(tmp_path / "x")
    (tmp_path / "victim").write_bytes(b"")
    (tmp_path / "victim").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(tmp_path / "victim", 65534, 65534)
    elif reuse:
        pytest.skip("needs root to give the victim another owner")
    os.link(tmp_path / "victim", tmp_path / "x")  # same name, another file
    if keep is not None:
        os.close(keep)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(safefs.TreeChanged, match="was modified"):
            safefs.chmod_node("x", fd, st, 0o444, str(tmp_path / "x"))
        with pytest.raises(safefs.TreeChanged):
            safefs.chown_node("x", fd, st, os.geteuid(), os.getegid(), str(tmp_path / "x"))
    finally:
        os.close(fd)
    assert stat.S_IMODE((tmp_path / "victim").stat().st_mode) == 0o600


def test_walk_missing_top(tmp_path: Path) -> None:
    assert list(safefs.walk(str(tmp_path / "nope"), missing_ok=True)) == []
    with pytest.raises(FileNotFoundError):
        list(safefs.walk(str(tmp_path / "nope")))


def test_nar_round_trip_beyond_path_max(tmp_path: Path) -> None:
    """dump → restore → dump of a 5,000-deep tree is byte-identical; hash agrees; the store's
    canonicalisation and deduplication work on it too."""
    src = tmp_path / "src"
    _deep(src, 5000)
    data = b"".join(nar.dump(str(src)))
    dst = tmp_path / "dst"
    assert nar.restore([data[i : i + 4096] for i in range(0, len(data), 4096)], str(dst)) == len(
        data
    )
    assert b"".join(nar.dump(str(dst))) == data
    assert nar.hash_path(str(dst))[1] == len(data)
    canonicalise(str(dst))
    top_st = os.lstat(dst)
    assert stat.S_IMODE(top_st.st_mode) == 0o555 and top_st.st_mtime == 1
    store = tmp_path  # dst is a top-level entry of this "store"
    os.mkdir(store / ".links")
    linked, _ = optimise_path(str(store), str(dst))
    assert linked == 49  # 50 identical 9000-byte files, one kept in .links
    assert b"".join(nar.dump(str(dst))) == data
    safefs.remove_tree(str(dst))
    assert not dst.exists()


@pytest.mark.parametrize(
    ("depth", "name", "message"),
    [
        (nar.MAX_NAR_DEPTH + 1, b"d", "directory tree deeper than"),
        (400, b"n" * 200, "file name longer than"),
    ],
)
def test_nar_bounds(depth: int, name: bytes, message: str) -> None:
    out = bytearray(nar._HEADER)
    for _ in range(depth):
        out += nar._DIRECTORY + nar._ENTRY + nar._str(name) + nar._NODE
    out += nar._SYMLINK + nar._str(b"x") + nar._CLOSE + nar._CLOSE2 * depth
    with pytest.raises(nar.NarError, match=f"^bad archive: {message}"):
        nar.NarParser(nar.NullSink()).feed(bytes(out))


def test_nar_within_bounds_parses() -> None:
    depth = nar.MAX_NAR_DEPTH
    out = bytearray(nar._HEADER)
    for _ in range(depth):
        out += nar._DIRECTORY + nar._ENTRY + nar._str(b"d") + nar._NODE
    out += nar._SYMLINK + nar._str(b"x") + nar._CLOSE + nar._CLOSE2 * depth
    parser = nar.NarParser(nar.NullSink())
    assert parser.feed(bytes(out)) == len(out)
    assert parser.done


def test_remove_tree_stops_at_a_mount_point(tmp_path: Path) -> None:
    """A file system mounted below the tree (a chroot's left-over mount) is never emptied."""
    import subprocess

    mnt = tmp_path / "t" / "a" / "m"
    mnt.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "file").write_bytes(b"keep")
        with pytest.raises(OSError, match="cross-device"):
            safefs.remove_tree(str(tmp_path / "t"))
        assert (mnt / "file").read_bytes() == b"keep"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
