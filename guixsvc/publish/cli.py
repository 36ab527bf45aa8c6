"""`guixsvc publish`: `guix publish`'s command line, start-up and privilege dropping.

Options, defaults and messages follow spec/cli.md §2 so that service files written for
`guix publish` work unchanged: the listening socket is bound (or taken from systemd) and the
key files are read before `--user` drops privileges.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from guixsvc import __version__

PROG = "guix publish"
DEFAULT_PORT = 8080
DEFAULT_BYPASS = 10 * 1024 * 1024
SNDBUF = 212992

_SIZE_UNITS = {
    "": 1, "K": 1 << 10, "k": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20,
    "G": 1 << 30, "GiB": 1 << 30, "T": 1 << 40, "TiB": 1 << 40, "P": 1 << 50, "PiB": 1 << 50,
    "E": 1 << 60, "EiB": 1 << 60, "Z": 1 << 70, "ZiB": 1 << 70, "Y": 1 << 80, "YiB": 1 << 80,
    "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15, "EB": 10**18,
    "ZB": 10**21, "YB": 10**24,
}  # fmt: skip
_DURATION_UNITS = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400}


class UsageError(Exception):
    """A command-line error: printed as ``guix publish: error: MESSAGE``, exit 1."""


@dataclass
class PublishOptions:
    port: int = DEFAULT_PORT
    listen: str | None = None
    address: tuple[str, int] | None = None
    family: int = socket.AF_INET
    user: str | None = None
    advertise: bool = False
    compressions: list[tuple[str, int]] = field(default_factory=list)
    cache: str | None = None
    bypass_threshold: int = DEFAULT_BYPASS
    workers: int = os.cpu_count() or 1
    ttl: int | None = None
    negative_ttl: int | None = None
    nar_path: tuple[str, ...] = ("nar",)
    public_key: str | None = None
    private_key: str | None = None
    warnings: list[str] = field(default_factory=list)


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"([0-9]+)([shdwm])", text)
    if not m:
        raise UsageError(f"{text}: invalid duration")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"([0-9]*\.?[0-9]*)(.*)", text)
    assert m is not None
    number, unit = m.groups()
    if not number or number == ".":
        raise UsageError(f"invalid number: {text}")
    if unit not in _SIZE_UNITS:
        raise UsageError(f"unknown unit: {unit}")
    return round(float(number) * _SIZE_UNITS[unit])


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


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guix publish",
        usage="guix publish [OPTION]...",
        description="Publish /gnu/store over HTTP.",
        add_help=False,
    )
    a = p.add_argument
    a("-u", "--user", help="change privileges to USER as soon as possible")
    a("-a", "--advertise", action="store_true", help="advertise on the local network")
    a("-C", "--compression", action="append", nargs="?", const=None, default=None,
      metavar="METHOD:LEVEL", help="compress archives with METHOD at LEVEL")  # fmt: skip
    a("-c", "--cache", metavar="DIRECTORY", help="cache published items to DIRECTORY")
    a("--cache-bypass-threshold", metavar="SIZE",
      help="serve store items below SIZE even when not cached")  # fmt: skip
    a("--workers", metavar="N", help="use N workers to bake items")
    a("--ttl", metavar="TTL", help="announce narinfos can be cached for TTL seconds")
    a("--negative-ttl", metavar="TTL", help="announce missing narinfos can be cached for TTL")
    a("--nar-path", metavar="PATH", help="use PATH as the prefix for nar URLs")
    a("--public-key", metavar="FILE", help="use FILE as the public key for signatures")
    a("--private-key", "--secret-key", dest="private_key", metavar="FILE",
      help="use FILE as the private key for signatures")  # fmt: skip
    a("-p", "--port", metavar="PORT", help="listen on PORT")
    a("--listen", metavar="HOST", help="listen on the network interface for HOST")
    a("-r", "--repl", nargs="?", const="37146", metavar="PORT", help=argparse.SUPPRESS)
    a("-h", "--help", action="help", help="display this help and exit")
    a("-V", "--version", action="version", version=f"guix publish (GNU Guix) {__version__}")
    a("extra", nargs="*", help=argparse.SUPPRESS)
    return p


def parse_options(argv: Sequence[str]) -> PublishOptions:
    args = _build_parser().parse_args(list(argv))
    if args.extra:
        raise UsageError(f"{args.extra[0]}: extraneous argument")
    opts = PublishOptions()
    if args.port is not None:
        opts.port = _number(args.port)
    if args.listen is not None:
        try:
            infos = socket.getaddrinfo(args.listen, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UsageError(f"lookup of host '{args.listen}' failed: {exc.strerror}") from None
        if not infos:
            raise UsageError("lookup of host 'listen' returned nothing")
        opts.family = infos[0][0]
        opts.listen = str(infos[0][4][0])
    opts.user = args.user
    opts.advertise = args.advertise
    for arg in args.compression or ():
        c = parse_compression(arg, opts.warnings)
        if c is not None:
            opts.compressions.append(c)
    if not opts.compressions:
        opts.compressions = [("gzip", 3)]
    opts.cache = args.cache
    if args.cache_bypass_threshold is not None:
        opts.bypass_threshold = parse_size(args.cache_bypass_threshold)
    if args.workers is not None:
        opts.workers = max(1, _number(args.workers))
    if args.ttl is not None:
        opts.ttl = parse_duration(args.ttl)
    if args.negative_ttl is not None:
        opts.negative_ttl = parse_duration(args.negative_ttl)
    if args.nar_path is not None:
        opts.nar_path = tuple(c for c in args.nar_path.split("/") if c)
    opts.public_key = args.public_key
    opts.private_key = args.private_key
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


def open_socket(opts: PublishOptions) -> socket.socket:
    host = opts.listen if opts.listen is not None else "0.0.0.0"
    sock = socket.socket(opts.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    sock.bind((host, opts.port))
    sock.listen(1024)
    opts.address = (host, opts.port)
    return sock


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
    from guixsvc.pki import keys
    from guixsvc.publish.server import PublishServer
    from guixsvc.store.config import StoreConfig

    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        return _error(str(exc))
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
    try:
        activated = systemd_socket()
        sock = activated if activated is not None else open_socket(opts)
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
    server = PublishServer(opts, config, secret=secret, public=public)
    server.run(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
