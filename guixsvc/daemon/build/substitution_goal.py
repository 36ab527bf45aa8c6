"""The substitution step of a goal: fetching missing items, checking valid ones.

Upstream's `SubstitutionGoal` and `pathContentsGood`: an output (or an input source) that is
missing is substituted when a server has it; whether a server not having it is a failure is the
caller's business (`None` vs `False`).  Substituting over a valid item is repair (repair.py).
"""

from __future__ import annotations

import os

from guixsvc.daemon.build.goal import LVL_ERROR, LVL_INFO
from guixsvc.daemon.build.state import WorkerState
from guixsvc.protocol.store_api import StoreError
from guixsvc.store import nar
from guixsvc.store.derivation import Derivation
from guixsvc.store.hashes import parse_db_hash


def substitutes_allowed(drv: Derivation) -> bool:
    """Upstream `substitutesAllowed`: only the exact value "1" (the default) allows them."""
    return drv.env.get("allowSubstitutes", "1") == "1"


class SubstitutionGoal(WorkerState):
    """The substitution step of goals (upstream `SubstitutionGoal`), mixed into `Worker`
    (worker.py), whose state it uses: is a valid item intact, and fetching missing items."""

    _good_cache: dict[str, bool]

    def contents_good(self, path: str) -> bool:
        """Upstream `pathContentsGood`: the item exists and its NAR hash is the registered one
        (a null registered hash counts as good); memoised for the worker."""
        cached = self._good_cache.get(path)
        if cached is not None:
            return cached
        self.msg(LVL_INFO, f"checking path `{path}'...")
        info = self.db.path_info(path)
        good = False
        if info is not None and os.path.lexists(path):
            algo, stored = parse_db_hash(info.nar_hash, path)
            good = not any(stored) or nar.hash_path(path, algo)[0] == stored
        self._good_cache[path] = good
        if not good:
            self.msg(LVL_ERROR, f"path `{path}' is corrupted or missing!")
        return good

    def _substitute_counted(self, path: str) -> bool | None:
        """Substitute a missing output: True/False, or None when no server has it."""
        if self.db.is_valid(path):
            return True
        from guixsvc.daemon import substituter

        sp = self.store.sd.parse_lax(path)
        try:
            if not substituter.for_store(self.store).have([sp]):
                return None
            return self.store.substitute(sp)
        except StoreError as exc:
            self.msg(LVL_ERROR, str(exc))
            return False

    def _substitute(self, path: str) -> bool:
        try:
            return self.store.substitute(self.store.sd.parse_lax(path))
        except StoreError as exc:
            self.msg(LVL_ERROR, str(exc))
            return False
