"""The goal graph of a BuildPaths request: goals, their phases and results.

A `Goal` is upstream's `DerivationGoal` state: the derivation, the outputs wanted, the goals
of its input derivations (`deps`) and of those waiting for it (`waiters`), its `Phase`, and
what a build holds while it runs (output locks, build user, chroot, build tree, network helper,
the `Running` builder).  Advancing goals is the worker's business (worker.py and the modules it
is made of); this module only holds the data, so every other module can import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guixsvc.daemon.build import sandbox
from guixsvc.daemon.build.logs import BuildLog
from guixsvc.protocol.ops import BuildMode
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.derivation import Derivation
from guixsvc.store.locks import PathLocks

if TYPE_CHECKING:
    from guixsvc.daemon.build.slirp import Slirp


#: Verbosity levels of the messages sent to the client (upstream `Verbosity`).
LVL_ERROR, LVL_INFO, LVL_TALKATIVE, LVL_CHATTY, LVL_DEBUG = range(5)


class Result(enum.Enum):
    """How a goal ended."""

    BUILT = "built"
    ALREADY_VALID = "already valid"
    PERMANENT_FAILURE = "permanent failure"
    TRANSIENT_FAILURE = "transient failure"
    TIMED_OUT = "timed out"
    CACHED_FAILURE = "cached failure"
    DEPENDENCY_FAILED = "dependency failed"
    OUTPUT_REJECTED = "output rejected"
    INPUT_REJECTED = "input rejected"
    CANCELLED = "cancelled"


FAILURES_PERMANENT = {Result.PERMANENT_FAILURE, Result.CACHED_FAILURE, Result.INPUT_REJECTED}


class Phase(enum.Enum):
    """Where a goal is: what advancing it (`Worker._step`) does next."""

    #: Outputs to be checked and substituted (upstream `haveDerivation`).
    INIT = "init"
    #: Waiting for the input derivations, then built (upstream `inputsRealised`).
    INPUTS = "inputs"
    #: Repair: waiting for the goals repairing the output closure (upstream `repairClosure`).
    CLOSURE = "closure"


@dataclass
class Running:
    """A started builder."""

    pid: int  # the process the daemon forked
    kill_pid: int  # the builder (PID 1 of its namespace with chroot)
    fd: int
    started: float
    last_output: float
    log: BuildLog | None
    log_size: int = 0
    timed_out: str | None = None
    status: int | None = None  # already reaped (an offloaded build: guixsvc.offload.hook)


@dataclass
class Goal:
    """One derivation to realise: upstream `DerivationGoal`'s state."""

    drv_path: str
    wanted: set[str] | None  # None: all outputs
    drv: Derivation | None = None
    deps: list[Goal] = field(default_factory=list)
    waiters: list[Goal] = field(default_factory=list)
    result: Result | None = None
    top_level: bool = False
    #: The requested mode for the goals the client named; their inputs are built in normal mode
    #: (repair stays repair), as upstream's `DerivationGoal::haveDerivation` asks for them.
    mode: BuildMode = BuildMode.NORMAL
    # Build state.
    nr_rounds: int = 1
    cur_round: int = 1
    locks: PathLocks | None = None
    waiting_since: float | None = None
    missing: list[str] = field(default_factory=list)
    input_paths: set[str] = field(default_factory=set)
    user: sandbox.BuildUser | None = None
    slirp: Slirp | None = None  # slirp4netns of a fixed-output build
    tmp_dir: str | None = None
    top_dir: str | None = None
    chroot: str | None = None
    running: Running | None = None
    prev_infos: dict[str, ValidPathInfo] | None = None
    phase: Phase = Phase.INIT
    #: Repair without a chroot: valid outputs moved aside while they are rebuilt in place.
    moved_aside: dict[str, str] = field(default_factory=dict)
    #: Check mode without a chroot (builtins): where outputs are built instead of over the
    #: valid ones (upstream `addHashRewrite`).
    redirected: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"building of `{self.drv_path}'"


def is_failed(g: Goal) -> bool:
    return g.result is not None and g.result not in (Result.BUILT, Result.ALREADY_VALID)
