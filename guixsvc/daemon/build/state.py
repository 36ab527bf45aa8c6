"""What the parts of the build worker share, declared once so a type checker sees it.

`Worker` (worker.py) is made of mixins, one per upstream file (derivation_goal, local_build,
substitution_goal, repair); each uses the worker's state (set in `Worker.__init__`) and methods
defined by the others.  `WorkerState` declares both: the attributes as annotations only and the
methods under TYPE_CHECKING, so it adds nothing at run time (every mixin inherits from it and
`Worker` provides the real attributes and methods).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guixsvc.daemon.build.goal import Goal, Result
    from guixsvc.daemon.localstore import LocalStore
    from guixsvc.daemon.settings import Settings
    from guixsvc.offload.hook import Offloader
    from guixsvc.protocol.ops import BuildMode
    from guixsvc.store.db import StoreDatabase, ValidPathInfo
    from guixsvc.store.derivation import Derivation


class WorkerState:
    """The build worker's state and methods, as its mixins see them (see the module docstring)."""

    store: LocalStore
    mode: BuildMode
    settings: Settings
    db: StoreDatabase
    store_dir: str
    goals: dict[str, Goal]
    running: dict[int, Goal]
    timed_out: bool
    permanent_failure: bool
    stop: bool
    this_system: str
    max_jobs: int
    poll_interval: int
    waiting_message_shown: bool
    client_fd: int | None
    _good_cache: dict[str, bool]
    offloader: Offloader | None

    if TYPE_CHECKING:
        # worker.py
        def msg(self, level: int, text: str) -> None: ...
        def trace(self, text: str) -> None: ...
        def _read_drv(self, path: str) -> Derivation:
            raise NotImplementedError

        def goal(self, drv_path: str, wanted: set[str] | None) -> Goal:
            raise NotImplementedError

        def _done(self, g: Goal, result: Result) -> None: ...
        def _handle_output(self, g: Goal, chunk: bytes) -> None: ...
        def _kill(self, g: Goal) -> None: ...

        # derivation_goal.py
        def _wanted_outputs(self, g: Goal) -> dict[str, str]:
            raise NotImplementedError

        def closure(self, paths: set[str]) -> set[str]:
            raise NotImplementedError

        def closure_with(
            self, infos: dict[str, ValidPathInfo]
        ) -> Callable[[Iterable[str]], set[str]]:
            raise NotImplementedError

        def _release_locks(self, g: Goal, *, delete: bool) -> None: ...

        # local_build.py
        def _start_builder(self, g: Goal) -> None: ...
        def _actual(self, g: Goal, path: str) -> str:
            raise NotImplementedError

        def _rewrite_back(self, g: Goal, actual: str) -> None: ...

        def _move_failed_outputs(self, g: Goal) -> None: ...
        def _cleanup(self, g: Goal, *, failed: bool, keep_locks: bool = False) -> None: ...

        # substitution_goal.py
        def contents_good(self, path: str) -> bool:
            raise NotImplementedError

        def _substitute_counted(self, path: str) -> bool | None:
            raise NotImplementedError

        def _substitute(self, path: str) -> bool:
            raise NotImplementedError

        # repair.py
        def _repair_substitute(self, path: str) -> bool | None:
            raise NotImplementedError

        def _repair_closure(self, g: Goal) -> None: ...
        def _closure_repaired(self, g: Goal) -> None: ...
