"""The daemon's build hook: a derivation built on another machine, as `guix offload` does it.

Upstream's daemon asks the `guix offload` process whether it takes each build ("# accept",
"# decline", "# postpone", nix/libstore/build.cc `tryBuildHook`); the hook sends the inputs the
machine lacks, builds there, copies the outputs back and the daemon registers them.  Here the
same decisions are made in the daemon's build worker (`Offloader.try_build`), and the transfer
and remote build run in a forked child process that the scheduler waits for exactly like a local
builder: its output pipe carries the remote build log (and the hook's messages) to the client
and the log file, and its exit status says how it went:

* 0: the outputs are in place at their store paths (NAR received, export signature checked
  against our ACL); the scheduler then checks, canonicalises, scans and registers them as for
  a local build, so the result is the same as building here;
* 100: the remote daemon reported a failure (upstream's permanent failure);
* anything else: the machine or the connection failed; partial outputs are deleted and the
  goal is tried again on another machine or locally.

The child reaches the machine's daemon through `transport.Transport` (OpenSSH, `ssh -L`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guixsvc.offload.choose import Slot, machine_matches, pick_machine, suitable
from guixsvc.offload.machines import BuildMachine, MachinesError, load_machines
from guixsvc.offload.transport import SHORT_TIMEOUT, Transport, TransportError
from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.protocol.ops import EXPORT_MAGIC, Op
from guixsvc.protocol.wire import (
    Incomplete,
    ProtocolError,
    WireReader,
    encode_int,
    encode_pairs,
    encode_string,
    encode_strings,
)
from guixsvc.store import nar
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.safefs import remove_tree

if TYPE_CHECKING:
    from guixsvc.daemon.build.goal import Goal, Running
    from guixsvc.daemon.build.worker import Worker
    from guixsvc.daemon.settings import Settings

EXIT_PERMANENT = 100
EXIT_TRANSIENT = 1
EXIT_UNSUITABLE = 75  # overloaded or low on disk space: place the build again without it
EXIT_UNREACHABLE = 76  # cannot connect: the machine is left out for the rest of the request

LVL_ERROR, LVL_INFO, LVL_TALKATIVE = 0, 1, 2


def offload_enabled(settings: Settings) -> bool:
    """Not `--no-offload`/`--no-build-hook`, and the client did not turn build hooks off."""
    return settings.get_bool("build-use-hook") and getattr(settings, "use_build_hook", True)


class OffloadError(Exception):
    pass


@dataclass
class Job:
    """What the child needs: everything read from the database beforehand."""

    machine: BuildMachine
    transport: Transport  # the machine's open session (`_session`)
    store_dir: str
    drv_path: str
    outputs: list[str]
    inputs: list[ValidPathInfo]  # topologically sorted (references first)
    signing_key: str
    conf_dir: str
    max_silent_time: int
    build_timeout: int
    print_build_trace: bool


@dataclass
class _Active:
    machine: BuildMachine
    slot: Slot
    transport: Transport

    def close(self) -> None:
        self.slot.release()


@dataclass
class Offloader:
    """Offloading for one build worker (one BuildPaths request)."""

    worker: Worker
    machines: list[BuildMachine]
    active: dict[str, _Active] = field(default_factory=dict)
    #: Machines that failed a build of a goal (drv path → names): not tried again for it.
    excluded: dict[str, set[str]] = field(default_factory=dict)
    #: Machines found unreachable during this request.
    down: set[str] = field(default_factory=set)
    #: Machines found overloaded or low on space, and until when they are left out.
    unsuitable: dict[str, float] = field(default_factory=dict)
    postponed: bool = False
    finished_builds: int = 0
    #: The last answer for a goal and when/under which conditions it was given: a goal waiting
    #: for a slot asks again only once something finished or the poll interval passed.
    asked: dict[str, tuple[tuple[bool, int, int], float, str]] = field(default_factory=dict)

    @classmethod
    def for_worker(cls, worker: Worker) -> Offloader | None:
        if not offload_enabled(worker.settings):
            return None
        warnings: list[str] = []
        try:
            machines = load_machines(
                os.path.join(worker.store.config.conf_dir, "machines.scm"), warnings
            )
        except MachinesError as exc:
            worker.msg(LVL_ERROR, f"guix offload: error: {exc}")
            return None
        for w in warnings:
            worker.msg(LVL_ERROR, w)
        if not machines:
            return None
        return cls(worker, machines)

    # -- the decision (upstream `process-request`) -------------------------------------------

    def try_build(self, g: Goal, *, willing: bool) -> str:
        """ "accept" (the build is running remotely), "decline" or "postpone"."""
        w = self.worker
        assert g.drv is not None
        state = (willing, len(w.running), self.finished_builds)
        last = self.asked.get(g.drv_path)
        if last is not None and last[0] == state and time.monotonic() - last[1] < w.poll_interval:
            self.postponed = last[2] == "postpone"
            return last[2]
        reply = self._decide(g, willing=willing)
        if reply != "accept":
            self.asked[g.drv_path] = (state, time.monotonic(), reply)
        return reply

    def _decide(self, g: Goal, *, willing: bool) -> str:
        w = self.worker
        assert g.drv is not None
        self.postponed = False
        features = g.drv.env.get("requiredSystemFeatures", "").split()
        excluded = self.excluded.get(g.drv_path, set()) | self.down
        now = time.monotonic()
        resting = {name for name, until in self.unsuitable.items() if until > now}
        candidates = [
            m
            for m in self.machines
            if machine_matches(m, g.drv.platform, features) and m.name not in excluded
        ]
        if not candidates:
            return "decline"
        choice = pick_machine(
            [m for m in candidates if m.name not in resting], state_dir=w.store.config.state_dir
        )
        if choice.machine is None or choice.slot is None:
            if (choice.busy or resting) and not willing:
                self.postponed = True
                return "postpone"
            return "decline"
        try:
            transport = _session(choice.machine, w.store_dir)
        except TransportError as exc:
            # Upstream `choose-build-machine`: a machine that cannot be reached is skipped.
            w.msg(LVL_ERROR, str(exc))
            self.down.add(choice.machine.name)
            choice.slot.release()
            return self._decide(g, willing=willing)
        active = _Active(choice.machine, choice.slot, transport)
        try:
            self._start(g, active)
        except BaseException:
            active.close()
            raise
        return "accept"

    def _start(self, g: Goal, active: _Active) -> None:
        from guixsvc.daemon.build.goal import Running
        from guixsvc.daemon.build.logs import BuildLog
        from guixsvc.daemon.build.outputs import show_paths

        w = self.worker
        assert g.drv is not None
        settings = w.settings
        w.msg(LVL_TALKATIVE, f"using hook to build path(s) {show_paths(g.missing)}")
        all_inputs = set(g.input_paths) | w.closure({g.drv_path})
        infos: dict[str, ValidPathInfo] = {}
        for p in all_inputs:
            info = w.db.path_info(p)
            if info is None:
                raise OffloadError(f"path `{p}' is not valid")
            infos[p] = info
        machine = active.machine
        job = Job(
            machine=machine,
            transport=active.transport,
            store_dir=w.store_dir,
            drv_path=g.drv_path,
            outputs=list(g.missing),
            inputs=_topological(infos),
            signing_key=w.store.config.signing_key_secret,
            conf_dir=w.store.config.conf_dir,
            max_silent_time=settings.get_int("build-max-silent-time", 0),
            build_timeout=settings.get_int("build-timeout", 0),
            print_build_trace=settings.print_build_trace,
        )
        log: BuildLog | None = None
        if settings.get_bool("build-keep-log") and not settings.lose_logs:
            log = BuildLog(w.store.config.log_dir, g.drv_path, settings.log_compression)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = EXIT_TRANSIENT
            try:
                os.setpgid(0, 0)
                os.close(read_fd)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                code = run_job(job, write_fd)
            finally:
                os._exit(code)
        os.close(write_fd)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        now = time.monotonic()
        g.running = Running(pid, pid, read_fd, now, now, log)
        w.running[read_fd] = g
        self.active[g.drv_path] = active
        w.trace(f"@ build-started {g.drv_path} - {g.drv.platform} {log.path if log else ''} {pid}")

    # -- the end of a remote build -----------------------------------------------------------

    def owns(self, g: Goal) -> bool:
        return g.drv_path in self.active

    def local_builds(self) -> int:
        return sum(1 for g in self.worker.running.values() if g.drv_path not in self.active)

    def reap(self, g: Goal, r: Running) -> bool:
        """Called when an offloaded build's pipe ended or it timed out.  False: the scheduler
        goes on as for a local builder (success: the outputs are checked and registered; a
        timeout); True: the failure was handled here (permanent failure, or the goal is left
        to be tried again on another machine or locally)."""
        from guixsvc.daemon.build.goal import Result

        active = self.active.pop(g.drv_path, None)
        if active is None:
            return False
        self.finished_builds += 1
        active.close()
        if r.timed_out:
            return False
        _, status = os.waitpid(r.pid, 0)
        r.status = status
        if status == 0:
            return False
        w = self.worker
        assert g.drv is not None
        os.close(r.fd)
        if r.log is not None:
            r.log.close()
        g.running = None
        for p in g.missing:
            if not w.db.is_valid(p):
                remove_tree(p)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        name = active.machine.name
        if code != EXIT_PERMANENT and code != EXIT_UNSUITABLE:
            _drop_session(active.machine)  # the next build opens a fresh connection
        if code in (EXIT_UNSUITABLE, EXIT_UNREACHABLE):
            # Upstream's `choose-build-machine` would have moved on to the next machine.
            if code == EXIT_UNREACHABLE:
                self.down.add(name)
            else:
                self.unsuitable[name] = time.monotonic() + w.poll_interval
            self.asked.pop(g.drv_path, None)
            w._cleanup(g, failed=True)
            return True
        if code == EXIT_PERMANENT:
            w.trace(f"@ build-failed {g.drv_path} - 1 offloaded build failed")
            if w.settings.get_bool("build-cache-failure"):
                for out in g.drv.outputs.values():
                    w.db.add_failed_path(out.path)
            w._cleanup(g, failed=True)
            w._done(g, Result.PERMANENT_FAILURE)
            return True
        # The machine or the connection failed: try elsewhere (another machine or here).
        w.trace(f"@ hook-failed {g.drv_path} - {status} machine '{active.machine.name}' failed")
        w.msg(
            LVL_ERROR,
            f"offloaded build of `{g.drv_path}' on '{active.machine.name}' failed; "
            "trying elsewhere",
        )
        self.excluded.setdefault(g.drv_path, set()).add(active.machine.name)
        self.asked.pop(g.drv_path, None)
        w._cleanup(g, failed=True)
        return True


#: Open SSH sessions of this worker process, by machine, with their last use: one connection
#: serves the status queries and the daemon connections of many builds (about 0.3 s of SSH
#: handshake saved per build).  Idle ones are closed after SESSION_IDLE seconds.
_SESSIONS: dict[tuple[object, ...], tuple[Transport, float]] = {}
SESSION_IDLE = 120.0


def _session_key(m: BuildMachine) -> tuple[object, ...]:
    return (m.name, m.port, m.user, m.host_key, m.key_file, m.daemon_socket, m.compression)


def _session(machine: BuildMachine, store_dir: str) -> Transport:
    now = time.monotonic()
    for key, (t, used) in list(_SESSIONS.items()):
        if now - used > SESSION_IDLE or not t.alive():
            t.close()
            del _SESSIONS[key]
    key = _session_key(machine)
    if key in _SESSIONS:
        t = _SESSIONS[key][0]
    else:
        t = Transport(machine, timeout=SHORT_TIMEOUT)
        try:
            t.open(store_dir)
        except BaseException:
            t.close()
            raise
    _SESSIONS[key] = (t, now)
    return t


def _drop_session(machine: BuildMachine) -> None:
    entry = _SESSIONS.pop(_session_key(machine), None)
    if entry is not None:
        entry[0].close()


def _topological(infos: dict[str, ValidPathInfo]) -> list[ValidPathInfo]:
    """References before referrers (what ImportPaths needs), ties in path order."""
    done: set[str] = set()
    order: list[ValidPathInfo] = []

    def visit(p: str) -> None:
        stack: list[tuple[str, Iterator[str]]] = [(p, iter(sorted(infos[p].references)))]
        done.add(p)
        while stack:
            node, refs = stack[-1]
            for r in refs:
                if r in infos and r not in done:
                    done.add(r)
                    stack.append((r, iter(sorted(infos[r].references))))
                    break
            else:
                stack.pop()
                order.append(infos[node])

    for p in sorted(infos):
        if p not in done:
            visit(p)
    return order


# -- the child --------------------------------------------------------------------------------


class _ExportStream:
    """The multi-item export stream of local items (`guix archive --export`), signed with our
    key, produced lazily as the remote daemon reads it."""

    def __init__(self, infos: list[ValidPathInfo], key_file: str) -> None:
        self._chunks = self._generate(infos, key_file)
        self._buf = b""

    @staticmethod
    def _generate(infos: list[ValidPathInfo], key_file: str) -> Iterator[bytes]:
        from guixsvc.pki import keys

        for info in infos:
            yield encode_int(1)
            record = hashlib.sha256()
            for chunk in nar.dump(info.path):
                record.update(chunk)
                yield chunk
            trailer = (
                encode_int(EXPORT_MAGIC)
                + encode_string(info.path)
                + encode_strings(sorted(info.references))
                + encode_string(info.deriver or "")
            )
            record.update(trailer)
            try:
                signature = keys.sign_hash(key_file, record.digest())
            except (OSError, keys.PkiError) as exc:
                raise OffloadError(f"cannot sign the export of `{info.path}': {exc}") from None
            yield trailer + encode_int(1) + encode_string(signature)
        yield encode_int(0)

    def read(self, limit: int) -> bytes:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return b""
        data, self._buf = self._buf[:limit], self._buf[limit:]
        return data


class _Receiver:
    """One item of the remote's ExportPath stream, restored at its store path."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.sink = nar.RestoreSink(dest)
        self.parser = nar.NarParser(self.sink)
        self.record = hashlib.sha256()
        self.trailer = bytearray()

    def feed(self, data: bytes) -> None:
        if not self.parser.done:
            used = self.parser.feed(data)
            self.record.update(data[:used])
            data = data[used:]
            if self.parser.done:
                self.sink.close()
        self.trailer += data

    def finish(self, conf_dir: str) -> None:
        from guixsvc.pki import keys

        self.sink.close()
        if not self.parser.done:
            raise OffloadError(f"incomplete archive of `{self.dest}'")
        reader = WireReader()
        reader.feed(bytes(self.trailer))
        try:
            if reader.read_u64() != EXPORT_MAGIC:
                raise OffloadError("normalized archive cannot be imported; wrong format")
            path = reader.read_string()
            refs = reader.read_strings()
            deriver = reader.read_string()
            signed = reader.read_u64()
            signature = reader.read_bytes(1 << 16) if signed == 1 else b""
        except (Incomplete, ProtocolError):
            raise OffloadError(f"truncated archive of `{self.dest}'") from None
        if path != self.dest:
            raise OffloadError(f"expected `{self.dest}' from the build machine, got `{path}'")
        if not signature:
            raise OffloadError(f"imported archive of `{path}' lacks a signature")
        self.record.update(
            encode_int(EXPORT_MAGIC) + encode_string(path) + encode_strings(refs)
            + encode_string(deriver)
        )  # fmt: skip
        try:
            acl = keys.current_acl(conf_dir)
        except (OSError, keys.PkiError):
            acl = keys.Acl([])
        try:
            digest = keys.verify_signature(signature, acl)
        except keys.SignatureError as exc:
            raise OffloadError(str(exc)) from None
        if digest != self.record.digest():
            raise OffloadError(
                "signed hash doesn't match actual contents of imported archive; archive could "
                "be corrupt, or someone is trying to import a Trojan horse"
            )


