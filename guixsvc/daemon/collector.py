"""The daemon's garbage collector: CollectGarbage (RPC 20) as upstream's `collectGarbage`.

A collection must never remove something live, even while other sessions keep adding to the
store.  The engine therefore follows upstream's protocol exactly (`nix/libstore/gc.cc`, spec
gc.md §2–§5):

* the global `gc.lock` is held exclusively from root discovery to the end of the deletion loop,
  so no session can create a temp-roots file meanwhile; every live session's temp-roots file is
  read under a shared lock that stays held, so no session can add a temp root meanwhile (a
  session adding an item records the temp root *before* it makes the item, hence an item being
  added is always either a known root or not there yet);
* roots = permanent roots (`gcroots/`, `profiles/`, …) ∪ runtime roots (`--list-busy`) ∪ temp
  roots; liveness follows *incoming* edges (referrers, plus outputs of a `.drv` with
  `gc-keep-derivations`, plus valid derivers with `gc-keep-outputs`) back to a root;
* invalid leftovers in the store go first, then valid items in random order; a dead directory is
  invalidated and renamed into `<store>/trash` under the lock and only really deleted (bytes
  counted) after the lock is released; then unused `.links` entries are removed.

Two additions over upstream make races with careless clients harmless instead of destructive:
a path that turns out to have gained a referrer that is a root, or is live, is left alone
instead of being deleted with its referrers, and the database's foreign key refuses to
invalidate a path that gained a referrer after the liveness graph was read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guixsvc.daemon.busy import busy_store_items
from guixsvc.protocol.ops import GCAction, GCRequest
from guixsvc.protocol.store_api import GCResult, StoreError
from guixsvc.store import roots as gcroots
from guixsvc.store.canonical import make_writable
from guixsvc.store.db import StoreDatabase, StoreDatabaseError
from guixsvc.store.locks import (
    LVL_DEBUG,
    LVL_ERROR,
    LVL_INFO,
    LVL_TALKATIVE,
    MessageLog,
    SysError,
    emit,
)
from guixsvc.store.optimise import DEDUPLICATION_MIN_SIZE, LINKS_DIR
from guixsvc.store.safefs import remove_tree

if TYPE_CHECKING:
    from guixsvc.daemon.localstore import LocalStore

__all__ = [
    "UNLIMITED",
    "Collector",
    "GCOutcome",
    "additional_roots",
    "collect_garbage",
    "delete_counting",
]

#: "No limit" for maxFreed (the client sends 2^64 - 1).
UNLIMITED = 2**64 - 1
_MIB = 1024 * 1024


class _LimitReached(Exception):
    """maxFreed was exceeded (upstream `GCLimitReached`)."""


class _InUse(Exception):
    """A path selected for deletion turned out to be needed (a race with a careless client)."""


@dataclass
class GCOutcome:
    paths: list[str]
    bytes_freed: int


def _show_bytes(n: int) -> str:
    return f"{n / _MIB:.2f} MiB"


def delete_counting(path: str, link_threshold: int) -> int:
    """Delete the tree at `path`; return the sizes of the non-directories with at most
    `link_threshold` links (upstream `_deletePath`).  A missing `path` frees nothing.

    `safefs.remove_tree` does the work: directory descriptors, O_NOFOLLOW, no recursion, so a
    symlink swapped in during the deletion is unlinked, never followed, and any depth works.
    """
    return remove_tree(path, link_threshold=link_threshold)


def additional_roots(store_dir: str, log: MessageLog | None = None) -> list[str]:
    """Lines of `guix gc --list-busy`.

    With `$GUIX` set, that program is run as upstream does (its failure aborts the
    collection); otherwise the same scan runs in this process.
    """
    program = os.environ.get("GUIX")
    if not program:
        return busy_store_items(store_dir)
    emit(log, LVL_DEBUG, f"executing `{program} gc --list-busy' to find additional roots")
    try:
        proc = subprocess.run(
            [program, "gc", "--list-busy"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
    except OSError as e:
        raise SysError(f"executing `{program}'", e.errno) from e
    if proc.returncode != 0:
        raise StoreError(f"program `{program}' failed with exit code {proc.returncode}")
    return [line for line in os.fsdecode(proc.stdout).split("\n") if line]


@dataclass
class _Graph:
    """The liveness graph, read in one transaction once every root is known and locked."""

    ids: dict[str, int] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)
    deriver: dict[int, str | None] = field(default_factory=dict)
    nar_size: dict[int, int] = field(default_factory=dict)
    referrers: dict[int, list[int]] = field(default_factory=dict)
    drv_outputs: dict[int, list[str]] = field(default_factory=dict)
    derivers_of: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, db: StoreDatabase, *, outputs: bool, derivers: bool) -> _Graph:
        g = cls()
        with db.transaction() as conn:
            for pid, path, deriver, size in conn.execute(
                "select id, path, deriver, narSize from ValidPaths"
            ):
                g.ids[path] = pid
                g.paths[pid] = path
                g.deriver[pid] = deriver
                g.nar_size[pid] = size or 0
            for referrer, reference in conn.execute("select referrer, reference from Refs"):
                g.referrers.setdefault(reference, []).append(referrer)
            if outputs or derivers:
                for drv, out in conn.execute("select drv, path from DerivationOutputs"):
                    if outputs:
                        g.drv_outputs.setdefault(drv, []).append(out)
                    if derivers:
                        g.derivers_of.setdefault(out, []).append(drv)
        return g


class Collector:
    """One collection (upstream `GCState` + `collectGarbage`) on a local store."""

    def __init__(
        self,
        store_dir: str,
        state_dir: str,
        db: StoreDatabase,
        *,
        keep_outputs: bool = False,
        keep_derivations: bool = True,
        auto_optimise: bool = True,
        log: MessageLog | None = None,
        busy: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.state_dir = state_dir
        self.db = db
        self.keep_outputs = keep_outputs
        self.keep_derivations = keep_derivations
        self.auto_optimise = auto_optimise
        self.log = log
        self.busy = busy if busy is not None else lambda: additional_roots(store_dir, log)
        self.trash_dir = f"{store_dir}/trash"
        self.links_dir = f"{store_dir}/{LINKS_DIR}"
        self.roots: set[str] = set()
        self.temp_roots: set[str] = set()
        self.alive: set[str] = set()
        self.dead: set[str] = set()
        self.deleted: list[str] = []
        self.bytes_freed = 0
        self.bytes_invalidated = 0
        self.max_freed = UNLIMITED
        self.should_delete = False
        self.move_to_trash = True
        self.graph = _Graph()

    # -- helpers ---------------------------------------------------------------------------------

    def _msg(self, level: int, text: str) -> None:
        emit(self.log, level, text)

    def _is_valid(self, path: str) -> bool:
        return path in self.graph.ids

    def _is_store_path(self, path: str) -> bool:
        return (
            gcroots.is_in_dir(path, self.store_dir) and "/" not in path[len(self.store_dir) + 1 :]
        )

    def _threshold(self, path: str) -> int:
        return 2 if self.auto_optimise and self._is_store_path(path) else 1

    def _delete_garbage(self, path: str) -> None:
        """Delete `path`; an item that cannot be deleted is reported and skipped, so that one
        unremovable item (planted, or left by a crash) never stops every collection."""
        try:
            self.bytes_freed += delete_counting(path, self._threshold(path))
        except OSError as e:
            self._msg(LVL_ERROR, f"warning: cannot delete `{path}': {e}")

    # -- roots ---------------------------------------------------------------------------------

    def _find_roots(self) -> gcroots.TempRootsSnapshot:
        self._msg(LVL_ERROR, "finding garbage collector roots...")
        found = gcroots.find_roots(self.state_dir, self.store_dir, self.db.is_valid, log=self.log)
        self.roots.update(found.values())
        for line in self.busy():
            if not gcroots.is_in_dir(line, self.store_dir):
                continue
            item = gcroots.to_store_path(line, self.store_dir)
            if item not in self.roots and self.db.is_valid(item):
                self._msg(LVL_DEBUG, f"got additional root `{item}'")
                self.roots.add(item)
        snapshot = gcroots.read_temp_roots(self.state_dir, self.store_dir, log=self.log)
        self.temp_roots = set(snapshot.roots)
        self.roots.update(self.temp_roots)
        return snapshot

    # -- liveness ------------------------------------------------------------------------------

    def _incoming(self, path: str) -> list[str]:
        g = self.graph
        pid = g.ids[path]
        incoming = {g.paths[r] for r in g.referrers.get(pid, ()) if r in g.paths}
        if self.keep_derivations and path.endswith(".drv"):
            for out in g.drv_outputs.get(pid, ()):
                oid = g.ids.get(out)
                if oid is not None and g.deriver[oid] == path:
                    incoming.add(out)
        if self.keep_outputs:
            for drv in g.derivers_of.get(path, ()):
                if drv in g.paths:
                    incoming.add(g.paths[drv])
        incoming.discard(path)
        return sorted(incoming)

    def _check(self, path: str, visited: set[str]) -> bool | None:
        """The non-recursive part of `canReachRoot`; None means "look at incoming edges"."""
        if path in visited:
            return False
        if path in self.alive:
            return True
        if path in self.dead:
            return False
        if path in self.roots:
            self._msg(LVL_DEBUG, f"cannot delete `{path}' because it's a root")
            self.alive.add(path)
            return True
        visited.add(path)
        if not self._is_valid(path):
            return False
        return None

    def _can_reach_root(self, start: str, visited: set[str]) -> bool:
        """Depth-first search backwards from `start` (iterative, so chains can be deep)."""
        quick = self._check(start, visited)
        if quick is not None:
            return quick
        stack = [(start, iter(self._incoming(start)))]
        while stack:
            _, edges = stack[-1]
            for other in edges:
                quick = self._check(other, visited)
                if quick is None:
                    stack.append((other, iter(self._incoming(other))))
                    break
                if quick:
                    self.alive.update(node for node, _ in stack)
                    return True
            else:
                stack.pop()
        return False

    def _is_active_temp_file(self, path: str, suffix: str) -> bool:
        return path.endswith(suffix) and path[: -len(suffix)] in self.temp_roots

    def _try_to_delete(self, path: str) -> None:
        if path in (self.links_dir, self.trash_dir):
            return
        self._msg(LVL_DEBUG, f"considering whether to delete `{path}'")
        if not self._is_valid(path) and (
            self._is_active_temp_file(path, ".lock") or self._is_active_temp_file(path, ".chroot")
        ):
            return
        visited: set[str] = set()
        if self._can_reach_root(path, visited):
            self._msg(LVL_DEBUG, f"cannot delete `{path}' because it's still reachable")
            return
        self.dead.update(visited)
        if self.should_delete:
            try:
                self._delete_recursive(path)
            except _InUse as e:
                self._msg(LVL_DEBUG, str(e))

    # -- deletion ------------------------------------------------------------------------------

    def _delete_order(self, path: str) -> list[str]:
        """`path` and its transitive referrers, referrers first (what `deletePathRecursive`
        visits); raises `_InUse` if one of them is a root or known to be live."""
        g = self.graph
        order: list[str] = []
        seen = {path}
        stack = [(path, iter(g.referrers.get(g.ids[path], ())))]
        while stack:
            node, edges = stack[-1]
            for rid in edges:
                referrer = g.paths.get(rid)
                if referrer is None or referrer in seen:
                    continue
                if referrer in self.roots or referrer in self.alive:
                    raise _InUse(f"not deleting `{path}': `{referrer}' still needs it")
                seen.add(referrer)
                stack.append((referrer, iter(g.referrers.get(rid, ()))))
                break
            else:
                stack.pop()
                order.append(node)
        return order

    def _delete_recursive(self, path: str) -> None:
        if self._is_valid(path):
            for item in self._delete_order(path):
                self._delete_one(item)
        else:
            # Invalid in our snapshot: make sure nobody registered it since.
            if self.db.is_valid(path):
                raise _InUse(f"not deleting `{path}': it became valid")
            self._delete_one(path)

    def _invalidate(self, path: str) -> None:
        try:
            self.db.invalidate_path(path)
        except (StoreDatabaseError, sqlite3.IntegrityError) as e:
            raise _InUse(f"not deleting `{path}': it gained a referrer ({e})") from None
        g = self.graph
        pid = g.ids.pop(path)
        del g.paths[pid]

    def _delete_one(self, path: str) -> None:
        size = 0
        pid = self.graph.ids.get(path)
        if pid is not None:
            size = self.graph.nar_size.get(pid, 0)
            self._invalidate(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise SysError(f"getting status of {path}", e.errno) from e
        freed = self.bytes_freed + self.bytes_invalidated
        if self.max_freed != UNLIMITED:
            percentage = int(min(1.0, freed / self.max_freed) * 100.0)
            self._msg(LVL_INFO, f"[{percentage}%] deleting '{path}'")
        else:
            # Whole MiB, as upstream (integer division): "[0 MiB] deleting '...'".
            self._msg(LVL_INFO, f"[{freed // _MIB} MiB] deleting '{path}'")
        self.deleted.append(path)
        if self.move_to_trash and stat.S_ISDIR(st.st_mode):
            self._move_to_trash(path, st, size)
        else:
            self._delete_garbage(path)
        if self.bytes_freed + self.bytes_invalidated > self.max_freed:
            self._msg(
                LVL_INFO, f"deleted or invalidated more than {self.max_freed} bytes; stopping"
            )
            raise _LimitReached

    def _move_to_trash(self, path: str, st: os.stat_result, size: int) -> None:
        target = f"{self.trash_dir}/{os.path.basename(path)}"
        try:
            make_writable(path)  # never follows a symlink swapped in meanwhile
            os.rename(path, target)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EXDEV):
                self._msg(LVL_INFO, f"note: can't create move `{path}': {os.strerror(e.errno)}")
                self._delete_garbage(path)
            # Other errors leave the directory where it is, as upstream.
            return
        self.bytes_invalidated += size

    def _prepare_trash(self) -> None:
        if os.path.lexists(self.trash_dir):
            self._delete_garbage(self.trash_dir)
        try:
            os.makedirs(self.trash_dir, exist_ok=True)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self._msg(
                    LVL_INFO,
                    f"note: can't create trash directory: creating directory "
                    f"`{self.trash_dir}': {os.strerror(e.errno)}",
                )
                self.move_to_trash = False
        # The store is writable by the build group: whatever stands at `trash` now (a symlink
        # planted after the clean-up above, say) must be our own directory, or store items
        # would be renamed out of the store through it.
        try:
            st = os.lstat(self.trash_dir)
        except OSError:
            self.move_to_trash = False
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            self._msg(LVL_ERROR, f"warning: `{self.trash_dir}' is not the collector's directory")
            self.move_to_trash = False

    def _remove_unused_links(self) -> None:
        actual = unshared = 0
        try:
            entries = os.scandir(self.links_dir)
        except OSError as e:
            raise SysError(f"opening directory `{self.links_dir}'", e.errno) from e
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise SysError(f"statting `{entry.path}'", e.errno) from e
                if st.st_nlink != 1 and st.st_size >= DEDUPLICATION_MIN_SIZE:
                    actual += st.st_size
                    unshared += (st.st_nlink - 1) * st.st_size
                    continue
                self._msg(LVL_TALKATIVE, f"deleting unused link `{entry.path}'")
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    # Report and go on: one stuck link must not fail every collection.
                    self._msg(LVL_ERROR, f"warning: cannot delete `{entry.path}': {e.strerror}")
                    continue
                self.bytes_freed += st.st_size
        try:
            overhead = os.stat(self.links_dir).st_size
        except OSError as e:
            raise SysError(f"statting `{self.links_dir}'", e.errno) from e
        # Upstream subtracts the directory's own size, so an empty `.links` reads
        # "saves -0.00 MiB"; a saving is never negative.
        saved = max(unshared - actual - overhead, 0)
        self._msg(LVL_INFO, f"note: currently hard linking saves {_show_bytes(saved)}")

    # -- the collection ---------------------------------------------------------------------------

    def _scan_store(self) -> None:
        try:
            names = os.listdir(self.store_dir)
        except OSError as e:
            raise SysError(f"opening directory `{self.store_dir}'", e.errno) from e
        valid: list[str] = []
        for name in names:
            path = f"{self.store_dir}/{name}"
            if self._is_valid(path):
                valid.append(path)
            else:
                self._try_to_delete(path)
        random.shuffle(valid)
        for path in valid:
            self._try_to_delete(path)

    def run(
        self, action: GCAction, paths: Iterable[str] = (), max_freed: int = UNLIMITED
    ) -> GCOutcome:
        """Perform `action`; the lock is taken and released here."""
        self.max_freed = max_freed
        self.should_delete = action in (GCAction.DELETE_DEAD, GCAction.DELETE_SPECIFIC)
        lock = gcroots.GCLock(self.state_dir, exclusive=True, log=self.log)
        lock.acquire()
        snapshot: gcroots.TempRootsSnapshot | None = None
        try:
            snapshot = self._find_roots()
            if self.should_delete:
                self._prepare_trash()
            self.graph = _Graph.load(
                self.db, outputs=self.keep_derivations, derivers=self.keep_outputs
            )
            if action == GCAction.DELETE_SPECIFIC:
                for path in paths:
                    if not self._is_store_path(path):
                        raise StoreError(f"path `{path}' is not in the store")
                    try:
                        self._try_to_delete(path)
                    except _LimitReached:
                        break
                    if path not in self.dead:
                        raise StoreError(f"cannot delete path `{path}' since it is still alive")
            elif max_freed > 0:
                self._msg(
                    LVL_ERROR,
                    "deleting garbage..." if self.should_delete
                    else "determining live/dead paths...",
                )  # fmt: skip
                with contextlib.suppress(_LimitReached):
                    self._scan_store()
            if action == GCAction.RETURN_LIVE:
                return GCOutcome(_sorted(self.alive), 0)
            if action == GCAction.RETURN_DEAD:
                return GCOutcome(_sorted(self.dead), 0)
        finally:
            lock.release()
            if snapshot is not None:
                snapshot.close()
        self._msg(LVL_INFO, f"deleting `{self.trash_dir}'")
        self._delete_garbage(self.trash_dir)
        self._msg(LVL_ERROR, "deleting unused links...")
        self._remove_unused_links()
        return GCOutcome(_sorted(self.deleted), self.bytes_freed)


def _sorted(paths: Iterable[str]) -> list[str]:
    return sorted(paths, key=os.fsencode)


def collect_garbage(store: LocalStore, request: GCRequest) -> GCResult:
    """CollectGarbage for one session (`LocalStore.collect_garbage` delegates here)."""
    settings = store.settings
    keep_outputs = settings.get_bool("gc-keep-outputs")
    keep_derivations = settings.get_bool("gc-keep-derivations")
    if request.action == GCAction.DELETE_SPECIFIC and request.ignore_liveness:
        keep_outputs = keep_derivations = False
    collector = Collector(
        store.config.store_dir,
        store.config.state_dir,
        store.db,
        keep_outputs=keep_outputs,
        keep_derivations=keep_derivations,
        auto_optimise=settings.get_bool("auto-optimise-store"),
        log=store.message,
    )
    paths = [store.sd.display(p) for p in request.paths]
    outcome = collector.run(request.action, paths, request.max_freed)
    return GCResult(outcome.paths, outcome.bytes_freed)
