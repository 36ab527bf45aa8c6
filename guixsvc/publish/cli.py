"""`guixsvc publish`: `guix publish`'s command line, start-up and privilege dropping.

Options, defaults and messages follow spec/cli.md §2 so that service files written for
`guix publish` work unchanged: the listening socket is bound (or taken from systemd) and the
key files are read before `--user` drops privileges.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
import sys
from collections.abc import Callable, Sequence

from guixsvc.cliargs import (
    BUG_REPORT,
    Option,
    UsageError,
    help_option,
    parse_command_line,
    run_command,
    version_option,
)
from guixsvc.publish.options import PublishOptions
from guixsvc.quantities import size_to_number

PROG = "guix publish"
SNDBUF = 212992

_DURATION_UNITS = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400}


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"([0-9]+)([shdwm])", text)
    if not m:
        raise UsageError(f"{text}: invalid duration")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """`size->number`, shared with `guix gc`."""
    return size_to_number(text)


def _number(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise UsageError(f"{text}: invalid number")
    return int(text)


def parse_compression(arg: str | None, warnings: list[str]) -> tuple[str, int] | None:
    """One ``-C`` argument (spec/cli.md §2.2); None when it is ignored with a warning."""
    if arg is None:
        return ("gzip", 3)
    if ":" in arg:
        kind, _, level_text = arg.partition(":")
        level = _number(level_text)
    elif re.fullmatch(r"[+-]?[0-9]+", arg):
        kind, level = "gzip", int(arg)
    else:
        kind, level = arg, 3
    if level == 0:
        return ("none", 0)
    if kind not in ("gzip", "lzip", "zstd"):
        warnings.append(f"{kind}: unsupported compression type")
        return None
    return (kind, level)


def _help() -> str:
    from guixsvc.store.config import StoreConfig

    store = StoreConfig.from_env(daemon=False).store_dir
    return f"""\
Usage: guix publish [OPTION]...
Publish {store} over HTTP.

  -p, --port=PORT        listen on PORT
      --listen=HOST      listen on the network interface for HOST
  -u, --user=USER        change privileges to USER as soon as possible
  -a, --advertise        advertise on the local network
  -C, --compression[=METHOD:LEVEL]
                         compress archives with METHOD at LEVEL
  -c, --cache=DIRECTORY  cache published items to DIRECTORY
      --cache-bypass-threshold=SIZE
                         serve store items below SIZE even when not cached
      --workers=N        use N workers to bake items
      --ttl=TTL          announce narinfos can be cached for TTL seconds
      --negative-ttl=TTL announce missing narinfos can be cached for TTL seconds
      --nar-path=PATH    use PATH as the prefix for nar URLs
      --public-key=FILE  use FILE as the public key for signatures
      --private-key=FILE use FILE as the private key for signatures
  -r, --repl[=PORT]      spawn REPL server on PORT

  -h, --help             display this help and exit
  -V, --version          display version information and exit
{BUG_REPORT}"""


def _listen(opts: PublishOptions, host: str | None) -> None:
    assert host is not None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"lookup of host '{host}' failed: {exc.strerror}") from None
    if not infos:
        raise UsageError("lookup of host 'listen' returned nothing")
    opts.family = infos[0][0]
    opts.listen = str(infos[0][4][0])


def _compression(opts: PublishOptions, arg: str | None) -> None:
    c = parse_compression(arg, opts.warnings)
    if c is not None:
        opts.compressions.append(c)


def _setter(name: str, convert: Callable[[str], object] = str) -> Callable:
    def handle(opts: PublishOptions, arg: str | None) -> None:
        assert arg is not None
        setattr(opts, name, convert(arg))

    return handle


def _repl(opts: PublishOptions, arg: str | None) -> None:
    # Accepted for compatibility; there is no Guile REPL to spawn.
    if arg is not None:
        _number(arg)


# `%options` of guix/scripts/publish.scm, in its order.
OPTIONS: tuple[Option[PublishOptions], ...] = (
    help_option(_help),
    version_option(PROG),
    Option(("a", "advertise"), lambda o, _: setattr(o, "advertise", True)),
    Option(("u", "user"), _setter("user"), required=True),
    Option(("p", "port"), _setter("port", _number), required=True),
    Option(("listen",), _listen, required=True),
    Option(("C", "compression"), _compression, optional=True),
    Option(("c", "cache"), _setter("cache"), required=True),
    Option(("cache-bypass-threshold",), _setter("bypass_threshold", parse_size), required=True),
    Option(("workers",), _setter("workers", lambda a: max(1, _number(a))), required=True),
    Option(("ttl",), _setter("ttl", parse_duration), required=True),
    Option(("negative-ttl",), _setter("negative_ttl", parse_duration), required=True),
    Option(
        ("nar-path",),
        _setter("nar_path", lambda a: tuple(c for c in a.split("/") if c)),
        required=True,
    ),
    Option(("public-key",), _setter("public_key"), required=True),
    Option(("private-key", "secret-key"), _setter("private_key"), required=True),
    Option(("r", "repl"), _repl, optional=True),
)  # type: ignore[assignment]


def _extraneous(opts: PublishOptions, arg: str) -> None:
    raise UsageError(f"{arg}: extraneous argument")


def parse_options(argv: Sequence[str]) -> PublishOptions:
    """Parse `guix publish` arguments (spec cli.md §2); raises `cliargs` exceptions."""
    opts = parse_command_line(argv, OPTIONS, PublishOptions(), _extraneous)
    if not opts.compressions:
        opts.compressions = [("gzip", 3)]
    return opts


def systemd_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The socket systemd passed (``LISTEN_PID`` = us, ``LISTEN_FDS`` = 1), else None."""
    env = dict(os.environ) if env is None else env
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or fds is None or not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not re.fullmatch(r"[0-9]+", fds):
        return None
    if int(fds) != 1:
        raise UsageError(f"{fds}: unexpected number of startup file descriptors")
    sock = socket.socket(fileno=3)
    os.set_inheritable(3, False)
    return sock


