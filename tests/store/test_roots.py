"""Tests for guixsvc.store.roots: gc.lock, temp-roots files, indirect and permanent roots.

Lock interplay is checked across real processes (fork); the file formats against the spec
(gc.md §1-§3, store.md §9); the indirect-root name against Nix's `nix-hash` (SHA-1, nix-base32).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.store.locks import LVL_ERROR, LVL_INFO
from guixsvc.store.paths import InvalidStorePath
from guixsvc.store.roots import (
    GCLock,
    TempRoots,
    abs_path,
    add_indirect_root,
    canon_path,
    find_roots,
    indirect_root_name,
    read_temp_roots,
    sync_with_gc,
    to_store_path,
)
from tests.store.forked import Child

H1 = "0" * 31 + "1"
H2 = "0" * 31 + "2"
H3 = "0" * 31 + "3"
H4 = "0" * 31 + "4"
H5 = "0" * 31 + "5"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str]:
    state = tmp_path / "state"
    store = tmp_path / "store"
    state.mkdir()
    store.mkdir()
    return str(state), str(store)


# --- path helpers ---------------------------------------------------------------------------


def test_canon_and_abs_path() -> None:
    assert canon_path("/a//b/./c/../d/") == "/a/b/d"
    assert canon_path("/../..") == "/"
    assert canon_path("//x") == "/x"
    assert abs_path("x/../y", "/r/s") == "/r/s/y"
    assert abs_path("/abs/./p", "/ignored") == "/abs/p"
    with pytest.raises(ValueError, match="not an absolute path"):
        canon_path("rel")


def test_to_store_path() -> None:
    assert to_store_path(f"/gnu/store/{H1}-x/bin/sh", "/gnu/store") == f"/gnu/store/{H1}-x"
    assert to_store_path(f"/gnu/store/{H1}-x", "/gnu/store") == f"/gnu/store/{H1}-x"
    with pytest.raises(InvalidStorePath, match="path `/gnu/storex/a' is not in the store"):
        to_store_path("/gnu/storex/a", "/gnu/store")


# --- gc.lock --------------------------------------------------------------------------------


def test_gc_lock_file_mode_and_exclusion(dirs: tuple[str, str]) -> None:
    state, _ = dirs
    old = os.umask(0)
    try:
        lock = GCLock(state, exclusive=True)
        assert lock.acquire(wait=False)
    finally:
        os.umask(old)
    path = f"{state}/gc.lock"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def probe(c: Child) -> None:
        other = GCLock(state)
        c.send(str(int(other.acquire(wait=False))))

    child = Child(probe)
    assert child.recv() == "0"
    assert child.join() == 0

    # Downgrade to shared: another process may now share it, but not take it exclusively.
    assert lock.acquire(exclusive=False)

    def probe2(c: Child) -> None:
        shared = GCLock(state).acquire(wait=False)
        excl = GCLock(state, exclusive=True).acquire(wait=False)
        c.send(f"{int(shared)} {int(excl)}")

    child = Child(probe2)
    assert child.recv() == "1 0"
    assert child.join() == 0
    lock.release()
    assert not lock.held


def test_gc_lock_waits_with_upstream_message(dirs: tuple[str, str]) -> None:
    state, _ = dirs

    def collector(c: Child) -> None:
        with GCLock(state, exclusive=True):
            c.send("locked")
            c.wait_for()
            time.sleep(0.3)

    child = Child(collector)
    assert child.recv() == "locked"
    log: list[tuple[int, str]] = []
    child.tell("go")
    start = time.monotonic()
    sync_with_gc(state, log=lambda lvl, msg: log.append((lvl, msg)))
    assert time.monotonic() - start >= 0.2
    assert (LVL_ERROR, "waiting for the big garbage collector lock...") in log
    assert child.join() == 0
    # No waiting, no message.
    log.clear()
    sync_with_gc(state, log=lambda lvl, msg: log.append((lvl, msg)))
    assert all(lvl != LVL_ERROR for lvl, _ in log)


# --- temp roots -----------------------------------------------------------------------------


def test_temp_roots_file_format_and_locking(dirs: tuple[str, str]) -> None:
    state, store = dirs
    p1, p2 = f"{store}/{H1}-a", f"{store}/{H2}-b"
    tr = TempRoots(state)
    tr.add(p1)
    tr.add_many([p2])
    path = f"{state}/temproots/{os.getpid()}"
    assert tr.path == path
    # (Reading the file here would drop our lock: closing any descriptor of a file releases all
    # of the process's fcntl locks on it.  Children read it instead.)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # We hold a shared lock on the file: another process can read-lock but not write-lock it.
    def probe(c: Child) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            c.send("exclusive")
        except OSError:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            c.send("shared")

    child = Child(probe)
    assert child.recv() == "shared"
    assert child.join() == 0

    # A collector in another process sees the roots.
    def collector(c: Child) -> None:
        with GCLock(state, exclusive=True), read_temp_roots(state, store) as snap:
            c.send(" ".join(sorted(snap.roots)))
            c.send(repr(Path(path).read_bytes()))

    child = Child(collector)
    assert child.recv() == f"{p1} {p2}"
    assert child.recv() == repr(f"{p1}\0{p2}\0".encode())
    assert child.join() == 0

    tr.close()
    assert not os.path.exists(path)


def test_collector_snapshot_blocks_additions(dirs: tuple[str, str]) -> None:
    state, store = dirs
    tr = TempRoots(state)
    tr.add(f"{store}/{H1}-a")

    def collector(c: Child) -> None:
        snap = read_temp_roots(state, store)
        c.send(str(len(snap.roots)))
        c.wait_for()
        time.sleep(0.3)
        snap.close()

    child = Child(collector)
    assert child.recv() == "1"
    done = threading.Event()

    def adder() -> None:
        tr.add(f"{store}/{H2}-b")
        done.set()

    t = threading.Thread(target=adder)
    t.start()
    assert not done.wait(0.3), "add() must block while a collector holds the file"
    child.tell("release")
    start = time.monotonic()
    assert done.wait(10)
    t.join()
    assert time.monotonic() - start >= 0.2
    assert child.join() == 0
    tr.close()


def test_dead_owner_file_is_removed_and_marked(dirs: tuple[str, str]) -> None:
    state, store = dirs

    def owner(c: Child) -> None:
        tr = TempRoots(state)
        tr.add(f"{store}/{H1}-a")
        c.send(tr.path or "")
        # Exit without close(): the file stays, unlocked (the process is gone).

    child = Child(owner)
    path = child.recv()
    assert child.join() == 0
    keep = os.open(path, os.O_RDONLY)
    log: list[tuple[int, str]] = []
    with GCLock(state, exclusive=True):
        snap = read_temp_roots(state, store, log=lambda lvl, msg: log.append((lvl, msg)))
    assert snap.roots == set() and snap.fds == []
    assert not os.path.exists(path)
    # Like upstream, the `d' is written at offset 0 of the freshly opened descriptor.
    assert os.read(keep, 4096) == f"d{store[1:]}/{H1}-a\0".encode()
    os.close(keep)
    assert (LVL_ERROR, f"removing stale temporary roots file `{path}'") in log


def test_own_file_looks_stale_to_own_collector(dirs: tuple[str, str]) -> None:
    """Upstream quirk (gc.md §2.4): fcntl locks never conflict within a process."""
    state, store = dirs
    tr = TempRoots(state)
    tr.add(f"{store}/{H1}-a")
    snap = read_temp_roots(state, store, log=lambda lvl, msg: None)
    assert snap.roots == set()
    assert not os.path.exists(f"{state}/temproots/{os.getpid()}")
    tr.close()


def test_creation_replaces_stale_file_of_same_pid(dirs: tuple[str, str]) -> None:
    state, store = dirs
    os.makedirs(f"{state}/temproots")
    path = f"{state}/temproots/{os.getpid()}"
    Path(path).write_bytes(b"/old/junk\0d")
    tr = TempRoots(state)
    tr.add(f"{store}/{H1}-a")
    assert Path(path).read_bytes() == f"{store}/{H1}-a\0".encode()
    tr.close()


def test_non_store_temp_root_aborts(dirs: tuple[str, str]) -> None:
    state, store = dirs

    def owner(c: Child) -> None:
        tr = TempRoots(state)
        tr.add("/etc/passwd")
        c.send("added")
        c.wait_for()
        tr.close()

    child = Child(owner)
    assert child.recv() == "added"
    with pytest.raises(InvalidStorePath, match="path `/etc/passwd' is not in the store"):
        read_temp_roots(state, store)
    child.tell("bye")
    assert child.join() == 0


def test_read_temp_roots_ignores_trailing_partial_entry(dirs: tuple[str, str]) -> None:
    state, store = dirs

    def owner(c: Child) -> None:
        tr = TempRoots(state)
        tr.add(f"{store}/{H1}-a")
        assert tr._fd is not None
        os.write(tr._fd, f"{store}/{H2}-partial".encode())
        c.send("ok")
        c.wait_for()
        tr.close()

    child = Child(owner)
    assert child.recv() == "ok"
    with read_temp_roots(state, store) as snap:
        assert snap.roots == {f"{store}/{H1}-a"}
    child.tell("bye")
    assert child.join() == 0


def test_temp_roots_in_forked_child_use_own_file(dirs: tuple[str, str]) -> None:
    state, store = dirs
    tr = TempRoots(state)
    tr.add(f"{store}/{H1}-a")
    parent_file = tr.path

    def child_side(c: Child) -> None:
        tr.add(f"{store}/{H2}-b")
        c.send(tr.path or "")
        tr.close()

    child = Child(child_side)
    child_file = child.recv()
    assert child.join() == 0
    assert child_file == f"{state}/temproots/{child.pid}"
    assert not os.path.exists(child_file)
    assert parent_file is not None
    assert Path(parent_file).read_bytes() == f"{store}/{H1}-a\0".encode()
    tr.close()


# --- indirect roots -------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nix-hash") is None, reason="nix-hash (nix-bin) not installed")
def test_indirect_root_name_matches_nix_hash(tmp_path: Path) -> None:
    for name in ["/home/alice/result", "/tmp/x y/é", "/"]:
        f = tmp_path / "name"
        f.write_bytes(name.encode())
        expected = (
            subprocess.run(
                ["nix-hash", "--type", "sha1", "--base32", "--flat", str(f)],
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        assert indirect_root_name(name) == expected
        assert len(expected) == 32


def test_add_indirect_root(dirs: tuple[str, str]) -> None:
    state, _ = dirs
    link = add_indirect_root(state, "home/alice/../bob/result")
    name = indirect_root_name("/home/bob/result")
    assert link == f"{state}/gcroots/auto/{name}"
    assert os.readlink(link) == "/home/bob/result"
    # Replacing an existing entry is atomic and leaves no temporary links behind.
    os.unlink(link)
    os.symlink("/somewhere/else", link)
    assert add_indirect_root(state, "/home/bob/result") == link
    assert os.readlink(link) == "/home/bob/result"
    assert os.listdir(f"{state}/gcroots/auto") == [name]


# --- permanent roots ------------------------------------------------------------------------


def _mk_store_item(store: str, h: str, name: str) -> str:
    p = f"{store}/{h}-{name}"
    os.makedirs(f"{p}/bin", exist_ok=True)
    Path(f"{p}/bin/prog").write_text("x")
    return p


def test_find_roots(tmp_path: Path, dirs: tuple[str, str]) -> None:
    state, store = dirs
    a = _mk_store_item(store, H1, "a")
    b = _mk_store_item(store, H2, "b")
    c = _mk_store_item(store, H3, "c")
    d = _mk_store_item(store, H4, "d")
    invalid = f"{store}/{H5}-gone"
    valid = {a, b, c, d}

    gcroots = Path(state, "gcroots")
    profiles = Path(state, "profiles")
    (gcroots / "auto").mkdir(parents=True)
    (gcroots / "sub" / "deeper").mkdir(parents=True)
    profiles.mkdir()
    os.symlink(str(profiles), gcroots / "profiles")  # a symlinked directory is not descended

    # Direct root: a symlink into the store, below the item.
    os.symlink(f"{a}/bin/prog", gcroots / "sub" / "deeper" / "to-a")
    # Direct root to an invalid item: skipped with a message.
    os.symlink(invalid, gcroots / "to-invalid")
    # A regular file named like a store item.
    (gcroots / f"{H2}-b").write_text("")
    (gcroots / "not-an-item").write_text("")
    # Indirect roots: auto link -> user link -> store.
    user = tmp_path / "home"
    user.mkdir()
    os.symlink(c, user / "result")
    os.symlink(str(user / "result"), gcroots / "auto" / "live")
    os.symlink(str(user / "gone"), gcroots / "auto" / "stale")
    os.symlink(str(user / "gone"), gcroots / "stale-elsewhere")
    (user / "plain").write_text("")
    os.symlink(str(user / "plain"), gcroots / "auto" / "to-plain-file")
    # Profiles: relative generation links.
    per_user = profiles / "per-user" / "alice"
    per_user.mkdir(parents=True)
    os.symlink(d, per_user / "guix-profile-1-link")
    os.symlink("guix-profile-1-link", per_user / "guix-profile")
    # manifests/ does not exist: fine.

    log: list[tuple[int, str]] = []
    roots = find_roots(state, store, valid.__contains__, log=lambda lv, m: log.append((lv, m)))
    expected = {
        f"{state}/gcroots/sub/deeper/to-a": a,
        f"{state}/gcroots/{H2}-b": b,
        str(user / "result"): c,
        str(per_user / "guix-profile-1-link"): d,
    }
    assert roots == expected
    assert list(roots) == sorted(expected, key=os.fsencode)
    assert not os.path.lexists(gcroots / "auto" / "stale")
    assert os.path.lexists(gcroots / "stale-elsewhere")
    assert os.path.lexists(gcroots / "auto" / "to-plain-file")
    assert (LVL_INFO, f"skipping invalid root from `{gcroots}/to-invalid' to `{invalid}'") in log
    assert (
        LVL_INFO,
        f"removing stale link from `{gcroots}/auto/stale' to `{user}/gone'",
    ) in log

    # manifests/ is scanned when present.
    Path(state, "manifests").mkdir()
    os.symlink(a, Path(state, "manifests", "m"))
    roots = find_roots(state, store, valid.__contains__)
    assert roots[f"{state}/manifests/m"] == a


def test_find_roots_missing_dirs(dirs: tuple[str, str]) -> None:
    state, store = dirs
    log: list[tuple[int, str]] = []
    assert find_roots(state, store, lambda p: True, log=lambda lv, m: log.append((lv, m))) == {}
    assert (LVL_INFO, f"cannot read potential root `{state}/gcroots'") in log


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_find_roots_skips_unreadable_directories(world_readable_tmp: Path) -> None:
    state = world_readable_tmp / "state"
    store = world_readable_tmp / "store"
    store.mkdir()
    item = _mk_store_item(str(store), H1, "a")
    (state / "gcroots" / "private").mkdir(parents=True)
    (state / "profiles").mkdir()
    os.symlink(item, state / "gcroots" / "private" / "x")
    os.chmod(state / "gcroots" / "private", 0o700)
    os.symlink(item, state / "gcroots" / "public")

    def scan(c: Child) -> None:
        os.setgid(65534)
        os.setuid(65534)
        log: list[tuple[int, str]] = []
        roots = find_roots(
            str(state), str(store), lambda p: True, log=lambda lv, m: log.append((lv, m))
        )
        c.send(repr(sorted(roots.items())))
        c.send(repr(log))

    child = Child(scan)
    roots = child.recv()
    log = child.recv()
    assert child.join() == 0
    assert roots == repr([(f"{state}/gcroots/public", item)])
    assert repr((LVL_INFO, f"cannot read potential root `{state}/gcroots/private'")) in log
