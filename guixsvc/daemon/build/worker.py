"""BuildPaths: realising derivations the way upstream's `Worker` does.

One `Worker` per request (spec/build-env.md §2): every requested derivation becomes a goal,
input derivations become goals first (shared work done once), goals whose outputs are valid are
skipped, output paths are locked (`<out>.lock`) so two sessions never build the same output, and
up to `build-max-jobs` builders run at once.  The worker is a single-threaded event loop: it
`select`s on the builders' log pipes, forwards and stores their output, enforces the silence
and total timeouts, and processes outputs when a builder's pipe reaches end-of-file.  The steps
of goals come from derivation_goal.py, local_build.py, substitution_goal.py and repair.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING

from guixsvc.daemon.build import sandbox
from guixsvc.daemon.build.derivation_goal import DerivationGoal
from guixsvc.daemon.build.goal import FAILURES_PERMANENT, LVL_ERROR, Goal, Phase, Result, is_failed
from guixsvc.daemon.build.local_build import READ_SIZE, LocalBuild
from guixsvc.daemon.build.outputs import show_paths
from guixsvc.daemon.build.repair import Repair
from guixsvc.daemon.build.substitution_goal import SubstitutionGoal
from guixsvc.protocol.ops import BuildMode
from guixsvc.protocol.store_api import StoreError
from guixsvc.store.derivation import Derivation, DerivationError, read_derivation
from guixsvc.store.derived_path import DerivedPath

if TYPE_CHECKING:
    from guixsvc.daemon.localstore import LocalStore


class Interrupted(StoreError):
    """The client hung up during the request (upstream's `Interrupted`)."""


class Worker(DerivationGoal, LocalBuild, SubstitutionGoal, Repair):
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
        #: Watched while builders run (None: no client to watch, or it is not quiet).
        self.client_fd = store.client_fd
        self._good_cache: dict[str, bool] = {}
        from guixsvc.offload.hook import Offloader

        #: Builds sent to other machines (`guix offload`); None when not configured.
        self.offloader = Offloader.for_worker(self) if mode == BuildMode.NORMAL else None

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
        g.mode = BuildMode.REPAIR if self.mode == BuildMode.REPAIR else BuildMode.NORMAL
        self.goals[drv_path] = g
        if not self.db.is_valid(drv_path):
            g.result = Result.PERMANENT_FAILURE
            # build.cc's quotes: ‘...’
            self.msg(LVL_ERROR, f"cannot build missing derivation ‘{drv_path}’")
            return g
        self.store.add_temp_root(self.store.sd.parse_lax(drv_path))
        g.drv = self._read_drv(drv_path)
        for out in g.drv.outputs.values():
            self.store.add_temp_root(self.store.sd.parse_lax(out.path))
        return g

    def run(self, items: list[str]) -> None:
        top: list[tuple[str, Goal | None]] = []
        failed_paths: list[str] = []
        for item in items:
            derived = DerivedPath.parse(item)
            path = derived.path
            if derived.is_derivation:
                g = self.goal(path, set(derived.outputs) if derived.outputs else None)
                g.top_level = True
                g.mode = self.mode
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
                or (not keep_going and any(is_failed(d) for d in g.deps))
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
        if result in FAILURES_PERMANENT:
            self.permanent_failure = True
        if not self.settings.keep_going and g.top_level and result != Result.CANCELLED:
            self.stop = True

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
        watched = list(self.running)
        client = self.client_fd
        if client is not None:
            watched.append(client)
        readable, _, _ = select.select(watched, [], [], timeout)
        if client is not None and client in readable:
            readable.remove(client)
            self._check_client(client)
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

    def _check_client(self, fd: int) -> None:
        """The client's connection is readable while it should be quiet: if it hung up,
        interrupt the request (its builds are killed and cleaned up by `run`), as upstream's
        daemon does on SIGPOLL; if it merely sent something, stop watching it."""
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return
            except OSError:
                closed = True
        if closed:
            raise Interrupted("interrupted by the user")
        self.client_fd = None

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
