"""A derivation goal from its outputs' validity to their registration.

Upstream's `DerivationGoal`: outputs already valid or substitutable end the goal
(`haveDerivation`, `outputsSubstituted`); otherwise the input derivations become goals, and once
they are built the outputs are locked and the build started (`inputsRealised`, `tryToBuild`:
offloaded by guixsvc.offload.hook, or local_build.py); when the builder is done its outputs are
checked and registered (`buildDone`, `registerOutputs`), once per round with `--rounds`,
compared with the valid ones with `--check`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable

from guixsvc.daemon.build import environment, outputs, sandbox
from guixsvc.daemon.build.goal import LVL_DEBUG, LVL_ERROR, Goal, Phase, Result, Running, is_failed
from guixsvc.daemon.build.outputs import BuildError, NotDeterministic
from guixsvc.daemon.build.personality import can_build_locally
from guixsvc.daemon.build.repair import replace_valid_path
from guixsvc.daemon.build.state import WorkerState
from guixsvc.daemon.build.substitution_goal import substitutes_allowed
from guixsvc.protocol.ops import BuildMode
from guixsvc.protocol.store_api import StoreError
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.locks import PathLocks
from guixsvc.store.optimise import optimise_path
from guixsvc.store.safefs import remove_tree


def status_to_string(status: int) -> str:
    """Upstream `statusToString`: how a builder ended, for "builder for `D' ..."."""
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


class DerivationGoal(WorkerState):
    """The steps of a derivation goal, mixed into `Worker` (worker.py), whose state they use."""

    def _wanted_outputs(self, g: Goal) -> dict[str, str]:
        assert g.drv is not None
        names = g.wanted if g.wanted is not None else set(g.drv.outputs)
        return {n: g.drv.outputs[n].path for n in names if n in g.drv.outputs}

    def _add_inputs(self, g: Goal) -> None:
        """Upstream `outputsSubstituted`: the input derivations become goals only once the
        outputs could not all be substituted."""
        assert g.drv is not None
        for dep_path, names in sorted(g.drv.input_drvs.items()):
            dep = self.goal(dep_path, set(names))
            g.deps.append(dep)
            dep.waiters.append(g)
        g.phase = Phase.INPUTS

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
        failed_deps = [d for d in g.deps if is_failed(d)]
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
        repair = g.mode == BuildMode.REPAIR
        invalid = self._invalid_outputs(g, check_hash=repair)
        if not invalid and g.mode == BuildMode.NORMAL:
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
        if not invalid and g.mode == BuildMode.NORMAL:
            self._done(g, Result.ALREADY_VALID)
            return
        if not invalid and repair:
            self._repair_closure(g)
            return
        if invalid and g.mode == BuildMode.CHECK:
            raise StoreError(
                f"some outputs of `{g.drv_path}' are not valid, so checking is not possible"
            )
        g.wanted = None  # from now on every output counts
        self._add_inputs(g)

    def _invalid_outputs(self, g: Goal, *, check_hash: bool) -> list[str]:
        """Upstream `checkPathValidity(false, checkHash)` over the wanted outputs."""
        return [
            p
            for p in sorted(self._wanted_outputs(g).values())
            if not self.db.is_valid(p) or (check_hash and not self.contents_good(p))
        ]

    def closure(self, paths: set[str]) -> set[str]:
        return self.closure_with({})(paths)

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
        repair = g.mode == BuildMode.REPAIR
        valid = [
            p for p in out_paths if self.db.is_valid(p) and (not repair or self.contents_good(p))
        ]
        if g.mode != BuildMode.CHECK and len(valid) == len(out_paths):
            self.msg(
                LVL_DEBUG, f"skipping build of derivation `{g.drv_path}', someone beat us to it"
            )
            self._release_locks(g, delete=True)
            self._done(g, Result.ALREADY_VALID)
            return False
        if g.mode == BuildMode.CHECK:
            g.missing = out_paths
        else:
            g.missing = [p for p in out_paths if p not in valid]
        # Existing but invalid outputs go; corrupt valid ones stay until replaced (repair).
        for p in out_paths:
            if not self.db.is_valid(p) and os.path.lexists(p):
                remove_tree(p)
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
            message = f"builder for `{g.drv_path}' {status_to_string(status)}"
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
        if g.mode != BuildMode.CHECK:
            for p in g.missing:
                if not self.db.is_valid(p):
                    remove_tree(p)
        self._cleanup(g, failed=True)
        self._done(g, Result.OUTPUT_REJECTED)

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
            if g.mode == BuildMode.CHECK and g.chroot is None and g.redirected:
                self._rewrite_back(g, actual)
            if fixed:
                # CVE-2024-27297: a fresh copy no builder descriptor can reach.
                actual = self._fresh_copy(g, p, actual)
            if g.chroot and g.mode == BuildMode.REPAIR:
                replace_valid_path(p, actual)
                actual = p
            elif g.chroot and g.mode != BuildMode.CHECK:
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
            if g.mode == BuildMode.CHECK:
                old = self.db.path_info(p)
                if old is not None and old.nar_hash != info.nar_hash:
                    if self.settings.keep_failed:
                        dst = p + "-check"
                        remove_tree(dst)
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
        if g.mode == BuildMode.CHECK:
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
                    remove_tree(check)
                    os.rename(p, check)
                else:
                    remove_tree(p)
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
        remove_tree(copy)
        outputs.copy_fresh(actual, copy)
        remove_tree(actual)
        os.rename(copy, actual)
        return actual
