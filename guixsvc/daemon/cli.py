"""`guix-daemon` (and `guixsvc daemon`): upstream's options, messages and exit codes.

Argument handling follows GNU argp as guix-daemon uses it (spec/cli.md §1): usage errors exit
64 with argp's wording, bad values exit 1 with `error: ...`.  Options whose feature arrives with
a later piece of work (builds, substitutes, GC) are parsed, stored in the settings map and
documented in `--help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from guixsvc import __version__
from guixsvc.cliargs import print_and_exit
from guixsvc.daemon.settings import Settings, SettingsError

PROG = "guix-daemon"
EX_USAGE = 64


def _die(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def _boolean(value: str) -> str:
    low = value.lower()
    if low == "yes":
        return "true"
    if low == "no":
        return "false"
    _die(f"'{value}': invalid Boolean value")


#: `guix-daemon --help`: GNU argp's layout of upstream's `options[]` and `doc`
#: (nix/nix-daemon/guix-daemon.cc), as glibc's argp prints it (options sorted, C locale).
HELP = """\
Usage: guix-daemon [OPTION...]
guix-daemon -- perform derivation builds and store accesses

      --build-users-group=GROUP   perform builds as a user of GROUP
      --cache-failures       cache build failures
      --chroot-directory=DIR add DIR to the build chroot
  -c, --cores=N              use N CPU cores to build each derivation; 0 means
                             as many as available
      --debug                produce debugging output
      --disable-chroot       disable chroot builds
      --disable-deduplication   disable automatic file "deduplication" in the
                             store
      --discover[=yes/no]    use substitute servers discovered on the local
                             network
      --gc-keep-derivations[=yes/no]
                             tell whether the GC must keep derivations
                             corresponding to live outputs
      --gc-keep-outputs[=yes/no]   tell whether the GC must keep outputs of
                             live derivations
      --impersonate-linux-2.6   impersonate Linux 2.6
      --isolate-host-loopback   do not allow fixed-output chroot builds to
                             access the host loopback
      --listen=SOCKET        listen for connections on SOCKET
      --log-compression=TYPE use the specified compression type for build logs
      --lose-logs            do not keep build logs
      --max-silent-time=SECONDS   mark builds as failed after SECONDS of
                             silence
  -M, --max-jobs=N           allow at most N build jobs
      --no-offload           do not attempt to offload builds
      --no-substitutes       do not use substitutes
      --rounds=N             build each derivation N times in a row
      --substitute-urls=URLS use URLS as the default list of substitute
                             providers
      --system=SYSTEM        assume SYSTEM as the current system type
      --timeout=SECONDS      mark builds as failed after SECONDS of activity
  -?, --help                 Give this help list
      --usage                Give a short usage message
  -V, --version              Print program version

Mandatory or optional arguments to long options are also mandatory or optional
for any corresponding short options.


This program is a daemon meant to run in the background.  It serves requests
sent over a Unix-domain socket.  It accesses the store, and builds derivations
on behalf of its clients.

Report bugs to bug-guix@gnu.org.
"""

#: `guix-daemon --usage`.
USAGE = """\
Usage: guix-daemon [-?V] [-c N] [-M N] [--build-users-group=GROUP]
            [--cache-failures] [--chroot-directory=DIR] [--cores=N] [--debug]
            [--disable-chroot] [--disable-deduplication] [--discover[=yes/no]]
            [--gc-keep-derivations[=yes/no]] [--gc-keep-outputs[=yes/no]]
            [--impersonate-linux-2.6] [--isolate-host-loopback]
            [--listen=SOCKET] [--log-compression=TYPE] [--lose-logs]
            [--max-silent-time=SECONDS] [--max-jobs=N] [--no-offload]
            [--no-substitutes] [--rounds=N] [--substitute-urls=URLS]
            [--system=SYSTEM] [--timeout=SECONDS] [--help] [--usage]
            [--version]