def _set_remote_options(client: DaemonClient, job: Job) -> None:
    """Upstream `set-build-options` as offload.scm calls it (verbosity 0: the build log is
    what comes back; no build hook on the remote side)."""
    overrides: list[tuple[str, str]] = [("build-max-silent-time", str(job.max_silent_time))]
    if job.build_timeout:
        overrides.append(("build-timeout", str(job.build_timeout)))
    fields = [
        encode_int(0), encode_int(0), encode_int(0), encode_int(0),  # keep-failed .. verbosity
        encode_int(0),  # use-build-hook
        encode_int(0), encode_int(0),  # build-verbosity, log-type
        encode_int(0),  # print-build-trace
        encode_int(1),  # use-substitutes
        encode_pairs(overrides),
    ]  # fmt: skip
    client.call(Op.SET_OPTIONS, *fields)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run_job(job: Job, log_fd: int) -> int:
    """The child: transfer, build remotely, retrieve.  Returns the exit code."""
    out = os.fdopen(log_fd, "wb", buffering=0)
    name = job.machine.name

    def log(text: str) -> None:
        with contextlib.suppress(OSError):
            out.write(text.encode("utf-8", "surrogateescape"))

    transport = job.transport
    try:
        try:
            status = transport.refresh(job.store_dir)
        except TransportError as exc:
            log(f"{exc}\n")
            return EXIT_UNREACHABLE
        if not suitable(job.machine, status, log):
            return EXIT_UNSUITABLE
        client = transport.connect_daemon(log=log)
        _set_remote_options(client, job)
        client.add_temp_root(job.drv_path)
        paths = [i.path for i in job.inputs]
        valid = set(client.query_valid_paths(paths))
        missing = [i for i in job.inputs if i.path not in valid]
        if missing:
            size = sum(i.nar_size or 0 for i in missing)
            log(
                f"sending {_plural(len(missing), 'store item')} ({size / 2**20:.2f} MiB) "
                f"to '{name}'...\n"
            )
            for i in missing:
                log(f"exporting path `{i.path}'\n")
            try:
                client.import_paths(_ExportStream(missing, job.signing_key))  # type: ignore[arg-type]
            except DaemonError as exc:
                log(f"guix offload: error: failed to send inputs to '{name}': {exc.message}\n")
                return EXIT_TRANSIENT
        log(f"offloading '{job.drv_path}' to '{name}'...\n")
        if job.print_build_trace:
            log(f"@ build-remote {job.drv_path} {name}\n")
        try:
            client.build_paths([job.drv_path])
        except DaemonError as exc:
            log(f"derivation '{job.drv_path}' offloaded to '{name}' failed: {exc.message}\n")
            return EXIT_PERMANENT
        log(f"retrieving {_plural(len(job.outputs), 'store item')} from '{name}'...\n")
        for path in job.outputs:
            receiver = _Receiver(path)
            log(f"importing path `{path}'\n")
            client.call(Op.EXPORT_PATH, encode_string(path), encode_int(1), sink=receiver.feed)
            client.read_int()
            receiver.finish(job.conf_dir)
        client.close()
        log(f"done with offloaded '{job.drv_path}'\n")
        return 0
    except (TransportError, OffloadError) as exc:
        log(f"guix offload: error: {exc}\n")
    except DaemonError as exc:
        log(f"guix offload: error: '{name}': {exc.message}\n")
    except (OSError, EOFError, ProtocolError, nar.NarError) as exc:
        detail = transport.stderr_text()
        log(f"guix offload: error: connection to '{name}' lost: {detail or exc}\n")
    # The session belongs to the worker, which keeps it for the next builds or drops it.
    return EXIT_TRANSIENT
