"""Tests for guixsvc.store.canonical: canonical modes, mtime 1 and ownership (store.md §8).

Checked with real files (as root: foreign owners via lchown, device nodes, FIFOs), and against
Nix (`nix-store --add` applies the same canonicalisation rule) where it is installed.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from guixsvc.store.canonical import (
    InvalidOwnership,
    UnsupportedFileType,
    canonicalise,
    canonicalise_timestamp_and_permissions,
    make_writable,
    writable_directory,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")


def _expected_mode(mode: int) -> int:
    perm = mode & 0o7777
    if perm in (0o444, 0o555):
        return perm
    return 0o444 | (0o111 if mode & stat.S_IXUSR else 0)


def _all_nodes(top: Path) -> list[Path]:
    out = [top]
    for dirpath, dirnames, filenames in os.walk(top):
        out += [Path(dirpath, n) for n in dirnames + filenames]
    return out


def _build_tree(top: Path, outside: Path) -> dict[Path, int]:
    """A tree with assorted modes; returns the original mode of every non-symlink."""
    modes: dict[Path, int] = {}
    top.mkdir()
    specs = {
        "plain": 0o644,
        "exec": 0o755,
        "owner-x-only": 0o100,
        "group-x-only": 0o610,
        "setuid": 0o4755,
        "already-444": 0o444,
        "already-555": 0o555,
        "odd-511": 0o511,
        "nothing": 0o000,
    }
    (top / "sub" / "deep").mkdir(parents=True)
    for name, mode in specs.items():
        for d in (top, top / "sub" / "deep"):
            f = d / name
            f.write_text(name)
            os.chmod(f, mode)
    for d, mode in ((top / "sub", 0o700), (top / "sub" / "deep", 0o1777), (top, 0o750)):
        os.chmod(d, mode)
    for p in _all_nodes(top):
        if not p.is_symlink():
            modes[p] = p.lstat().st_mode
    outside.write_text("outside")
    os.chmod(outside, 0o640)
    os.utime(outside, (1000, 2000))
    os.symlink(str(outside), top / "sub" / "link-out")
    os.symlink("/nonexistent/dangling", top / "dangling")
    os.symlink(str(outside.parent), top / "link-to-dir")
    return modes


def test_canonicalise_modes_and_mtimes(tmp_path: Path) -> None:
    top = tmp_path / "item"
    outside = tmp_path / "outside"
    modes = _build_tree(top, outside)
    canonicalise(str(top))
    for p in _all_nodes(top):
        st = p.lstat()
        assert st.st_mtime == 1, p
        assert st.st_mtime_ns == 1_000_000_000, p
        assert st.st_uid == os.geteuid()
        # The atime is not checked: on a relatime mount reading the tree may move it across a
        # second boundary, and canonicalise promises nothing about it but "kept".
        if stat.S_ISLNK(st.st_mode):
            continue
        assert stat.S_IMODE(st.st_mode) == _expected_mode(modes[p]), (p, oct(modes[p]))
    # Symlinks were not followed: the outside target is untouched.
    st = outside.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 2000
    assert stat.S_IMODE((top / "sub" / "deep" / "setuid").stat().st_mode) == 0o555
    assert stat.S_IMODE((top / "group-x-only").stat().st_mode) == 0o444
    assert stat.S_IMODE((top / "sub").stat().st_mode) == 0o555
    assert stat.S_IMODE((top / "sub" / "deep").stat().st_mode) == 0o555


@root_only
def test_canonicalise_changes_foreign_owner_only(tmp_path: Path) -> None:
    top = tmp_path / "item"
    (top / "d").mkdir(parents=True)
    foreign = top / "d" / "foreign"
    mine_other_group = top / "mine"
    foreign.write_text("x")
    mine_other_group.write_text("y")
    os.symlink("target", top / "d" / "link")
    for p in (top, top / "d", foreign, top / "d" / "link"):
        os.lchown(p, 1234, 5678)
    os.lchown(mine_other_group, os.geteuid(), 4321)
    canonicalise(str(top))
    for p in (top, top / "d", foreign, top / "d" / "link"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), p
    # Owner already the daemon's: the group is left alone.
    assert mine_other_group.lstat().st_gid == 4321


def test_canonicalise_symlink_top_level(tmp_path: Path) -> None:
    link = tmp_path / "item"
    os.symlink("/somewhere", link)
    canonicalise(str(link))
    assert link.lstat().st_mtime == 1


def test_canonicalise_regular_file_top_level(tmp_path: Path) -> None:
    f = tmp_path / "item"
    f.write_text("x")
    os.chmod(f, 0o775)
    canonicalise(str(f))
    st = f.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime == 1


def test_unsupported_types(tmp_path: Path) -> None:
    top = tmp_path / "item"
    top.mkdir()
    fifo = top / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFileType) as info:
        canonicalise(str(top))
    assert str(info.value) == f"file ‘{fifo}’ has an unsupported type"
    os.unlink(fifo)

    sock_path = top / "sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        with pytest.raises(UnsupportedFileType):
            canonicalise(str(top))
    finally:
        s.close()
        os.unlink(sock_path)


@root_only
def test_device_node_rejected(tmp_path: Path) -> None:
    top = tmp_path / "item"
    top.mkdir()
    os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(UnsupportedFileType, match="has an unsupported type"):
        canonicalise(str(top))


@root_only
def test_build_user_ownership_checks(tmp_path: Path) -> None:
    build_uid = 30001
    top = tmp_path / "out"
    top.mkdir()
    (top / "f").write_text("f")
    os.link(top / "f", top / "hardlink")
    (top / "g").write_text("g")
    for p in (top, top / "f", top / "g"):
        os.lchown(p, build_uid, 30000)
    seen: set[tuple[int, int]] = set()
    # A hard link within the output: whichever name comes second has already been chowned to us,
    # but its inode was seen, so it is accepted.
    canonicalise(str(top), uid=build_uid, inodes_seen=seen)
    assert (top / "hardlink").lstat().st_uid == os.geteuid()
    assert (os.lstat(top / "f").st_dev, os.lstat(top / "f").st_ino) in seen

    # A file of somebody else (e.g. `ln /etc/shadow $out/x`) is rejected.
    top2 = tmp_path / "out2"
    top2.mkdir()
    (top2 / "stolen").write_text("secret")
    os.lchown(top2, build_uid, 30000)
    os.lchown(top2 / "stolen", 4242, 4242)
    with pytest.raises(InvalidOwnership) as info:
        canonicalise(str(top2), uid=build_uid)
    assert str(info.value) == f"invalid ownership on file `{top2}/stolen'"
    # ... unless it is a hard link to a file already seen in this build's outputs.
    os.unlink(top2 / "stolen")
    os.link(top / "g", top2 / "g-again")
    os.lchown(top2, build_uid, 30000)  # the failed attempt already chowned the directory
    canonicalise(str(top2), uid=build_uid, inodes_seen=seen)


def test_mtime_whole_seconds_rule(tmp_path: Path) -> None:
    """Upstream compares whole seconds: an mtime of 1.5 s is left alone."""
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o444)
    os.utime(f, ns=(5_000_000_000, 1_500_000_000))
    canonicalise_timestamp_and_permissions(str(f))
    assert f.lstat().st_mtime_ns == 1_500_000_000
    os.utime(f, ns=(5_000_000_000, 2_000_000_000))
    canonicalise_timestamp_and_permissions(str(f))
    assert f.lstat().st_mtime_ns == 1_000_000_000


def test_writable_directory_restores_canonical_state(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    canonicalise(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o555
    with writable_directory(str(d)):
        assert d.stat().st_mode & stat.S_IWUSR
        (d / "new").write_text("x")
    st = d.stat()
    assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime == 1
    make_writable(str(d / "new"))
    assert (d / "new").stat().st_mode & stat.S_IWUSR


def test_canonicalise_many_files(tmp_path: Path) -> None:
    top = tmp_path / "big"
    top.mkdir()
    for i in range(40):
        sub = top / f"d{i}"
        sub.mkdir()
        for j in range(50):
            (sub / f"f{j}").write_bytes(b"x")
    canonicalise(str(top))
    assert (top / "d7" / "f3").stat().st_mtime == 1


def test_deep_tree_does_not_recurse(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):  # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    try:
        canonicalise(str(top))
        assert os.lstat(str(top) + "/d" * 1200).st_mtime == 1
    finally:
        # Too deep for shutil.rmtree (and thus pytest's own clean-up).
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_same_result_as_nix_store_add(nix: object, tmp_path: Path) -> None:
    """Nix canonicalises what it adds with the same rule: compare modes and mtimes."""
    top = tmp_path / "tree"
    outside = tmp_path / "outside"
    _build_tree(top, outside)
    # Nix adds through a NAR (only the executable bit survives); skip unreadable files.
    for p in _all_nodes(top):
        if not p.is_symlink() and p.is_file():
            os.chmod(p, p.stat().st_mode | 0o400)
        elif not p.is_symlink():
            os.chmod(p, p.stat().st_mode | 0o700)
    added = Path(nix.text("nix-store", "--add", str(top)))  # type: ignore[attr-defined]
    canonicalise(str(top))
    for p in _all_nodes(top):
        q = added / p.relative_to(top)
        a, b = p.lstat(), q.lstat()
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), p
        assert a.st_mtime == b.st_mtime == 1, p
        if not stat.S_ISLNK(a.st_mode):
            assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), p
