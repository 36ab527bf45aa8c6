"""The daemon's main process: listen, accept, and fork one worker process per connection.

Forking is how upstream isolates sessions, and it suits Python as well: a crashing or hung
session cannot touch another one or the listener, the SQLite database is opened only inside the
worker (never across a fork), and a worker's memory is returned to the system when it exits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys

from guixsvc.daemon import listen
from guixsvc.daemon.localstore import initialise_store
from guixsvc.daemon.session import Session
from guixsvc.daemon.settings import Settings
from guixsvc.store.config import StoreConfig

log = logging.getLogger("guix-daemon")

_UCRED = struct.Struct("3i")


def peer_credentials(conn: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix-socket peer, None for TCP."""
    if conn.family != socket.AF_UNIX:
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _reap_children(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def run_daemon(settings: Settings, listen_specs: list[str]) -> int:
    listen.setup_logging(settings.debug)
    os.umask(0o022)
    config = StoreConfig.from_env()
    settings.validate()
    if os.geteuid() == 0 and not settings.get("build-users-group"):
        log.warning(
            "warning: daemon is running as root, so using `--build-users-group' is highly "
            "recommended"
        )
    if os.geteuid() != 0 and settings.get_bool("build-use-chroot"):
        log.warning("warning: not running as root: builds will not be isolated (chroot disabled)")
        settings.set("build-use-chroot", "false")
    try:
        sockets = listen.listening_sockets(listen_specs, config.socket_path)
    except listen.ListenError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    # Open the store once in the main process so that a broken store is reported at start-up
    # rather than to the first client; the database handle is closed before any fork.
    try:
        initialise_store(config, settings)
    except Exception as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1

    signal.signal(signal.SIGCHLD, _reap_children)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    names = ", ".join(str(s.getsockname()) for s in sockets)
    log.info("accepting connections on %s", names)
    listen.notify(f"READY=1\nSTATUS=accepting connections on {names}")
    try:
        while True:
            for key, _ in selector.select():
                server_sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    conn, _addr = server_sock.accept()
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                        continue
                    raise
                _spawn_worker(conn, sockets, selector, config, settings)
    except _Stop:
        listen.notify("STOPPING=1")
        log.info("shutting down")
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    return 0


def _spawn_worker(
    conn: socket.socket,
    sockets: list[socket.socket],
    selector: selectors.BaseSelector,
    config: StoreConfig,
    settings: Settings,
) -> None:
    remote = listen.is_remote(conn)
    if remote:
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    creds = peer_credentials(conn)
    pid = os.fork()
    if pid:
        conn.close()
        return
    # Worker process.
    status = 0
    try:
        selector.close()
        for sock in sockets:
            sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, _stop)
        os.setsid()
        conn.setblocking(True)
        Session(conn, config, settings.copy(), creds, remote=remote).run()
    except _Stop:
        status = 0
    except BaseException:
        log.exception("session crashed")
        status = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)