"""

TRY = f"Try `{PROG} --help' or `{PROG} --usage' for more information.\n"


@dataclass(frozen=True)
class _Opt:
    """One `argp_option`: long name, short letter, argument (None, required, optional)."""

    name: str
    dest: str
    arg: str | None = None  # None: no argument; "required" or "optional"
    short: str | None = None
    append: bool = False
    const: str | None = None


# Upstream's `options[]` in table order (getopt lists ambiguous prefixes in this order), then
# argp's own --help, --usage, --version.
OPTIONS: tuple[_Opt, ...] = (
    _Opt("system", "system", "required"),
    _Opt("cores", "cores", "required", "c"),
    _Opt("max-jobs", "max_jobs", "required", "M"),
    _Opt("timeout", "timeout", "required"),
    _Opt("max-silent-time", "max_silent_time", "required"),
    _Opt("disable-chroot", "disable_chroot"),
    _Opt("chroot-directory", "chroot_directory", "required", append=True),
    _Opt("build-users-group", "build_users_group", "required"),
    _Opt("no-substitutes", "no_substitutes"),
    _Opt("substitute-urls", "substitute_urls", "required"),
    _Opt("no-offload", "no_offload"),
    _Opt("no-build-hook", "no_offload"),
    _Opt("cache-failures", "cache_failures"),
    _Opt("rounds", "rounds", "required"),
    _Opt("lose-logs", "lose_logs"),
    _Opt("disable-log-compression", "disable_log_compression"),
    _Opt("log-compression", "log_compression", "required"),
    _Opt("discover", "discover", "optional", const="yes"),
    _Opt("disable-deduplication", "disable_deduplication"),
    _Opt("disable-store-optimization", "disable_deduplication"),
    _Opt("impersonate-linux-2.6", "impersonate"),
    _Opt("gc-keep-outputs", "gc_keep_outputs", "optional", const="yes"),
    _Opt("gc-keep-derivations", "gc_keep_derivations", "optional", const="yes"),
    _Opt("listen", "listen", "required", append=True),
    _Opt("debug", "debug"),
    _Opt("isolate-host-loopback", "isolate_host_loopback"),
    _Opt("help", "help", None, "?"),
    _Opt("usage", "usage"),
    _Opt("version", "version", None, "V"),
)


class UsageError(Exception):
    """An argp usage error (`argp_error` or getopt's complaint): exit status 64."""


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: {message}\n{TRY}")
    sys.exit(EX_USAGE)


def _defaults() -> argparse.Namespace:
    ns = argparse.Namespace()
    for opt in OPTIONS:
        setattr(ns, opt.dest, [] if opt.append else (None if opt.arg else False))
    return ns


def _lookup_long(name: str) -> _Opt:
    exact = [o for o in OPTIONS if o.name == name]
    if exact:
        return exact[0]
    matches = [o for o in OPTIONS if o.name.startswith(name)]
    if not matches:
        raise UsageError(f"unrecognized option '--{name}'")
    first = matches[0]
    if any((o.dest, o.arg) != (first.dest, first.arg) for o in matches[1:]):
        listed = " ".join(f"'--{o.name}'" for o in matches)
        raise UsageError(f"option '--{name}' is ambiguous; possibilities: {listed}")
    return first


def _apply(ns: argparse.Namespace, opt: _Opt, value: str | None) -> None:
    """Store one option, running upstream's `parse_opt` checks as argp meets it."""
    if opt.dest == "help":
        print_and_exit(HELP)
    if opt.dest == "usage":
        print_and_exit(USAGE)
    if opt.dest == "version":
        print_and_exit(f"{PROG} (GNU Guix) {__version__}\n")
    if opt.arg is None:
        setattr(ns, opt.dest, True)
        return
    if value is None:
        value = opt.const
    assert value is not None
    if opt.dest == "rounds" and not value.isdigit():
        _die(f"{value}: invalid number of rounds")
    if opt.dest == "log_compression" and value not in ("none", "gzip", "bzip2"):
        _die(f"{value}: unknown compression type")
    if opt.dest in ("discover", "gc_keep_outputs", "gc_keep_derivations"):
        _boolean(value)
    if opt.append:
        getattr(ns, opt.dest).append(value)
    else:
        setattr(ns, opt.dest, value)


def _long(ns: argparse.Namespace, word: str, words: list[str], i: int) -> int:
    name, eq, attached = word[2:].partition("=")
    try:
        opt = _lookup_long(name)
    except UsageError:
        if eq:
            raise UsageError(f"unrecognized option '{word}'") from None
        raise
    value: str | None = attached if eq else None
    if opt.arg is None and eq:
        raise UsageError(f"option '--{opt.name}' doesn't allow an argument")
    if opt.arg == "required" and not eq:
        if i >= len(words):
            raise UsageError(f"option '--{opt.name}' requires an argument")
        value = words[i]
        i += 1
    _apply(ns, opt, value)
    return i


def _short(ns: argparse.Namespace, word: str, words: list[str], i: int) -> int:
    short = {o.short: o for o in OPTIONS if o.short}
    pos = 1
    while pos < len(word):
        letter = word[pos]
        pos += 1
        opt = short.get(letter)
        if opt is None:
            raise UsageError(f"invalid option -- '{letter}'")
        if opt.arg is None:
            _apply(ns, opt, None)
            continue
        if pos < len(word):
            value = word[pos:]
        elif i < len(words):
            value = words[i]
            i += 1
        else:
            raise UsageError(f"option requires an argument -- '{letter}'")
        _apply(ns, opt, value)
        break
    return i


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`argp_parse` with upstream's table: getopt_long semantics (unique prefixes, a required
    value attached or in the next word, an optional one only attached), usage errors exit 64."""
    words = list(sys.argv[1:] if argv is None else argv)
    ns = _defaults()
    operands: list[str] = []
    i = 0
    try:
        while i < len(words):
            word = words[i]
            i += 1
            if word == "--":
                operands.extend(words[i:])
                break
            if word.startswith("--"):
                i = _long(ns, word, words, i)
            elif word.startswith("-") and len(word) > 1:
                i = _short(ns, word, words, i)
            else:
                operands.append(word)
        if operands:
            raise UsageError("Too many arguments")
    except UsageError as e:
        _usage_error(str(e))
    return ns


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings()
    s.set("build-use-chroot", "false" if args.disable_chroot else "true")
    s.set("auto-optimise-store", "false" if args.disable_deduplication else "true")
    if args.system:
        s.set("system", args.system)
    if args.cores is not None:
        s.set("build-cores", args.cores)
    if args.max_jobs is not None:
        s.set("build-max-jobs", args.max_jobs)
    if args.timeout is not None:
        s.set("build-timeout", args.timeout)
    if args.max_silent_time is not None:
        s.set("build-max-silent-time", args.max_silent_time)
    if args.chroot_directory:
        s.set("build-extra-chroot-dirs", " ".join(args.chroot_directory))
    if args.build_users_group:
        s.set("build-users-group", args.build_users_group)
    if args.no_substitutes:
        s.set("build-use-substitutes", "false")
    if args.substitute_urls is not None:
        s.set("substitute-urls", args.substitute_urls)
    if args.no_offload:
        s.set("build-use-hook", "false")
    if args.cache_failures:
        s.set("build-cache-failure", "true")
    if args.rounds is not None:
        if not args.rounds.isdigit():
            _die(f"{args.rounds}: invalid number of rounds")
        s.set("build-repeat", str(max(int(args.rounds) - 1, 0)))
    s.lose_logs = args.lose_logs
    s.set("build-keep-log", "false" if args.lose_logs else "true")
    if args.disable_log_compression:
        s.log_compression = "none"
    if args.log_compression is not None:
        if args.log_compression not in ("none", "gzip", "bzip2"):
            _die(f"{args.log_compression}: unknown compression type")
        s.log_compression = args.log_compression
    if args.discover is not None:
        s.set("discover", _boolean(args.discover))
    if args.impersonate:
        s.set("build-impersonate-linux-26", "true")
    if args.gc_keep_outputs is not None:
        s.set("gc-keep-outputs", _boolean(args.gc_keep_outputs))
    if args.gc_keep_derivations is not None:
        s.set("gc-keep-derivations", _boolean(args.gc_keep_derivations))
    if args.isolate_host_loopback:
        s.set("isolate-host-loopback", "true")
    if args.debug:
        s.debug = True
        s.verbosity = 4
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    # Listen first, as upstream does (its clients connect a few milliseconds after starting
    # it): the sockets exist before the rest of the daemon is even imported.  Nobody is served
    # before the store is initialised: connections wait in the backlog until workers accept.
    from guixsvc.daemon import listen
    from guixsvc.store.config import StoreConfig

    try:
        settings.validate()
        sockets = listen.listening_sockets(args.listen, StoreConfig.from_env().socket_path)
    except SettingsError as exc:
        _die(str(exc))
    except listen.ListenError as exc:
        _die(str(exc))
    from guixsvc.daemon.pool import run_daemon

    try:
        return run_daemon(settings, args.listen, sockets=sockets)
    except SettingsError as exc:
        _die(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
