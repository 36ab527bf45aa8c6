"""BuildPaths: realising derivations the way upstream's `Worker` and `DerivationGoal` do.

One `Worker` per request (spec/build-env.md §2): every requested derivation becomes a goal,
input derivations become goals first (shared work done once), goals whose outputs are valid are
skipped, output paths are locked (`<out>.lock`) so two sessions never build the same output, and
up to `build-max-jobs` builders run at once.  The worker is a single-threaded event loop: it
`select`s on the builders' log pipes, forwards and stores their output, enforces the silence
and total timeouts, and processes outputs when a builder's pipe reaches end-of-file.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import platform
import pwd
import random
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guixsvc.daemon.build import builtins, environment, outputs, sandbox, seccomp
from guixsvc.daemon.build.logs import BuildLog
from guixsvc.daemon.build.outputs import BuildError, NotDeterministic, show_paths
from guixsvc.protocol.ops import BuildMode
from guixsvc.protocol.store_api import StoreError
from guixsvc.store import base32, nar
from guixsvc.store.canonical import canonicalise
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.derivation import Derivation, DerivationError, read_derivation
from guixsvc.store.derived_path import DerivedPath
from guixsvc.store.hashes import parse_db_hash
from guixsvc.store.locks import PathLocks
from guixsvc.store.optimise import optimise_path

if TYPE_CHECKING:
    from guixsvc.daemon.localstore import LocalStore

LVL_ERROR, LVL_INFO, LVL_TALKATIVE, LVL_CHATTY, LVL_DEBUG = range(5)

READ_SIZE = 4096


class Result(enum.Enum):
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


_FAILURES_PERMANENT = {Result.PERMANENT_FAILURE, Result.CACHED_FAILURE, Result.INPUT_REJECTED}


def _status_to_string(status: int) -> str:
    if os.WIFEXITED(status):
        return f"failed with exit code {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.strsignal(sig) or str(sig)
        except ValueError:
            name = str(sig)
        return f"failed due to signal {sig} ({name})"
    return "died abnormally"


def substitutes_allowed(drv: Derivation) -> bool:
    """Upstream `substitutesAllowed`: only the exact value "1" (the default) allows them."""
    return drv.env.get("allowSubstitutes", "1") == "1"


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
        sandbox.remove_tree(old)


def can_build_locally(system: str, this_system: str) -> bool:
    return (
        system == this_system
        or (system == "i686-linux" and this_system == "x86_64-linux")
        or (system == "armhf-linux" and this_system == "aarch64-linux")
    )


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
    drv_path: str
    wanted: set[str] | None  # None: all outputs
    drv: Derivation | None = None
    deps: list[Goal] = field(default_factory=list)
    waiters: list[Goal] = field(default_factory=list)
    result: Result | None = None
    top_level: bool = False
    # Build state.
    nr_rounds: int = 1
    cur_round: int = 1
    locks: PathLocks | None = None
    waiting_since: float | None = None
    missing: list[str] = field(default_factory=list)
    input_paths: set[str] = field(default_factory=set)
    user: sandbox.BuildUser | None = None
    slirp: _Slirp | None = None  # slirp4netns of a fixed-output build
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


class Worker:
    """Runs the goals of one BuildPaths request for a LocalStore."""

    def __init__(self, store: LocalStore, mode: BuildMode) -> None:
        self.store = store
        self.mode = mode
        self.settings = store.settings
        self.db = store.db
        self.store_dir = store.config.store_dir
        self.goals: dict[str, Goal] = {}
        self.running: dict[int, Goal] = {}  # fd -> goal
        self.timed_out = False
        self.permanent_failure = False
        self.stop = False
        self.this_system = self.settings.get("system") or "x86_64-linux"
        self.max_jobs = self.settings.get_int("build-max-jobs", 1)
        self.poll_interval = max(self.settings.get_int("build-poll-interval", 5), 1)
        self.waiting_message_shown = False
        self._good_cache: dict[str, bool] = {}
        from guixsvc.offload.hook import Offloader

        #: Builds sent to other machines (`guix offload`); None when not configured.
        self.offloader = Offloader.for_worker(self) if mode == BuildMode.NORMAL else None

    # -- messages ----------------------------------------------------------------------------

    def msg(self, level: int, text: str) -> None:
        self.store.message(level, text)

    def trace(self, text: str) -> None:
        if self.settings.print_build_trace:
            self.msg(LVL_ERROR, text)

    def builder_output(self, chunk: bytes, pid: int) -> None:
        if self.settings.verbosity >= self.settings.build_verbosity:
            if self.settings.get_bool("multiplexed-build-output"):
                # Upstream `handleChildOutput`: a header naming the builder (the pid of its
                # `@ build-started` trace) and the size of the chunk, in the same message.
                chunk = b"@ build-log %d %d\n" % (pid, len(chunk)) + chunk
            self.store.build_output(chunk)

    # -- goals -------------------------------------------------------------------------------

    def _read_drv(self, path: str) -> Derivation:
        try:
            return read_derivation(path)
        except DerivationError as exc:
            raise StoreError(str(exc)) from None

    def goal(self, drv_path: str, wanted: set[str] | None) -> Goal:
        g = self.goals.get(drv_path)
        if g is not None:
            if g.wanted is not None:
                g.wanted = None if wanted is None else g.wanted | wanted
            return g
        g = Goal(drv_path, wanted)
        self.goals[drv_path] = g
        if not self.db.is_valid(drv_path):
            g.result = Result.PERMANENT_FAILURE
            self.msg(LVL_ERROR, f"cannot build missing derivation `{drv_path}'")
            return g
        self.store.add_temp_root(self.store.sd.parse_lax(drv_path))
        g.drv = self._read_drv(drv_path)
        for out in g.drv.outputs.values():
            self.store.add_temp_root(self.store.sd.parse_lax(out.path))
        return g

    def _add_inputs(self, g: Goal) -> None:
        """Upstream `outputsSubstituted`: the input derivations become goals only once the
        outputs could not all be substituted."""
        assert g.drv is not None
        for dep_path, names in sorted(g.drv.input_drvs.items()):
            dep = self.goal(dep_path, set(names))
            g.deps.append(dep)
            dep.waiters.append(g)
        g.phase = Phase.INPUTS

    def run(self, items: list[str]) -> None:
        top: list[tuple[str, Goal | None]] = []
        failed_paths: list[str] = []
        for item in items:
            derived = DerivedPath.parse(item)
            path = derived.path
            if derived.is_derivation:
                g = self.goal(path, set(derived.outputs) if derived.outputs else None)
                g.top_level = True
                top.append((path, g))
            elif self.mode != BuildMode.NORMAL:
                # Upstream passes the build mode as the repair flag (so check mode repairs
                # too); having no substitute is not a failure of the goal.
                if self._repair_substitute(path) is False:
                    failed_paths.append(path)
            # Upstream's `SubstitutionGoal` ends with `ecNoSubstituters` when no server has the
            # item, which `buildPaths` does not count as a failure: only a failed substitute is.
            elif not self.db.is_valid(path) and self._substitute_counted(path) is False:
                self.msg(LVL_ERROR, f"path `{path}' does not exist and cannot be created")
                failed_paths.append(path)
        try:
            self._loop()
        finally:
            # Whatever ended the loop, no goal keeps a build user, a chroot, a build tree, a
            # network helper or a lock beyond this request.
            for g in list(self.running.values()):
                self._kill(g)
            self.running.clear()
            for g in self.goals.values():
                if g.running is not None:
                    with contextlib.suppress(OSError):
                        os.close(g.running.fd)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(g.running.pid, 0)
                    g.running = None
                if g.user or g.chroot or g.top_dir or g.locks or g.slirp or g.moved_aside:
                    self._cleanup(g, failed=True)
        failed = failed_paths + [
            p
            for p, g in top
            if g is not None and g.result not in (Result.BUILT, Result.ALREADY_VALID)
        ]
        if failed:
            status = 101 if self.timed_out else 100 if self.permanent_failure else 1
            raise StoreError(f"build of {show_paths(failed)} failed", status)

    # -- the loop ----------------------------------------------------------------------------

    def _ready(self) -> list[Goal]:
        """Goals that can be advanced: inputs finished (or one failed and not keep-going)."""
        keep_going = self.settings.keep_going
        ready = [
            g
            for g in self.goals.values()
            if g.result is None
            and g.running is None
            and (
                g.phase == Phase.INIT
                or all(d.result is not None for d in g.deps)
                or (not keep_going and any(_failed(d) for d in g.deps))
            )
        ]
        # Upstream's goal keys: `b$<name>$<drvpath>`, so builds are ordered by name.
        ready.sort(key=lambda g: (os.path.basename(g.drv_path)[33:], g.drv_path))
        return ready

    def _loop(self) -> None:
        while True:
            progressed = False
            for g in self._ready():
                before = (g.result, g.running, g.phase)
                self._step(g)
                progressed |= (g.result, g.running, g.phase) != before
            if self.stop:
                return
            if not self.running:
                pending = self._ready()
                if not pending:
                    return
                if progressed:
                    continue
                if self.max_jobs == 0 and not (self.offloader and self.offloader.postponed):
                    raise StoreError(
                        "unable to start any build; either increase `--max-jobs' "
                        "or enable distributed builds"
                    )
                time.sleep(min(self.poll_interval, 0.5))
                continue
            self._wait()

    def _done(self, g: Goal, result: Result) -> None:
        g.result = result
        if result in (Result.BUILT, Result.ALREADY_VALID):
            return
        if result == Result.TIMED_OUT:
            self.timed_out = True
        if result in _FAILURES_PERMANENT:
            self.permanent_failure = True
        if not self.settings.keep_going and g.top_level and result != Result.CANCELLED:
            self.stop = True

    def _wanted_outputs(self, g: Goal) -> dict[str, str]:
        assert g.drv is not None
        names = g.wanted if g.wanted is not None else set(g.drv.outputs)
        return {n: g.drv.outputs[n].path for n in names if n in g.drv.outputs}

    def _step(self, g: Goal) -> None:
        """Advance a goal that is ready: check and substitute its outputs, or (inputs done)
        start its build, or (repair) conclude the repair of its output closure."""
        if g.phase == Phase.INIT:
            self._init_goal(g)
            return
        if g.phase == Phase.CLOSURE:
            self._closure_repaired(g)
            return
        assert g.drv is not None
        drv = g.drv
        failed_deps = [d for d in g.deps if _failed(d)]
        if failed_deps:
            self.msg(
                LVL_ERROR,
                f"cannot build derivation `{g.drv_path}': {len(failed_deps)} dependencies "
                "couldn't be built",
            )
            self._done(g, Result.DEPENDENCY_FAILED)
            return
        if self.stop:
            self._done(g, Result.CANCELLED)
            return
        for src in sorted(drv.input_srcs):
            if not self.db.is_valid(src) and not self._substitute(src):
                self.msg(LVL_ERROR, f"path `{src}' is required, but it is not valid")
                self._done(g, Result.DEPENDENCY_FAILED)
                return
        # The input closure.
        roots: set[str] = set(drv.input_srcs)
        for dep in g.deps:
            assert dep.drv is not None
            names = drv.input_drvs[dep.drv_path]
            roots.update(dep.drv.outputs[n].path for n in names if n in dep.drv.outputs)
        g.input_paths = self.closure(roots)
        fixed = environment.is_fixed_output_build(drv)
        g.nr_rounds = 1 if fixed else self.settings.get_int("build-repeat", 0) + 1
        self._try_to_build(g)

    def _init_goal(self, g: Goal) -> None:
        """Upstream `haveDerivation` and `outputsSubstituted`."""
        assert g.drv is not None
        if self.stop:
            self._done(g, Result.CANCELLED)
            return
        repair = self.mode == BuildMode.REPAIR
        invalid = self._invalid_outputs(g, check_hash=repair)
        if not invalid and self.mode == BuildMode.NORMAL:
            self._done(g, Result.ALREADY_VALID)
            return
        if self.settings.get_bool("build-cache-failure"):
            for path in invalid:
                if self.db.has_path_failed(path):
                    self.msg(LVL_ERROR, f"builder for `{path}' failed previously (cached)")
                    self.trace(f"@ build-failed {g.drv_path} - cached")
                    self._done(g, Result.CACHED_FAILURE)
                    return
        if invalid and self.store.may_substitute() and substitutes_allowed(g.drv):
            failed = 0
            for path in invalid:
                ok = self._repair_substitute(path) if repair else self._substitute_counted(path)
                failed += ok is False
            if failed and not self.settings.get_bool("build-fallback"):
                raise StoreError(
                    f"some substitutes for the outputs of derivation `{g.drv_path}' failed "
                    "(usually happens due to networking issues); try `--fallback' to build "
                    "derivation from source "
                )
            invalid = self._invalid_outputs(g, check_hash=repair)
        if not invalid and self.mode == BuildMode.NORMAL:
            self._done(g, Result.ALREADY_VALID)
            return
        if not invalid and repair:
            self._repair_closure(g)
            return
        if invalid and self.mode == BuildMode.CHECK:
            raise StoreError(
                f"some outputs of `{g.drv_path}' are not valid, so checking is not possible"
            )
        g.wanted = None  # from now on every output counts
        self._add_inputs(g)

    # -- output validity, substitution and repair --------------------------------------------

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

    def _invalid_outputs(self, g: Goal, *, check_hash: bool) -> list[str]:
        """Upstream `checkPathValidity(false, checkHash)` over the wanted outputs."""
        return [
            p
            for p in sorted(self._wanted_outputs(g).values())
            if not self.db.is_valid(p) or (check_hash and not self.contents_good(p))
        ]

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
                sandbox.remove_tree(dest)
                try:
                    digest, size = sub._download(entry.url, entry.compression, dest)
                    sub._check(hit.narinfo, path, digest, size)
                except substituter.FetchError as exc:
                    sandbox.remove_tree(dest)
                    self.msg(LVL_INFO, str(exc))
                    self.trace(f"@ substituter-failed {path} 1 {exc}")
                    if "hash mismatch" in str(exc):
                        break
                    continue
                except BaseException:
                    sandbox.remove_tree(dest)
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
        if any(_failed(d) for d in g.deps):
            raise StoreError(
                f"some paths in the output closure of derivation ‘{g.drv_path}’ could not be "
                "repaired"
            )
        self._done(g, Result.ALREADY_VALID)

    def _substitute(self, path: str) -> bool:
        try:
            return self.store.substitute(self.store.sd.parse_lax(path))
        except StoreError as exc:
            self.msg(LVL_ERROR, str(exc))
            return False

    def closure(self, paths: set[str]) -> set[str]:
        return self.closure_with({})(paths)

    def _try_to_build(self, g: Goal) -> bool:
        """Lock the outputs and start the builder; False if it has to wait or finished."""
        assert g.drv is not None
        drv = g.drv
        out_paths = sorted(o.path for o in drv.outputs.values())
        local = self.offloader.local_builds() if self.offloader else len(self.running)
        if local >= self.max_jobs and self.offloader is None:
            return False
        if g.locks is None:
            locks = PathLocks()
            if not locks.lock(out_paths, wait=False):
                if not self.waiting_message_shown:
                    self.msg(LVL_ERROR, "waiting for locks or build slots...")
                    self.waiting_message_shown = True
                g.waiting_since = time.monotonic()
                return False
            g.locks = locks
        repair = self.mode == BuildMode.REPAIR
        valid = [
            p for p in out_paths if self.db.is_valid(p) and (not repair or self.contents_good(p))
        ]
        if self.mode != BuildMode.CHECK and len(valid) == len(out_paths):
            self.msg(
                LVL_DEBUG, f"skipping build of derivation `{g.drv_path}', someone beat us to it"
            )
            self._release_locks(g, delete=True)
            self._done(g, Result.ALREADY_VALID)
            return False
        if self.mode == BuildMode.CHECK:
            g.missing = out_paths
        else:
            g.missing = [p for p in out_paths if p not in valid]
        # Existing but invalid outputs go; corrupt valid ones stay until replaced (repair).
        for p in out_paths:
            if not self.db.is_valid(p) and os.path.lexists(p):
                sandbox.remove_tree(p)
        try:
            if self.offloader is not None:
                # Upstream `tryBuildHook`, then a local build slot (preferLocalBuild builds
                # here even with --max-jobs=0).
                prefer_local = drv.env.get("preferLocalBuild") == "1" and can_build_locally(
                    drv.platform, self.this_system
                )
                reply = "decline"
                if not prefer_local:
                    reply = self.offloader.try_build(g, willing=local < self.max_jobs)
                if reply == "accept":
                    return True
                if reply == "postpone" or (
                    local >= self.max_jobs and not (prefer_local and local == 0)
                ):
                    self._release_locks(g, delete=False)
                    return False
            self._start_builder(g)
        except BuildError as exc:
            self.msg(LVL_ERROR, str(exc))
            self.trace(f"@ build-failed {g.drv_path} - 0 {exc}")
            self._cleanup(g, failed=True)
            self._done(g, Result.INPUT_REJECTED)
            return False
        except BaseException as exc:
            if g.running is not None:
                self.running.pop(g.running.fd, None)
                self._kill(g)
                g.running = None
            self._cleanup(g, failed=True)
            if not isinstance(exc, Exception):
                raise
            text = str(exc) if not isinstance(exc, OSError) or not exc.filename else (
                f"{exc.strerror}: {exc.filename}")  # fmt: skip
            raise StoreError(text) from None
        return True

    def _release_locks(self, g: Goal, *, delete: bool) -> None:
        if g.locks is not None:
            g.locks.set_deletion(delete)
            g.locks.unlock()
            g.locks = None

    # -- starting a builder ------------------------------------------------------------------

    def _start_builder(self, g: Goal) -> None:
        assert g.drv is not None
        drv = g.drv
        store = self.store
        settings = self.settings
        paths = show_paths(g.missing)
        if self.mode == BuildMode.REPAIR:
            text = f"repairing path(s) {paths}"
        elif self.mode == BuildMode.CHECK:
            text = f"checking path(s) {paths}"
        elif g.nr_rounds > 1:
            text = f"building path(s) {paths} (round {g.cur_round}/{g.nr_rounds})"
        else:
            text = f"building path(s) {paths}"
        self.msg(LVL_INFO, text)

        builtin_name = (
            drv.builder[len("builtin:") :] if drv.builder.startswith("builtin:") else None
        )
        if builtin_name is not None and builtin_name not in builtins.BUILTIN_NAMES:
            raise BuildError(f"unsupported builtin function '{builtin_name}'")
        use_chroot = settings.get_bool("build-use-chroot") and builtin_name is None
        root = os.geteuid() == 0
        # Upstream's unprivileged mode: not root, the build gets a user namespace of its own.
        rootless = not root and use_chroot and sandbox.user_namespaces_available()
        if not root and use_chroot and not rootless:
            use_chroot = False
            self.msg(
                LVL_ERROR,
                "warning: the daemon is not running as root and cannot create user "
                "namespaces: building without a chroot, namespaces or build users",
            )
        group = settings.get("build-users-group")
        if root and group:
            user = sandbox.acquire_build_user(group, store.config.state_dir)
            if user is None:
                raise StoreError(
                    "all build users are currently in use; consider creating additional users "
                    f"and adding them to the `{group}' group"
                )
            g.user = user
            sandbox.kill_user(user.uid)
        fixed = environment.is_fixed_output_build(drv)
        base = os.path.basename(g.drv_path)
        g.top_dir = environment.create_build_dir(base)
        if use_chroot:
            g.tmp_dir = os.path.join(g.top_dir, "top")
            os.mkdir(g.tmp_dir, 0o700)
            in_sandbox = f"/tmp/{environment.build_dir_name(base)}-0"
        else:
            g.tmp_dir = g.top_dir
            in_sandbox = g.tmp_dir
            if builtin_name is None and os.path.exists(environment.HOMELESS):
                raise StoreError(f"directory `{environment.HOMELESS}' exists; please remove it")
        if g.user is not None:
            os.chown(g.tmp_dir, g.user.uid, g.user.gid)
        self._export_references_graph(g, g.tmp_dir)
        cores = settings.get_int("build-cores", 0)
        env = environment.builder_environment(
            drv, store_dir=self.store_dir, cores=cores, build_dir=in_sandbox
        )
        spec = sandbox.ChildSpec(
            builder=drv.builder,
            args=list(drv.args),
            env=env,
            work_dir=in_sandbox,
            uid=g.user.uid if g.user else None,
            gid=g.user.gid if g.user else None,
            groups=g.user.groups if g.user else [],
            private_network=True,
            personality=self._personality(drv.platform),
            parent_pid=os.getpid(),
        )
        slirp: str | None = None
        host_loopback = not settings.get_bool("isolate-host-loopback")
        if use_chroot and fixed:
            slirp = self._slirp_program()
            spec.host_loopback = host_loopback
        if use_chroot:
            uid = g.user.uid if g.user else os.getuid()
            gid = g.user.gid if g.user else os.getgid()
            if rootless:
                uid, gid = sandbox.GUEST_UID, sandbox.GUEST_GID
                spec.userns = (os.getuid(), os.getgid())
                spec.writable = frozenset({in_sandbox})
                spec.store_dir = self.store_dir
            g.chroot = g.drv_path + ".chroot"
            binds: dict[str, str] = {in_sandbox: g.tmp_dir}
            for item in (settings.get("build-chroot-dirs") + " "
                         + settings.get("build-extra-chroot-dirs")).split():  # fmt: skip
                target, eq, source = item.partition("=")
                binds[target] = source if eq else target
            inputs = sorted(p for p in g.input_paths if p not in set(g.missing))
            spec.binds = sandbox.prepare_chroot(
                g.chroot,
                store_dir=self.store_dir,
                uid=uid,
                gid=gid,
                build_gid=g.user.gid if g.user else None,
                fixed_output=fixed,
                slirp=slirp is not None,
                host_loopback=host_loopback,
                inputs=inputs,
                binds=binds,
                rootless=rootless,
            )
            spec.chroot = g.chroot
        if builtin_name is not None:
            out = drv.outputs["out"].path if "out" in drv.outputs else ""
            if out and self.mode == BuildMode.CHECK and g.chroot is None:
                out = self._redirect(g, out)  # the valid output stays as it is
            drv_path = g.drv_path
            spec.builtin = lambda: builtins.run_builtin(builtin_name, drv, out, drv_path)

        if not can_build_locally(drv.platform, self.this_system) and (
            drv.platform.partition("-")[2] != self.this_system.partition("-")[2]
            or builtin_name is not None
        ):
            self.trace(f"@ unsupported-platform {g.drv_path} {drv.platform}")
            raise BuildError(
                f"a `{drv.platform}' is required to build `{g.drv_path}', "
                f"but I am a `{self.this_system}'"
            )

        if self.mode == BuildMode.REPAIR and spec.chroot is None:
            # No hash rewriting here: the corrupt valid outputs are moved aside while the
            # builder recreates them in place, and put back if the build fails.
            for p in g.missing:
                if os.path.lexists(p) and p not in g.moved_aside:
                    aside = f"{p}.old-{os.getpid()}-{random.randrange(1 << 31)}"
                    os.rename(p, aside)
                    g.moved_aside[p] = aside

        log: BuildLog | None = None
        if settings.get_bool("build-keep-log") and not settings.lose_logs:
            log = BuildLog(store.config.log_dir, g.drv_path, settings.log_compression)
        read_fd, write_fd = os.pipe()
        pid_r, pid_w = os.pipe()
        net_w: int | None = None
        if slirp is not None:
            spec.network_fd, net_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read_fd)
            os.close(pid_r)
            if net_w is not None:
                os.close(net_w)
            sandbox.child_main(spec, write_fd, pid_w)
        os.close(write_fd)
        os.close(pid_w)
        kill_pid = _read_pid(pid_r) or pid
        os.close(pid_r)
        now = time.monotonic()
        g.running = Running(pid, kill_pid, read_fd, now, now, log)
        error: str | None = None
        rest = b""
        if net_w is not None:
            assert slirp is not None and spec.network_fd is not None
            os.close(spec.network_fd)
            try:
                # Networking for the build's namespace from outside it (upstream: "running the
                # builder in the global network namespace would give it access to the global
                # namespace of abstract sockets").
                g.slirp = _Slirp.start(
                    slirp, kill_pid, host_loopback, userns=spec.userns is not None
                )
                os.write(net_w, b"1")
            except (OSError, sandbox.SandboxError) as exc:
                error = str(exc)
            finally:
                os.close(net_w)
        if error is None:
            error, rest = self._handshake(read_fd)
        if error is not None:
            self._kill(g)
            os.close(read_fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            if log is not None:
                log.close()
            g.running = None
            self._cleanup(g, failed=True)
            raise StoreError(error)
        self.running[read_fd] = g
        self.trace(
            f"@ build-started {g.drv_path} - {drv.platform} {log.path if log else ''} {kill_pid}"
        )
        if rest:
            self._handle_output(g, rest)

    def _slirp_program(self) -> str | None:
        """Upstream: without slirp4netns or /dev/net/tun a fixed-output build runs with no
        network at all (never in the host's network namespace)."""
        program = shutil.which("slirp4netns")
        if program is None:
            self.msg(LVL_ERROR, "`slirp4netns' can't be found in PATH, network access disabled")
            return None
        if not os.path.exists("/dev/net/tun"):
            self.msg(LVL_ERROR, "`/dev/net/tun' is missing, network access disabled")
            return None
        return program

    def _handshake(self, fd: int) -> tuple[str | None, bytes]:
        """Read the child's first line: empty means the set-up succeeded."""
        data = b""
        deadline = time.monotonic() + 60
        while b"\n" not in data:
            r, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not r:
                return "while setting up the build environment: timed out", b""
            chunk = os.read(fd, READ_SIZE)
            if not chunk:
                return data.decode(errors="replace").strip() or "builder failed to start", b""
            data += chunk
        line, _, rest = data.partition(b"\n")
        if line:
            return line.decode(errors="replace"), b""
        return None, rest

    def _personality(self, system: str) -> int | None:
        machine = platform.machine()
        flags = sandbox.ADDR_NO_RANDOMIZE
        if (
            system == "i686-linux" and (self.this_system == "x86_64-linux" or machine == "x86_64")
        ) or (system == "armhf-linux" and self.this_system.startswith("aarch64")):
            flags |= sandbox.PER_LINUX32
        if self.settings.get_bool("build-impersonate-linux-26") and system in (
            "i686-linux", "x86_64-linux"
        ):  # fmt: skip
            flags |= sandbox.UNAME26
        return flags

    def _export_references_graph(self, g: Goal, build_dir: str) -> None:
        assert g.drv is not None
        spec = g.drv.env.get("exportReferencesGraph")
        if not spec:
            return
        tokens = spec.split()
        if len(tokens) % 2:
            raise BuildError(f"odd number of tokens in `exportReferencesGraph': `{spec}'")
        for file_name, path in zip(tokens[::2], tokens[1::2], strict=True):
            from guixsvc.store.paths import InvalidName, check_name

            try:
                check_name(file_name)
            except InvalidName as exc:
                raise BuildError(str(exc)) from None
            if not self.store.sd.is_in_store(path):
                raise BuildError(f"path `{path}' is not in the store")
            store_path = self.store.sd.to_store_path(path)
            if not self.db.is_valid(store_path):
                raise BuildError(f"path `{store_path}' is not valid")
            paths = self.closure({store_path})
            for p in list(paths):
                if p.endswith(".drv"):
                    for out in self.db.derivation_outputs(p).values():
                        if self.db.is_valid(out):
                            paths |= self.closure({out})
            lines = []
            for p in sorted(paths, key=os.fsencode):
                refs = sorted(self.db.references(p), key=os.fsencode)
                lines.append(f"{p}\n\n{len(refs)}\n" + "".join(r + "\n" for r in refs))
            target = os.path.join(build_dir, file_name)
            with open(target, "w") as f:
                f.write("".join(lines))
            if g.user is not None:
                os.chown(target, g.user.uid, g.user.gid)

    # -- waiting -----------------------------------------------------------------------------

    def _wait(self) -> None:
        now = time.monotonic()
        silent = self.settings.get_int("build-max-silent-time", 0)
        total = self.settings.get_int("build-timeout", 0)
        deadline = now + 1.0
        for g in self.running.values():
            r = g.running
            assert r is not None
            if silent:
                deadline = min(deadline, r.last_output + silent)
            if total:
                deadline = min(deadline, r.started + total)
        timeout = max(deadline - now, 0)
        readable, _, _ = select.select(list(self.running), [], [], timeout)
        for fd in readable:
            g = self.running[fd]
            r = g.running
            assert r is not None
            try:
                chunk = os.read(fd, READ_SIZE)
            except OSError:
                chunk = b""
            if chunk:
                r.last_output = time.monotonic()
                self._handle_output(g, chunk)
            else:
                self._builder_done(g)
        now = time.monotonic()
        for g in list(self.running.values()):
            r = g.running
            assert r is not None
            if silent and now - r.last_output >= silent:
                r.timed_out = f"{g.name} timed out after {silent} seconds of silence"
            elif total and now - r.started >= total:
                r.timed_out = f"{g.name} timed out after {total} seconds"
            if r.timed_out:
                self._builder_done(g)

    def _handle_output(self, g: Goal, chunk: bytes) -> None:
        r = g.running
        assert r is not None
        r.log_size += len(chunk)
        limit = self.settings.get_int("build-max-log-size", 0)
        if limit and r.log_size > limit:
            r.timed_out = f"{g.name} killed after writing more than {limit} bytes of log output"
            self._builder_done(g)
            return
        if r.log is not None:
            r.log.write(chunk)
        self.builder_output(chunk, r.kill_pid)

    def _kill(self, g: Goal) -> None:
        r = g.running
        if r is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(r.kill_pid, signal.SIGKILL)
        if r.kill_pid == r.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.pid, signal.SIGKILL)
        if g.user is not None:
            with contextlib.suppress(sandbox.SandboxError):
                sandbox.kill_user(g.user.uid)

    def _builder_done(self, g: Goal) -> None:
        """Reap a builder whose log ended (or that timed out) and process its outputs.

        Whatever goes wrong in there, the goal's clean-up runs before this returns or raises:
        the build user's processes are killed and the user released, the chroot and the build
        tree removed, the output locks released.  An unexpected error while processing the
        outputs rejects them (and the worker goes on with its other goals)."""
        r = g.running
        assert r is not None
        del self.running[r.fd]
        if self.offloader is not None and self.offloader.reap(g, r):
            return  # an offloaded build that failed: handled (or to be tried elsewhere)
        try:
            self._finish_build(g, r)
        except (StoreError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if g.result is None and g.running is None:
                self._reject(g, f"error: processing the outputs of `{g.drv_path}': {exc}")
            else:
                raise
        finally:
            if g.running is None:
                self._cleanup(g, failed=g.result not in (Result.BUILT, Result.ALREADY_VALID))
                if g.result is None:
                    self._done(g, Result.OUTPUT_REJECTED)

    def _finish_build(self, g: Goal, r: Running) -> None:
        if r.timed_out:
            self._kill(g)
        else:
            # Drain what is left (the pipe reached EOF or is about to).
            pass
        os.close(r.fd)
        status = r.status if r.status is not None else os.waitpid(r.pid, 0)[1]
        if g.user is not None:
            with contextlib.suppress(sandbox.SandboxError):
                sandbox.kill_user(g.user.uid)
        if r.log is not None:
            r.log.close()
        g.running = None
        assert g.drv is not None
        if r.timed_out:
            self.msg(LVL_ERROR, r.timed_out)
            self.trace(f"@ build-failed {g.drv_path} - timeout")
            if g.chroot is None:
                # Built in place: what the builder left in the store is made safe too.
                self._move_failed_outputs(g)
            self._cleanup(g, failed=True)
            self._done(g, Result.TIMED_OUT)
            return
        fixed = environment.is_fixed_output_build(g.drv)
        if status != 0:
            self._move_failed_outputs(g)
            message = f"builder for `{g.drv_path}' {_status_to_string(status)}"
            self.msg(LVL_ERROR, message)
            self.trace(f"@ build-failed {g.drv_path} - 1 {message}")
            if self.settings.get_bool("build-cache-failure") and not fixed:
                for out in g.drv.outputs.values():
                    self.db.add_failed_path(out.path)
            self._cleanup(g, failed=True)
            self._done(g, Result.TRANSIENT_FAILURE if fixed else Result.PERMANENT_FAILURE)
            return
        try:
            finished = self._register_outputs(g)
        except NotDeterministic as exc:
            self._reject(g, str(exc))
            return
        except BuildError as exc:
            self._reject(g, str(exc))
            return
        except StoreError:
            self._cleanup(g, failed=True)
            raise
        if not finished:
            # Another round.
            self._cleanup(g, failed=False, keep_locks=True)
            g.cur_round += 1
            self._start_builder(g)
            assert g.running is not None
            return
        self.trace(f"@ build-succeeded {g.drv_path} -")
        self._cleanup(g, failed=False)
        self._done(g, Result.BUILT)

    def _reject(self, g: Goal, message: str) -> None:
        assert g.drv is not None
        self.msg(LVL_ERROR, message)
        self.trace(f"@ build-failed {g.drv_path} - 1 {message}")
        if self.settings.get_bool("build-cache-failure"):
            for out in g.drv.outputs.values():
                self.db.add_failed_path(out.path)
        if self.mode != BuildMode.CHECK:
            for p in g.missing:
                if not self.db.is_valid(p):
                    sandbox.remove_tree(p)
        self._cleanup(g, failed=True)
        self._done(g, Result.OUTPUT_REJECTED)

    def _actual(self, g: Goal, path: str) -> str:
        if path in g.redirected:
            return g.redirected[path]
        return g.chroot + path if g.chroot else path

    def _redirect(self, g: Goal, path: str) -> str:
        """Upstream `addHashRewrite`: the output's name with the hash part replaced by the
        first 32 nix-base32 characters of SHA-256(`rewrite:DRV:PATH`)."""
        store = self.store.config.store_dir
        digest = hashlib.sha256(f"rewrite:{g.drv_path}:{path}".encode()).digest()
        redirected = f"{store}/{base32.encode(digest)[:32]}{path[len(store) + 33 :]}"
        sandbox.remove_tree(redirected)
        g.redirected[path] = redirected
        self.msg(LVL_CHATTY, f"output '{path}' redirected to '{redirected}'")
        return redirected

    def _move_failed_outputs(self, g: Goal) -> None:
        """Upstream keeps a failed build's outputs in the store for debugging; they are made
        safe first (CVE-2024-52867): no setuid/setgid bit, no group/world write permission,
        owned by the daemon, never by the build user that the next builds run as."""
        if self.mode != BuildMode.NORMAL:
            return
        owner = (os.geteuid(), os.getegid()) if os.geteuid() == 0 else None
        for p in g.missing:
            actual = self._actual(g, p)
            if not os.path.lexists(actual) or (g.chroot is not None and os.path.lexists(p)):
                continue
            try:
                outputs.secure_tree(actual, owner)
                if g.chroot is not None:
                    os.rename(actual, p)
            except Exception as exc:  # a failed output that cannot be made safe goes
                self.msg(LVL_ERROR, f"error: {exc}")
                with contextlib.suppress(OSError):
                    sandbox.remove_tree(actual)

    def _register_outputs(self, g: Goal) -> bool:
        """Process the outputs of a successful round; True when the goal is finished."""
        assert g.drv is not None
        drv = g.drv
        uid = g.user.uid if g.user else None
        fixed = environment.is_fixed_output_build(drv)
        inodes: set[tuple[int, int]] = set()
        all_paths = g.input_paths | {o.path for o in drv.outputs.values()}
        infos: dict[str, ValidPathInfo] = {}
        check_locations: dict[str, str] = {}
        for p in g.missing:
            actual = self._actual(g, p)
            if not os.path.lexists(actual):
                raise BuildError(f"builder for `{g.drv_path}' failed to produce output path `{p}'")
            outputs.check_permissions(actual, uid)
            if fixed:
                # CVE-2024-27297: a fresh copy no builder descriptor can reach.
                actual = self._fresh_copy(g, p, actual)
            if g.chroot and self.mode == BuildMode.REPAIR:
                replace_valid_path(p, actual)
                actual = p
            elif g.chroot and self.mode != BuildMode.CHECK:
                os.rename(actual, p)
                actual = p
            name = next(n for n, o in drv.outputs.items() if o.path == p)
            outputs.check_fixed_output(
                drv, name, p, actual, self.trace if self.settings.print_build_trace else None
            )
            info = outputs.scan_output(
                p,
                actual,
                build_uid=None if fixed else uid,
                inodes_seen=inodes,
                candidates=all_paths,
                drv_path=g.drv_path,
            )
            if self.mode == BuildMode.CHECK:
                old = self.db.path_info(p)
                if old is not None and old.nar_hash != info.nar_hash:
                    if self.settings.keep_failed:
                        dst = p + "-check"
                        sandbox.remove_tree(dst)
                        os.rename(actual, dst)
                        raise StoreError(
                            f"derivation `{g.drv_path}' may not be deterministic: output `{p}' "
                            f"differs from ‘{dst}’"
                        )
                    raise StoreError(
                        f"derivation `{g.drv_path}' may not be deterministic: output `{p}' differs"
                    )
                self.trace(f"@ build-succeeded {g.drv_path} -")
                check_locations[p] = actual
                continue
            infos[p] = info
        if self.mode == BuildMode.CHECK:
            return True
        outputs.check_reference_constraints(drv, infos, self.closure_with(infos))
        if g.prev_infos is not None:
            for p, info in infos.items():
                prev = g.prev_infos.get(p)
                if prev is not None and (
                    prev.nar_hash != info.nar_hash or prev.references != info.references
                ):
                    check = p + "-check"
                    if os.path.lexists(check):
                        raise NotDeterministic(
                            f"output ‘{p}’ of ‘{g.drv_path}’ differs from ‘{check}’ "
                            "from previous round"
                        )
                    raise NotDeterministic(
                        f"output ‘{p}’ of ‘{g.drv_path}’ differs from previous round"
                    )
        if g.cur_round < g.nr_rounds:
            g.prev_infos = infos
            for p in infos:
                if self.settings.keep_failed:
                    check = p + "-check"
                    sandbox.remove_tree(check)
                    os.rename(p, check)
                else:
                    sandbox.remove_tree(p)
            return False
        if self.settings.get_bool("auto-optimise-store"):
            for p in infos:
                optimise_path(self.store_dir, p)
        with self.db.transaction():
            self.db.register_valid_paths(list(infos.values()))
        for p in infos:
            self._good_cache[p] = True
        return True

    def _fresh_copy(self, g: Goal, p: str, actual: str) -> str:
        """Replace the output at `actual` by a copy owned by the daemon (upstream copies each
        fixed output to `<out>.tmp` and renames it back); returns the copy's location."""
        copy = f"{actual}.tmp-{os.getpid()}"
        sandbox.remove_tree(copy)
        outputs.copy_fresh(actual, copy)
        sandbox.remove_tree(actual)
        os.rename(copy, actual)
        return actual

    def closure_with(self, infos: dict[str, ValidPathInfo]) -> Callable[[Iterable[str]], set[str]]:
        def closure(paths: Iterable[str]) -> set[str]:
            seen: set[str] = set()
            todo = list(paths)
            while todo:
                p = todo.pop()
                if p in seen:
                    continue
                seen.add(p)
                refs = infos[p].references if p in infos else self.db.references(p)
                todo.extend(r for r in refs if r not in seen)
            return seen

        return closure

    def _cleanup(self, g: Goal, *, failed: bool, keep_locks: bool = False) -> None:
        """Remove the chroot and build tree (or keep it), stop the build user's processes and
        release it, release the locks.  Idempotent, and every step runs whatever the others
        did: a step that fails is reported, never allowed to keep the user or the locks."""

        def step(what: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as exc:  # clean-up goes on; the error is reported
                self.msg(LVL_ERROR, f"error: {what} of `{g.drv_path}': {exc}")

        if g.slirp is not None:
            step("stopping the network helper", lambda: _stop_process(g))
        for redirected in list(g.redirected.values()):
            step("removing a redirected output", lambda r=redirected: sandbox.remove_tree(r))
        g.redirected.clear()
        if not keep_locks:
            for p, aside in list(g.moved_aside.items()):

                def restore(p: str = p, aside: str = aside) -> None:
                    if failed:
                        sandbox.remove_tree(p)
                        os.rename(aside, p)
                    else:
                        sandbox.remove_tree(aside)

                step("restoring the outputs", restore)
            g.moved_aside.clear()
        if g.user is not None:
            uid = g.user.uid
            step("killing the processes of the build user", lambda: sandbox.kill_user(uid))
        if g.chroot is not None:
            chroot = g.chroot
            g.chroot = None
            step("removing the chroot", lambda: sandbox.remove_tree(chroot))
        if g.top_dir is not None:
            if failed and self.settings.keep_failed:
                self.msg(LVL_ERROR, f"note: keeping build directory `{g.top_dir}'")
                step("handing over the build directory", lambda: self._give_kept_tree(g))
            else:
                top = g.top_dir
                step("removing the build directory", lambda: sandbox.remove_tree(top))
            g.top_dir = g.tmp_dir = None
        if g.user is not None:
            g.user.release()
            g.user = None
        if not keep_locks:
            self._release_locks(g, delete=not failed)

    def _give_kept_tree(self, g: Goal) -> None:
        """Upstream `deleteTmpDir` with keep-failed: the tree loses setuid/setgid bits and
        group/world write permission, and belongs to the client (root when the client is root
        or unknown) rather than to a build user that later builds run as."""
        top, tmp = g.top_dir, g.tmp_dir
        if top is None or tmp is None:
            return
        owner: tuple[int, int] | None = None
        client = self.store.client_uid
        to_client = client is not None and client > 0
        if os.geteuid() == 0:
            uid = client if to_client and client is not None else 0
            try:
                gid = pwd.getpwuid(uid).pw_gid if uid else 0
            except KeyError:
                gid = 0
            owner = (uid, gid)
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o755)
        outputs.secure_tree(tmp, owner)
        # As upstream, a tree handed to its (non-root) client replaces its root-owned parent.
        if to_client and tmp != top and os.path.isdir(os.path.join(top, "top")):
            pivot = top + ".pivot"
            os.rename(top, pivot)
            os.rename(os.path.join(pivot, "top"), top)
            sandbox.remove_tree(pivot)


@dataclass
class _Slirp:
    """A running slirp4netns serving one build's network namespace."""

    proc: subprocess.Popen[bytes]
    exit_fd: int  # closing it (or the worker dying) makes slirp4netns exit

    @classmethod
    def start(
        cls, program: str, pid: int, host_loopback: bool, timeout: float = 20, *, userns: bool
    ) -> _Slirp:
        """Start slirp4netns for the network namespace of `pid` and wait until `tap0` is there.

        As root it enters the namespace itself (`--netns-type=pid`); for an unprivileged daemon
        (`userns`) it first joins the build's user namespace, which owns the network namespace
        and which the daemon's uid, its creator, holds every capability in (`--userns-path`);
        in root mode only, `--enable-sandbox` puts it
        in its own mount namespace without capabilities, `--enable-seccomp` restricts its
        system calls, and our own filter keeps it from creating Unix sockets (the host's
        abstract ones are in its network namespace); `--exit-fd` ties its life to this
        worker."""
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        args = [program, "--enable-seccomp", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                "--mtu=1500"]  # fmt: skip
        if userns:
            # slirp4netns's own sandbox needs uid 0 in the namespace it starts in (it fails
            # with "setegid(0)" otherwise): see README, "Rootless mode".
            args.append(f"--userns-path=/proc/{pid}/ns/user")
        else:
            args.append("--enable-sandbox")
        if not host_loopback:
            args.append("--disable-host-loopback")
        args += [str(pid), sandbox.TAP_NAME]
        bpf = seccomp.build_slirp_filter()
        try:
            proc = subprocess.Popen(
                args,
                pass_fds=(ready_w, exit_r),
                preexec_fn=None if bpf is None else lambda: seccomp.slirp_preexec(bpf),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise
        os.close(ready_w)
        os.close(exit_r)
        slirp = cls(proc, exit_w)
        try:
            ready, _, _ = select.select([ready_r], [], [], timeout)
            if not ready or os.read(ready_r, 1) != b"1":
                raise sandbox.SandboxError(
                    f"while setting up the build environment: `{program}' failed to start"
                )
        except BaseException:
            slirp.stop()
            raise
        finally:
            os.close(ready_r)
        return slirp

    def stop(self) -> None:
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _stop_process(g: Goal) -> None:
    slirp = g.slirp
    g.slirp = None
    if slirp is not None:
        slirp.stop()


def _failed(g: Goal) -> bool:
    return g.result is not None and g.result not in (Result.BUILT, Result.ALREADY_VALID)


def _read_pid(fd: int) -> int | None:
    data = b""
    while True:
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    try:
        return int(data.strip())
    except ValueError:
        return None


def build_paths(store: LocalStore, items: list[str], mode: BuildMode) -> None:
    """Entry point for LocalStore.build_paths."""
    Worker(store, mode).run(items)


def repair_path(store: LocalStore, path: str) -> None:
    """Upstream `LocalStore::repairPath` (what `verify --repair` needs): substitute the item
    again, and if that is impossible rebuild its valid deriver in repair mode."""
    worker = Worker(store, BuildMode.REPAIR)
    if worker._repair_substitute(path) is True:
        return
    info = store.db.path_info(path)
    deriver = info.deriver if info is not None else None
    if not deriver or not store.db.is_valid(deriver):
        raise StoreError(f"cannot repair path `{path}'", 1)
    Worker(store, BuildMode.REPAIR).run([deriver])
