"""The daemon's main process: listen, and keep a pool of forked worker processes serving clients.

Each connection is served by a process of its own, as upstream does it: a crashing or hung
session cannot touch another one or the listener, and the SQLite database is opened only inside
workers (never across a fork).  Unlike upstream, a worker is forked *before* a client arrives and
serves one connection after another (never two at once): forking a Python process costs
milliseconds, which upstream's C++ daemon does not pay, so forking per connection would make the
handshake the slowest thing the daemon does.  Idle workers wait on the listening sockets
themselves; each tells the main process over a pipe when it becomes busy or idle, and the main
process forks more so that a few are always idle.  Per-session state (settings, temp roots,
trust, CPU affinity) is made anew for every connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
import sys

from guixsvc.daemon import discover, listen, proctitle
from guixsvc.daemon.localstore import initialise_store
from guixsvc.daemon.session import Session
from guixsvc.daemon.settings import Settings
from guixsvc.store.config import StoreConfig
from guixsvc.store.db import StoreDatabase

log = logging.getLogger("guix-daemon")

_UCRED = struct.Struct("3i")
_STATUS = struct.Struct("ii")
_IDLE, _BUSY = 0, 1
#: Idle workers kept ready; more are forked as soon as fewer are idle.
MIN_IDLE = 2
#: Idle workers beyond this many are told to exit.
MAX_IDLE = 16
#: A worker exits after this many sessions, bounding what a long-lived process accumulates.
SESSIONS_PER_WORKER = 10_000
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix-socket peer, None for TCP."""
    if conn.family != socket.AF_UNIX:
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def run_daemon(
    settings: Settings, listen_specs: list[str], *, sockets: list[socket.socket] | None = None
) -> int:
    """Serve until told to stop; `sockets` are already listening (`guix-daemon` opens them
    before importing this module), else they are opened from `listen_specs` here."""
    listen.setup_logging(settings.debug)
    # Named as upstream's processes are, for `guix processes` (sessions: see _PoolWorker._serve).
    args = sys.argv[1:]
    if os.path.basename(sys.argv[0]) == "guixsvc" and args[:1] == ["daemon"]:
        args = args[1:]
    proctitle.set_daemon_title(args)
    os.umask(0o022)
    config = StoreConfig.from_env()
    settings.validate()
    if os.geteuid() == 0 and not settings.get("build-users-group"):
        log.warning(
            "warning: daemon is running as root, so using `--build-users-group' is highly "
            "recommended"
        )
    if os.geteuid() != 0 and settings.get_bool("build-use-chroot"):
        from guixsvc.daemon.build import sandbox

        if sandbox.user_namespaces_available():
            # Upstream's unprivileged mode: each build in user namespaces of its own.
            log.info("not running as root: builds run in unprivileged user namespaces")
        else:
            log.warning(
                "warning: not running as root: builds will not be isolated (chroot disabled)"
            )
            settings.set("build-use-chroot", "false")
    # Open the store once here, before any worker accepts: a broken store is reported at
    # start-up rather than to the first client, and whoever is served finds the database
    # created (in WAL mode) already (clients that connected meanwhile wait in the backlog).
    # The database handle is closed before any fork.
    try:
        initialise_store(config, settings)
    except Exception as exc:
        sys.stderr.write(f"error: {exc}\n")
        for sock in sockets or ():
            with contextlib.suppress(OSError):
                sock.close()
        return 1
    if sockets is None:
        try:
            sockets = listen.listening_sockets(listen_specs, config.socket_path)
        except listen.ListenError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
    if listen.activated:
        log.info("socket-activated with %d socket(s)", listen.activated)
    for sock in sockets:
        sock.setblocking(False)
    # With --discover, `guix discover` runs beside the daemon (a child process: the main
    # process forks workers, so no threads here).
    discovery = discover.start_discovery(config, settings)
    pool = _Pool(sockets, config, settings)
    names = ", ".join(str(s.getsockname()) for s in sockets)
    log.info("accepting connections on %s", names)
    try:
        pool.run(ready=f"READY=1\nSTATUS=accepting connections on {names}")
    finally:
        discover.stop(discovery)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    return 0


