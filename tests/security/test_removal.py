"""Class 4: trees under an attacker's control are removed and canonicalised without following.

The attacker (build group) leaves trees in the group-writable store, with symlinks to root's
files where directories used to be and directories it made unreadable, and keeps swapping a
subdirectory with a symlink to an outside directory while root removes (the daemon's garbage
collector) or canonicalises (as for a build output) the tree.  Nothing outside may change.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from guixsvc.protocol.ops import GCAction
from guixsvc.store import safefs
from guixsvc.store.canonical import CanonicalisationError, canonicalise
from tests.conftest import Daemon
from tests.security.conftest import Attacker, as_user, snapshot, store_junk


def _plant_tree(top: str, outside: Path) -> None:
    """Runs as the attacker: a tree whose would-be directories are symlinks to root's files."""
    os.makedirs(f"{top}/a/b/c")
    Path(f"{top}/a/b/c/file").write_bytes(b"junk")
    os.symlink(outside / "dir", f"{top}/a/escape-dir")
    os.symlink(outside / "victim", f"{top}/a/b/escape-file")
    os.symlink(outside, f"{top}/a/b/c/escape-top")
    os.makedirs(f"{top}/locked/inner")
    Path(f"{top}/locked/inner/f").write_bytes(b"x")
    os.chmod(f"{top}/locked/inner", 0)
    os.chmod(f"{top}/locked", 0)
    os.mkfifo(f"{top}/fifo")


def test_gc_removes_planted_trees_without_following(
    root_daemon: Daemon, attacker: Attacker, outside: Path
) -> None:
    store = root_daemon.store_dir
    before = snapshot(outside)
    tops = [f"{store}/planted-junk", f"{store}/nix-1-1", f"{store}/x.chroot"]
    for top in tops:
        attacker.run(lambda top=top: _plant_tree(top, outside))
    attacker.run(lambda: os.symlink(outside / "dir", f"{store}/toplevel-link"))
    with root_daemon.client() as c:
        c.collect_garbage(GCAction.DELETE_DEAD)
    for top in [*tops, f"{store}/toplevel-link"]:
        assert not os.path.lexists(top), top
    assert snapshot(outside) == before
    assert root_daemon.process.poll() is None


WIDTH = 200


def _grow(top: str, mode: int) -> None:
    """Runs as the attacker: `top/a/dNNN/` directories (with `mode`) with a file each.

    0555 tempts a remover into making them writable, 0755 a canonicaliser into chmod 0555."""
    os.makedirs(f"{top}/a", exist_ok=True)
    os.chmod(top, 0o755)
    os.chmod(f"{top}/a", 0o755)
    for i in range(WIDTH):
        d = f"{top}/a/d{i:03}"
        with contextlib.suppress(OSError):
            if os.path.islink(d):
                os.unlink(d)
            os.makedirs(d, exist_ok=True)
            Path(f"{d}/f").write_bytes(b"x")
            os.chmod(d, mode)


def _swapper(arena: str, outside: Path, stop: float) -> int:
    """Runs as the attacker: keep replacing the newest `<arena>/tNNNNN` and its directories
    `a/dNNN` by symlinks to an outside directory (after root looked at them, before it handles
    them) and back."""
    swaps = 0
    while time.monotonic() < stop:
        tops = [f"{arena}/{name}" for name in sorted(os.listdir(arena))]
        for top in tops[-1:]:  # the tree of the current round
            # The top itself (its parent stays the attacker's while root works on it) ...
            with contextlib.suppress(OSError):
                os.rename(top, f"{top}.old")
                os.symlink(outside / "dir", top)
                swaps += 1
                os.unlink(top)
                os.rename(f"{top}.old", top)
            # ... and its subdirectories.
            for i in range(WIDTH):
                d = f"{top}/a/d{i:03}"
                with contextlib.suppress(OSError):
                    os.rename(d, f"{d}.old")
                    os.symlink(outside / "dir", d)
                    swaps += 1
            for i in range(WIDTH):
                d = f"{top}/a/d{i:03}"
                with contextlib.suppress(OSError):
                    os.unlink(d)
                    os.rename(f"{d}.old", d)
    return swaps


def _race(
    attacker: Attacker, arena: Path, outside: Path, victim_op: object, seconds: float, mode: int
) -> int:
    """Rounds of: the attacker grows a fresh tree, root runs `victim_op(top)` on it, while the
    attacker's racer keeps swapping its subdirectories."""
    stop = time.monotonic() + seconds
    result: list[int] = []
    racer = threading.Thread(
        target=lambda: result.append(
            as_user(attacker.uid, attacker.gid, lambda: _swapper(str(arena), outside, stop))
        )
    )
    rounds = 0
    try:
        while time.monotonic() < stop:
            top = f"{arena}/t{rounds:05}"
            with contextlib.suppress(Exception):  # the racer may hold entries as symlinks
                attacker.run(lambda top=top: _grow(top, mode))
            if rounds == 0:
                racer.start()
            with contextlib.suppress(CanonicalisationError, OSError):
                victim_op(top)  # type: ignore[operator]
            rounds += 1
    finally:
        if rounds:
            racer.join(30)
    assert result and result[0] > 0, "the racer did not run"
    return rounds


