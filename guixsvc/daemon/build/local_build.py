"""Building on this machine: plan, child spec, spawn, and the clean-up of what a build took.

Upstream's `DerivationGoal::startBuilder`: the platform is checked first, then a build user is
taken, the build tree and (with `build-use-chroot`) the chroot are prepared, the child's
`sandbox.ChildSpec` is filled in and the builder forked; a fixed-output build gets slirp4netns
for its network namespace.  `_cleanup` gives all of it back whatever happened.  Output checks
are outputs.py's; the namespaces, chroot and build users sandbox.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import random
import select
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from guixsvc.daemon.build import builtins, environment, outputs, sandbox
from guixsvc.daemon.build.goal import LVL_CHATTY, LVL_ERROR, LVL_INFO, Goal, Running
from guixsvc.daemon.build.logs import BuildLog
from guixsvc.daemon.build.outputs import BuildError, show_paths
from guixsvc.daemon.build.personality import can_build_locally, personality
from guixsvc.daemon.build.slirp import Slirp
from guixsvc.daemon.build.state import WorkerState
from guixsvc.protocol.ops import BuildMode
from guixsvc.protocol.store_api import StoreError
from guixsvc.store import base32, nar
from guixsvc.store.safefs import remove_tree

READ_SIZE = 4096


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


@dataclass(frozen=True)
class BuildPlan:
    """How a build runs, decided before anything is taken for it."""

    builtin_name: str | None  # `builtin:NAME` builders run in the daemon's child
    use_chroot: bool
    rootless: bool  # not root: the build gets a user namespace of its own
    root: bool  # the daemon runs as root (build users possible)


class LocalBuild(WorkerState):
    """Starting and cleaning up a builder on this machine, mixed into `Worker` (worker.py),
    whose state it uses."""

    def _start_builder(self, g: Goal) -> None:
        """Upstream `startBuilder`: plan (nothing taken yet), then the child's spec (build user,
        build tree, chroot), then the builder itself."""
        plan = self._plan(g)
        spec, slirp, host_loopback = self._child_spec(g, plan)
        self._spawn(g, spec, slirp, host_loopback)

    def _plan(self, g: Goal) -> BuildPlan:
        """Announce the build and decide how it runs; raises BuildError for a builder or a
        platform this machine cannot run, before any resource is taken."""
        assert g.drv is not None
        drv = g.drv
        settings = self.settings
        paths = show_paths(g.missing)
        if g.mode == BuildMode.REPAIR:
            text = f"repairing path(s) {paths}"
        elif g.mode == BuildMode.CHECK:
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
        # The platform first: nothing (build user, build tree, chroot) is taken for a build
        # that cannot run here.
        if not can_build_locally(drv.platform, self.this_system) and (
            drv.platform.partition("-")[2] != self.this_system.partition("-")[2]
            or builtin_name is not None
        ):
            self.trace(f"@ unsupported-platform {g.drv_path} {drv.platform}")
            raise BuildError(
                f"a `{drv.platform}' is required to build `{g.drv_path}', "
                f"but I am a `{self.this_system}'"
            )
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
        return BuildPlan(builtin_name, use_chroot, rootless, root)

    def _child_spec(self, g: Goal, plan: BuildPlan) -> tuple[sandbox.ChildSpec, str | None, bool]:
        """Take a build user, create the build tree and (with a chroot) the chroot, and fill in
        what the child needs; returns the spec, the slirp4netns program of a fixed-output build
        with a network, and whether that network reaches the host's loopback."""
        assert g.drv is not None
        drv = g.drv
        store = self.store
        settings = self.settings
        builtin_name, use_chroot, rootless, root = (
            plan.builtin_name, plan.use_chroot, plan.rootless, plan.root
        )  # fmt: skip
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
            personality=personality(
                drv.platform, self.this_system, settings.get_bool("build-impersonate-linux-26")
            ),
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
        if builtin_name is None and g.mode == BuildMode.CHECK and g.chroot is None:
            # Upstream's hash rewriting: without a chroot the valid outputs cannot be built over,
            # so the builder sees other names for them (in its environment and arguments) and
            # the outputs' contents are rewritten back before they are compared.
            rewrites = {}
            for out_path in g.missing:
                redirected = self._redirect(g, out_path)
                rewrites[_hash_part(self.store_dir, out_path)] = _hash_part(
                    self.store_dir, redirected
                )
            spec.env = {k: _rewrite(v, rewrites) for k, v in spec.env.items()}
            spec.args = [_rewrite(a, rewrites) for a in spec.args]
        if builtin_name is not None:
            out = drv.outputs["out"].path if "out" in drv.outputs else ""
            if out and g.mode == BuildMode.CHECK and g.chroot is None:
                out = self._redirect(g, out)  # the valid output stays as it is
            drv_path = g.drv_path
            spec.builtin = lambda: builtins.run_builtin(builtin_name, drv, out, drv_path)

        if g.mode == BuildMode.REPAIR and spec.chroot is None:
            # No hash rewriting here: the corrupt valid outputs are moved aside while the
            # builder recreates them in place, and put back if the build fails.
            for p in g.missing:
                if os.path.lexists(p) and p not in g.moved_aside:
                    aside = f"{p}.old-{os.getpid()}-{random.randrange(1 << 31)}"
                    os.rename(p, aside)
                    g.moved_aside[p] = aside
        return spec, slirp, host_loopback

    def _spawn(
        self, g: Goal, spec: sandbox.ChildSpec, slirp: str | None, host_loopback: bool
    ) -> None:
        """Fork the child (sandbox.child_main), start its network helper, wait for its set-up
        to succeed and register it with the worker's running builders."""
        assert g.drv is not None
        drv = g.drv
        store = self.store
        settings = self.settings
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
                g.slirp = Slirp.start(
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

    def _actual(self, g: Goal, path: str) -> str:
        if path in g.redirected:
            return g.redirected[path]
        return g.chroot + path if g.chroot else path

    def _rewrite_back(self, g: Goal, actual: str) -> None:
        """Upstream's "rewriting hashes in `X'; cross fingers": the redirected names in a
        hash-rewritten output's contents become the real ones again (through its NAR, so the
        tree is rebuilt by the NAR reader, which follows no link)."""
        rewrites = {
            _hash_part(self.store_dir, r): _hash_part(self.store_dir, p)
            for p, r in g.redirected.items()
        }
        self.msg(LVL_ERROR, f"warning: rewriting hashes in `{actual}'; cross fingers")
        data = b"".join(nar.dump(actual))
        for old, new in rewrites.items():
            data = data.replace(old.encode(), new.encode())
        remove_tree(actual)
        nar.restore([data], actual)

    def _redirect(self, g: Goal, path: str) -> str:
        """Upstream `addHashRewrite`: the output's name with the hash part replaced by the
        first 32 nix-base32 characters of SHA-256(`rewrite:DRV:PATH`)."""
        store = self.store.config.store_dir
        digest = hashlib.sha256(f"rewrite:{g.drv_path}:{path}".encode()).digest()
        redirected = f"{store}/{base32.encode(digest)[:32]}{path[len(store) + 33 :]}"
        remove_tree(redirected)
        g.redirected[path] = redirected
        self.msg(LVL_CHATTY, f"output '{path}' redirected to '{redirected}'")
        return redirected

    def _move_failed_outputs(self, g: Goal) -> None:
        """Upstream keeps a failed build's outputs in the store for debugging; they are made
        safe first (CVE-2024-52867): no setuid/setgid bit, no group/world write permission,
        owned by the daemon, never by the build user that the next builds run as."""
        if g.mode != BuildMode.NORMAL:
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
                    remove_tree(actual)

    def _cleanup(self, g: Goal, *, failed: bool, keep_locks: bool = False) -> None:
        """Remove the chroot and build tree (or keep it), stop the build user's processes and
        release it, release the locks.  Idempotent, and every step runs whatever the others
        did: a step that fails is reported, never allowed to keep the user or the locks."""

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # clean-up goes on; the error is reported
                self.msg(LVL_ERROR, f"error: {what} of `{g.drv_path}': {exc}")

        if g.slirp is not None:
            step("stopping the network helper", lambda: _stop_slirp(g))
        for redirected in list(g.redirected.values()):

            def remove(r: str = redirected) -> None:
                remove_tree(r)

            step("removing a redirected output", remove)
        g.redirected.clear()
        if not keep_locks:
            for p, aside in list(g.moved_aside.items()):

                def restore(p: str = p, aside: str = aside) -> None:
                    if failed:
                        remove_tree(p)
                        os.rename(aside, p)
                    else:
                        remove_tree(aside)

                step("restoring the outputs", restore)
            g.moved_aside.clear()
        if g.user is not None:
            uid = g.user.uid
            step("killing the processes of the build user", lambda: sandbox.kill_user(uid))
        if g.chroot is not None:
            chroot = g.chroot
            g.chroot = None
            step("removing the chroot", lambda: remove_tree(chroot))
        if g.top_dir is not None:
            if failed and self.settings.keep_failed:
                self.msg(LVL_ERROR, f"note: keeping build directory `{g.top_dir}'")
                step("handing over the build directory", lambda: self._give_kept_tree(g))
            else:
                top = g.top_dir
                step("removing the build directory", lambda: remove_tree(top))
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
            remove_tree(pivot)


def _stop_slirp(g: Goal) -> None:
    """Stop the network helper of `g`'s build, if it has one."""
    slirp = g.slirp
    g.slirp = None
    if slirp is not None:
        slirp.stop()


def _hash_part(store_dir: str, path: str) -> str:
    return path[len(store_dir) + 1 : len(store_dir) + 33]


def _rewrite(text: str, rewrites: dict[str, str]) -> str:
    for old, new in rewrites.items():
        text = text.replace(old, new)
    return text
