"""Repair: replacing corrupt or missing valid items, and repairing an output closure.

Upstream's `SubstitutionGoal` with `repair` (fetch again into `<path>.tmp`, then
`replaceValidPath`) and `DerivationGoal::repairClosure` (the goals whose outputs are good repair
what those outputs refer to, through the derivation that produced each broken item).
"""

from __future__ import annotations

import contextlib
import os
import random

from guixsvc.daemon.build.goal import (
    LVL_CHATTY,
    LVL_DEBUG,
    LVL_ERROR,
    LVL_INFO,
    Goal,
    Phase,
    Result,
    is_failed,
)
from guixsvc.daemon.build.state import WorkerState
from guixsvc.protocol.store_api import StoreError
from guixsvc.store.canonical import canonicalise
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.locks import PathLocks
from guixsvc.store.safefs import remove_tree


def replace_valid_path(path: str, new: str) -> None:
    """Upstream `replaceValidPath`: there is no atomic swap of two trees, so the old item is
    renamed out of the way (`<path>.old-<pid>-<random>`), the new one renamed into place, and
    only then is the old one deleted."""
    old = f"{path}.old-{os.getpid()}-{random.randrange(1 << 31)}"
    moved = False
    if os.path.lexists(path):
        os.rename(path, old)
        moved = True
    try:
        os.rename(new, path)
    except OSError as exc:
        if moved:
            os.rename(old, path)
        raise StoreError(f"moving `{new}' to `{path}': {exc.strerror}") from None
    if moved:
        remove_tree(old)


class Repair(WorkerState):
    """Repair mode (`--repair`, `verify --repair`), mixed into `Worker` (worker.py)."""

    def _repair_substitute(self, path: str) -> bool | None:
        """Upstream `SubstitutionGoal` with `repair`: fetch `path` again into `<path>.tmp` and
        swap it in with `replace_valid_path`, then register its hash and size.  True on
        success, False when the substitution failed, None when no server has the item."""
        if not self.store.may_substitute():
            return None
        from guixsvc.daemon import substituter
        from guixsvc.store.narinfo import best_entries

        sp = self.store.sd.parse_lax(path)
        self.store.add_temp_root(sp)
        sub = substituter.for_store(self.store)
        try:
            hit = sub.lookup([sp]).get(sp)
        except StoreError as exc:
            self.msg(LVL_ERROR, str(exc))
            return False
        if hit is None:
            self.msg(
                LVL_DEBUG,
                f"path `{path}' is required, but there is no substituter that can build it",
            )
            return None
        for ref in hit.references:
            if (
                ref != sp
                and not self.store.is_valid_path(ref)
                and not self._substitute(self.store.sd.display(ref))
            ):
                return False
        dest = path + ".tmp"
        with PathLocks([path]) as locks:
            self.msg(LVL_INFO, f"fetching path `{path}'...")
            for entry in best_entries(hit.narinfo):
                remove_tree(dest)
                try:
                    digest, size = sub._download(entry.url, entry.compression, dest)
                    sub._check(hit.narinfo, path, digest, size)
                except substituter.FetchError as exc:
                    remove_tree(dest)
                    self.msg(LVL_INFO, str(exc))
                    self.trace(f"@ substituter-failed {path} 1 {exc}")
                    if "hash mismatch" in str(exc):
                        break
                    continue
                except BaseException:
                    remove_tree(dest)
                    raise
                canonicalise(dest)
                replace_valid_path(path, dest)
                info = ValidPathInfo(
                    path=path,
                    nar_hash="sha256:" + digest.hex(),
                    nar_size=size,
                    references=frozenset(self.store.sd.display(r) for r in hit.references),
                    deriver=self.store.sd.display(hit.deriver) if hit.deriver else None,
                )
                with self.db.transaction():
                    self.db.register_valid_paths([info])
                locks.set_deletion(True)
                self._good_cache[path] = True
                self.msg(LVL_CHATTY, f"substitution of path `{path}' succeeded")
                return True
        return False

    def _repair_closure(self, g: Goal) -> None:
        """Upstream `repairClosure`: our outputs are good; repair what they refer to, through
        the derivation that produced each broken item or else a substitute."""
        assert g.drv is not None
        own = {o.path for o in g.drv.outputs.values()}
        output_closure = self.closure(set(self._wanted_outputs(g).values())) - own
        producers: dict[str, str] = {}
        for p in self.closure({g.drv_path}):
            if p.endswith(".drv") and os.path.isfile(p):
                with contextlib.suppress(StoreError, OSError):
                    for out in self._read_drv(p).outputs.values():
                        producers[out.path] = p
        g.deps = []
        failures = 0
        for p in sorted(output_closure):
            if self.contents_good(p):
                continue
            self.msg(
                LVL_ERROR,
                f"found corrupted or missing path `{p}' in the output closure of `{g.drv_path}'",
            )
            producer = producers.get(p)
            if producer is None:
                failures += self._repair_substitute(p) is not True
            else:
                dep = self.goal(producer, None)
                g.deps.append(dep)
                dep.waiters.append(g)
        if failures:
            raise StoreError(
                f"some paths in the output closure of derivation ‘{g.drv_path}’ could not be "
                "repaired"
            )
        if not g.deps:
            self._done(g, Result.ALREADY_VALID)
            return
        g.phase = Phase.CLOSURE

    def _closure_repaired(self, g: Goal) -> None:
        if any(is_failed(d) for d in g.deps):
            raise StoreError(
                f"some paths in the output closure of derivation ‘{g.drv_path}’ could not be "
                "repaired"
            )
        self._done(g, Result.ALREADY_VALID)
