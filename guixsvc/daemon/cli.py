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
from typing import NoReturn

from guixsvc import __version__
from guixsvc.daemon.settings import Settings, SettingsError

PROG = "guix-daemon"
EX_USAGE = 64


class _ArgpParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            extra = message.split(":", 1)[1].split()
            if extra and extra[0].startswith("-"):
                message = f"unrecognized option '{extra[0]}'"
            else:
                message = "Too many arguments"
        sys.stderr.write(
            f"{PROG}: {message}\nTry `{PROG} --help' or `{PROG} --usage' for more information.\n"
        )
        sys.exit(EX_USAGE)


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


def build_parser() -> argparse.ArgumentParser:
    p = _ArgpParser(
        prog=PROG,
        description="guix-daemon -- perform derivation builds and store accesses",
        epilog="This program is a daemon meant to run in the background.  It serves requests "
        "sent over a Unix-domain socket.  It accesses the store, and builds derivations on "
        "behalf of its clients.",
        add_help=False,
        allow_abbrev=True,
    )
    a = p.add_argument
    a("--system", metavar="SYSTEM", help="assume SYSTEM as the current system type")
    a("-c", "--cores", metavar="N", help="use N CPU cores to build each derivation; 0 means as "
      "many as available")  # fmt: skip
    a("-M", "--max-jobs", metavar="N", help="allow at most N build jobs")
    a("--timeout", metavar="SECONDS", help="mark builds as failed after SECONDS of activity")
    a("--max-silent-time", metavar="SECONDS",
      help="mark builds as failed after SECONDS of silence")  # fmt: skip
    a("--disable-chroot", action="store_true", help="disable chroot builds")
    a("--chroot-directory", metavar="DIR", action="append", default=[],
      help="add DIR to the build chroot")  # fmt: skip
    a("--build-users-group", metavar="GROUP", help="perform builds as a user of GROUP")
    a("--no-substitutes", action="store_true", help="do not use substitutes")
    a("--substitute-urls", metavar="URLS",
      help="use URLS as the default list of substitute providers")  # fmt: skip
    a("--no-offload", "--no-build-hook", action="store_true",
      help="do not attempt to offload builds")  # fmt: skip
    a("--cache-failures", action="store_true", help="cache build failures")
    a("--rounds", metavar="N", help="build each derivation N times in a row")
    a("--lose-logs", action="store_true", help="do not keep build logs")
    a("--disable-log-compression", action="store_true", help=argparse.SUPPRESS)
    a("--log-compression", metavar="TYPE", help="use TYPE as the compression method for "
      "build logs (none, gzip, bzip2)")  # fmt: skip
    a("--discover", metavar="yes/no", nargs="?", const="yes",
      help="use substitute servers discovered on the local network")  # fmt: skip
    a("--disable-deduplication", "--disable-store-optimization", action="store_true",
      help="disable automatic file \"deduplication\" in the store")  # fmt: skip
    a("--impersonate-linux-2.6", dest="impersonate", action="store_true",
      help="impersonate Linux 2.6")  # fmt: skip
    a("--gc-keep-outputs", metavar="yes/no", nargs="?", const="yes",
      help="tell whether the GC must keep outputs of live derivations")  # fmt: skip
    a("--gc-keep-derivations", metavar="yes/no", nargs="?", const="yes",
      help="tell whether the GC must keep derivations corresponding to live outputs")  # fmt: skip
    a("--listen", metavar="SOCKET", action="append", default=[],
      help="listen for connections on SOCKET")  # fmt: skip
    a("--debug", action="store_true", help="produce debugging output")
    a("--isolate-host-loopback", action="store_true",
      help="do not allow fixed-output builds to reach the host's loopback")  # fmt: skip
    a("-?", "--help", action="help", help="give this help list")
    a("--usage", action="help", help="give a short usage message")
    a("-V", "--version", action="version", version=f"{PROG} (GNU Guix) {__version__}",
      help="print program version")  # fmt: skip
    return p


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
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    from guixsvc.daemon.server import run_daemon

    try:
        return run_daemon(settings, args.listen)
    except SettingsError as exc:
        _die(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
