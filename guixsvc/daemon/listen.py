"""Listening sockets, systemd integration and logging for the daemon's main process.

Upstream's rules (spec/cli.md §1.2, worker-protocol.md §1): Unix sockets are created mode 0666
after unlinking a stale file, `HOST[:PORT]` is TCP on port 44146 by default, and systemd socket
activation (`LISTEN_PID`/`LISTEN_FDS`) replaces `--listen`.  Readiness goes to systemd with
sd_notify and logs go to the journal with structured fields when systemd started us.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

DEFAULT_PORT = 44146
SD_LISTEN_FDS_START = 3
#: Upstream listens with a backlog of 5; Unix-socket clients beyond the backlog are refused
#: outright, so bursts of clients (16 at once in the benchmark) get the kernel's maximum, as
#: systemd gives a socket unit.
BACKLOG = socket.SOMAXCONN

#: How many sockets systemd passed (0: we opened our own).  Logged by the daemon once logging
#: is set up: guix-daemon listens before loading `logging` (clients connect at once).
activated = 0


class ListenError(Exception):
    pass


def open_unix_socket(path: str) -> socket.socket:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o111)
    try:
        if len(path.encode()) >= 108:
            # sun_path is limited to 108 bytes: bind a relative name from the directory, as
            # upstream does.
            cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.chdir(directory)
                sock.bind(os.path.basename(path))
            finally:
                os.fchdir(cwd)
                os.close(cwd)
        else:
            sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot bind to socket '{path}': {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(BACKLOG)
    return sock


def open_inet_socket(spec: str) -> socket.socket:
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = spec, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM,
            flags=socket.AI_NUMERICSERV | socket.AI_ADDRCONFIG,
        )  # fmt: skip
    except socket.gaierror as exc:
        raise ListenError(f"failed to look up '{spec}': {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot bind to '{spec}': {exc.strerror}") from None
    sock.listen(BACKLOG)
    return sock


def systemd_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd, or [] when we were not socket-activated."""
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socks


def listening_sockets(listen: list[str], default_socket: str) -> list[socket.socket]:
    socks = systemd_sockets()
    if socks:
        global activated
        activated = len(socks)
        return socks
    specs = listen or [default_socket]
    result = []
    for spec in specs:
        result.append(open_unix_socket(spec) if spec.startswith("/") else open_inet_socket(spec))
    return result


def is_remote(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


# --- systemd readiness and logging -------------------------------------------------------------


def notify(state: str) -> None:
    """sd_notify(3); a no-op when systemd did not ask for notifications."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon as sd_daemon
    except ImportError:
        _notify_fallback(state)
    else:
        sd_daemon.notify(state)


def _notify_fallback(state: str) -> None:
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
        contextlib.suppress(OSError),
    ):
        s.sendto(state.encode(), address)


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup_logging(debug: bool = False) -> None:
    import logging

    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    handler: logging.Handler | None = None
    if under_systemd():
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="guix-daemon")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]