class _Pool:
    """The main process: keeps enough idle workers and reaps the ones that exit."""

    def __init__(self, sockets: list[socket.socket], config: StoreConfig, settings: Settings):
        self.sockets = sockets
        self.config = config
        self.settings = settings
        self.workers: set[int] = set()
        self.idle: set[int] = set()
        self.status_r, self.status_w = os.pipe2(os.O_CLOEXEC)
        self.stopping = False

    def run(self, ready: str) -> None:
        # Wake the select loop when a worker exits.
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(self.status_r, False)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
            signal.signal(signal.SIGCHLD, lambda *_: None)
            self._top_up()  # a stop signal may arrive while the first workers are forked
            listen.notify(ready)
            while True:
                readable, _, _ = select.select([self.status_r, wake_r], [], [])
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    self._reap()
                if self.status_r in readable:
                    self._read_status()
                self._top_up()
        except _Stop:
            listen.notify("STOPPING=1")
            log.info("shutting down")
            self.stopping = True
            # Idle workers exit now; busy ones finish their session first (its client keeps
            # its connection across a daemon restart, as with upstream's per-session processes).
            for pid in list(self.workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        finally:
            signal.set_wakeup_fd(-1)

    def _read_status(self) -> None:
        try:
            data = os.read(self.status_r, _STATUS.size * 256)
        except BlockingIOError:
            return
        for offset in range(0, len(data) - len(data) % _STATUS.size, _STATUS.size):
            pid, state = _STATUS.unpack_from(data, offset)
            if pid not in self.workers:
                continue
            if state == _IDLE:
                self.idle.add(pid)
                if len(self.idle) > MAX_IDLE:
                    self.idle.discard(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            else:
                self.idle.discard(pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.workers.discard(pid)
            self.idle.discard(pid)

    def _top_up(self) -> None:
        while not self.stopping and len(self.idle) < MIN_IDLE:
            self._spawn()

    def _spawn(self) -> None:
        # No stop signal between fork() and recording the worker, or it would never be told.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.workers.add(pid)
            self.idle.add(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            return
        status = 0
        try:
            os.close(self.status_r)
            _PoolWorker(self.sockets, self.status_w, self.config, self.settings, parent).run()
        except _Stop:  # told to stop before it served anyone: a normal exit
            pass
        except BaseException:  # a worker must never return into the main loop
            log.exception("worker crashed")
            status = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)


class _PoolWorker:
    """A forked process serving one connection after another."""

    def __init__(
        self,
        sockets: list[socket.socket],
        status_w: int,
        config: StoreConfig,
        settings: Settings,
        parent: int,
    ) -> None:
        self.sockets = sockets
        self.status_w = status_w
        self.parent = parent
        self.config = config
        self.settings = settings
        self.busy = False
        self.exit_after_session = False
        self.db: StoreDatabase | None = None

    def _on_term(self, signum: int, frame: object) -> None:
        if self.busy:
            self.exit_after_session = True
        else:
            raise _Stop

    def _report(self, state: int) -> None:
        with contextlib.suppress(OSError):  # the main process may be gone (a restart)
            os.write(self.status_w, _STATUS.pack(os.getpid(), state))

    def run(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, self._on_term)
        # Told to stop when the main process dies however it dies (an idle worker exits, a busy
        # one finishes its session), then take stop signals again.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if os.getppid() != self.parent:
            return
        os.setsid()
        self.db = StoreDatabase.open(
            self.config.db_dir,
            wal=self.settings.get_bool("use-sqlite-wal"),
            fsync=self.settings.get_bool("fsync-metadata"),
        )
        try:
            for _ in range(SESSIONS_PER_WORKER):
                conn = self._accept()
                try:
                    self._serve(conn)
                finally:
                    self.busy = False
                if self.exit_after_session:
                    return
                self._report(_IDLE)
        except _Stop:
            return
        finally:
            self.db.close()

    def _accept(self) -> socket.socket:
        while True:
            select.select(self.sockets, [], [])
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                for sock in self.sockets:
                    try:
                        conn, _ = sock.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                            continue
                        raise
                    self.busy = True
                    self._report(_BUSY)
                    return conn
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        remote = listen.is_remote(conn)
        if remote:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        affinity = os.sched_getaffinity(0)
        assert self.db is not None
        creds = peer_credentials(conn)
        if creds is not None and creds[0] > 0:  # `guix-daemon CLIENT-PID …` while serving
            proctitle.set_session_title(creds[0])
        try:
            Session(conn, self.config, self.settings.copy(), creds, remote=remote, db=self.db).run()
        finally:
            if creds is not None and creds[0] > 0:
                proctitle.set_daemon_title()
        if os.sched_getaffinity(0) != affinity:
            os.sched_setaffinity(0, affinity)