def _arena(sec_root: Path, attacker: Attacker) -> Path:
    arena = sec_root / "arena"
    arena.mkdir()
    os.chown(arena, attacker.uid, attacker.gid)
    return arena


def test_removal_race(sec_root: Path, attacker: Attacker, outside: Path) -> None:
    """Root removes (safefs.remove_tree, what GC and the daemon use) while the attacker swaps
    subdirectories with symlinks to an outside directory, for a bounded time."""
    arena = _arena(sec_root, attacker)
    before = snapshot(outside)
    rounds = _race(attacker, arena, outside, safefs.remove_tree, 4, 0o555)
    assert rounds > 0
    assert snapshot(outside) == before


def test_canonicalise_race(sec_root: Path, attacker: Attacker, outside: Path) -> None:
    """Canonicalising a build user's tree (chown to root, chmod 0444/0555) while it swaps
    subdirectories with symlinks to root's directory: the outside keeps modes and owners."""
    arena = _arena(sec_root, attacker)
    before = snapshot(outside)
    rounds = _race(
        attacker, arena, outside, lambda top: canonicalise(top, uid=attacker.uid), 4, 0o755
    )
    assert rounds > 0
    assert snapshot(outside) == before


def _top_swapper(top: str, outside: Path, stop: float) -> int:
    swaps = 0
    while time.monotonic() < stop:
        with contextlib.suppress(OSError):
            os.rename(top, f"{top}.old")
            os.symlink(outside / "dir", top)
            swaps += 1
            time.sleep(0.0001 * (swaps % 4))  # vary how long each state lasts
            os.unlink(top)
            os.rename(f"{top}.old", top)
        time.sleep(0.0001 * (swaps % 3))
    return swaps


def test_canonicalise_top_race(sec_root: Path, attacker: Attacker, outside: Path) -> None:
    """The output's top directory sits in a directory the build user can write: it keeps
    swapping it with a symlink to root's directory while root canonicalises it, round after
    round.  Path-based code (lstat, then chmod by name) gets caught within a few rounds."""
    arena = _arena(sec_root, attacker)
    top = f"{arena}/t"
    attacker.run(lambda: (os.mkdir(top), Path(f"{top}/f").write_bytes(b"x")))
    before = snapshot(outside)
    stop = time.monotonic() + 3
    result: list[int] = []
    racer = threading.Thread(
        target=lambda: result.append(
            as_user(attacker.uid, attacker.gid, lambda: _top_swapper(top, outside, stop))
        )
    )
    racer.start()
    rounds = 0
    try:
        while time.monotonic() < stop:
            with contextlib.suppress(CanonicalisationError, OSError):
                canonicalise(top, uid=attacker.uid)
            rounds += 1
            # Give the tree back (through descriptors: the racer is still at work).
            with contextlib.suppress(OSError):
                for node in safefs.walk(top, missing_ok=True):
                    if node.kind == safefs.LEAVE:
                        continue
                    safefs.chown_node(
                        node.name, node.parent_fd, node.st, attacker.uid, attacker.gid, node.path
                    )
                    if node.fd is not None:
                        os.chmod(node.fd, 0o755)
    finally:
        racer.join(30)
    assert rounds > 0 and result and result[0] > 0, (rounds, result)
    assert snapshot(outside) == before


def test_deep_symlink_maze_removed(sec_root: Path, attacker: Attacker, outside: Path) -> None:
    """A 3,000-deep attacker tree with a symlink to the outside at every level, removed by root:
    no ENAMETOOLONG, no recursion limit, nothing outside touched."""
    arena = sec_root / "arena"
    arena.mkdir()
    os.chown(arena, attacker.uid, attacker.gid)
    top = str(arena / "maze")

    def build() -> None:
        os.mkdir(top)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(3000):
            os.symlink(outside / "dir", "l", dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.chmod(fd, 0o500)
            os.close(fd)
            fd = new
        os.close(fd)

    attacker.run(build)
    before = snapshot(outside)
    safefs.remove_tree(top)
    assert not os.path.lexists(top)
    assert snapshot(outside) == before


def test_store_junk_helper_sees_nothing_after_gc(root_daemon: Daemon) -> None:
    assert store_junk(root_daemon.store_dir) == []