def open_socket(opts: PublishOptions, *, reuseport: bool = False) -> socket.socket:
    """Bind and listen on `--listen`/`--port`; with `reuseport`, in an SO_REUSEPORT group (one
    socket per server process, the kernel spreading connections over them)."""
    host = opts.listen if opts.listen is not None else "0.0.0.0"
    sock = socket.socket(opts.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        port = opts.address[1] if reuseport and opts.address is not None else opts.port
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    opts.address = (host, int(sock.getsockname()[1]))
    return sock


def process_count(opts: PublishOptions) -> int:
    """How many server processes: `--workers` (default: the number of cores), at most one
    per core.  Each process bakes with its share of the `--workers` threads."""
    return max(1, min(opts.workers, os.cpu_count() or 1))


def open_sockets(opts: PublishOptions, count: int) -> list[socket.socket]:
    """`count` listening sockets on the same address (SO_REUSEPORT), bound before privileges
    are dropped; a single plain socket when `count` is 1."""
    if count == 1:
        return [open_socket(opts)]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(open_socket(opts, reuseport=True))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def serve_processes(
    socks: Sequence[socket.socket], serve: Callable[[socket.socket, int], None]
) -> int:
    """Run `serve(sock, index)` in one forked process per entry of `socks` (entries may be the
    same socket, e.g. one passed by systemd, which the processes then share) and supervise
    them: SIGTERM/SIGINT are passed on, and when one process dies the others are stopped and
    its status is returned (the service manager restarts the whole service).  With a single
    socket, `serve` runs in this process."""
    if len(socks) == 1:
        serve(socks[0], 0)
        return 0
    import signal
    import traceback

    sys.stdout.flush()
    sys.stderr.flush()
    children: dict[int, int] = {}
    for index, sock in enumerate(socks):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for other in {id(s): s for s in socks if s is not sock}.values():
                    if other.fileno() != sock.fileno():
                        other.close()
                serve(sock, index)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    for sock in {id(s): s for s in socks}.values():
        sock.close()
    stopping = False
    status = 0

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while children:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wstatus)
        if not stopping:
            sys.stderr.write(f"{PROG}: error: server process {pid} exited with status {code}\n")
            sys.stderr.flush()
            status = code if code > 0 else 1
            stop(signal.SIGTERM, None)
    return status


def drop_privileges(user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"user '{user}' not found: no such user") from None
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _error(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, lambda: _main(parse_options(args)))


def _main(opts: PublishOptions) -> int:
    from guixsvc.pki import keys
    from guixsvc.publish.server import PublishServer
    from guixsvc.store.config import StoreConfig

    for w in opts.warnings:
        sys.stderr.write(f"{PROG}: warning: {w}\n")
    if opts.advertise:
        from guixsvc import avahi

        try:
            avahi.require_dbus_fast()
        except avahi.MissingDependency as exc:
            return _error(str(exc))
    config = StoreConfig.from_env(daemon=False)
    public_path = opts.public_key or keys.public_key_file(config.conf_dir)
    secret_path = opts.private_key or keys.secret_key_file(config.conf_dir)
    processes = process_count(opts)
    try:
        activated = systemd_socket()
        socks = [activated] * processes if activated is not None else []
        if activated is None:
            socks = open_sockets(opts, processes)
    except UsageError as exc:
        sys.stderr.write(f"{exc}")
        return 1
    except OSError as exc:
        return _error(f"failed to listen: {exc.strerror}")
    try:
        public = keys.load_public_key(public_path)
        secret = keys.load_secret_key(secret_path)
    except OSError as exc:
        return _error(f"{exc.filename}: {exc.strerror}")
    except (keys.PkiError, ValueError) as exc:
        return _error(str(exc))
    if opts.user is not None:
        try:
            drop_privileges(opts.user)
        except UsageError as exc:
            return _error(str(exc))
        except OSError as exc:
            return _error(f"failed to change privileges: {exc.strerror}")
    elif os.geteuid() == 0:
        sys.stderr.write(
            f"{PROG}: warning: server running as root; consider using the '--user' option!\n"
        )
    if activated is not None:
        sys.stderr.write(f"{PROG}: publishing (started via socket activation)\n")
    else:
        host, port = opts.address or ("0.0.0.0", opts.port)
        sys.stderr.write(f"{PROG}: publishing {config.store_dir} on {host}, port {port}\n")
    for kind, level in opts.compressions:
        sys.stderr.write(f"{PROG}: using '{kind}' compression method, level {level}\n")
    if opts.advertise:
        # Upstream's format string is "Advertising ~a~%." — the dot starts the next line.
        sys.stderr.write(f"{PROG}: Advertising {avahi.service_name()}\n.")
    sys.stderr.flush()

    def serve(sock: socket.socket, index: int) -> None:
        if index:
            opts.advertise = False  # one registration is enough
        opts.workers = max(1, opts.workers // processes)  # baking threads of this process
        PublishServer(opts, config, secret=secret, public=public).run(sock)

    return serve_processes(socks, serve)


if __name__ == "__main__":
    sys.exit(main())
