"""`guixsvc gc`: upstream's `guix gc` command line, talking to the daemon over its socket.

It is a drop-in for `guix gc` (`guix/scripts/gc.scm`, newer tree; spec gc.md §7): the same
options parsed the way Guile's SRFI-37 parses them, the same output on stdout (one item per line),
the same `guix gc: …` diagnostics and exit codes.  Collection, deletion and the listing queries
go to the daemon (found through `GUIX_DAEMON_SOCKET`); `--list-roots`, `--list-busy` and
`--delete-generations` work on the file system, as upstream's client does, and `--list-busy`
never connects (the daemon runs it while holding the GC lock).
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from guixsvc import cliargs
from guixsvc.cliargs import (
    BUG_REPORT,
    Exit,
    Option,
    UsageError,
    connect_daemon,
    help_option,
    parse_command_line,
    run_command,
    version_option,
)
from guixsvc.daemon.busy import busy_store_items
from guixsvc.gc import profiles
from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.protocol.ops import GCAction
from guixsvc.protocol.wire import ProtocolError
from guixsvc.quantities import number_to_size, parse_duration, size_to_number
from guixsvc.store.config import StoreConfig

__all__ = ["Options", "main", "parse_args"]

PROG = "guix gc"
UNLIMITED = 2**64 - 1

HELP = (
    """\
Usage: guix gc [OPTION]... PATHS...
Invoke the garbage collector.

  -C, --collect-garbage[=MIN]
                         collect at least MIN bytes of garbage
  -F, --free-space=FREE  attempt to reach FREE available space in the store
  -d, --delete-generations[=PATTERN]
                         delete profile generations matching PATTERN
  -D, --delete           attempt to delete PATHS
      --list-roots       list the user's garbage collector roots
      --list-busy        list store items used by running processes
      --optimize         optimize the store by deduplicating identical files
      --list-dead        list dead paths
      --list-live        list live paths

      --references       list the references of PATHS
  -R, --requisites       list the requisites of PATHS
      --referrers        list the referrers of PATHS
      --derivers         list the derivers of PATHS

      --verify[=OPTS]    verify the integrity of the store; OPTS is a
                         comma-separated combination of 'repair' and
                         'contents'
      --list-failures    list cached build failures
      --clear-failures   remove PATHS from the set of cached failures

      --vacuum-database  repack the sqlite database tracking the store
                         using less space

  -h, --help             display this help and exit
  -V, --version          display version information and exit
"""
    + BUG_REPORT
)


@dataclass
class Options:
    action: str = "collect-garbage"
    min_freed: int | None = None
    free_space: int | None = None
    delete_generations: bool = False
    generations_pattern: str | None = None
    verify_options: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


# --- option parsing (SRFI-37 semantics, spec cli.md §0; guixsvc/cliargs.py) ------------------

Handler = Callable[[Options, str | None], None]


def _set_action(action: str) -> Handler:
    def handle(opts: Options, arg: str | None) -> None:
        opts.action = action

    return handle


def _collect(opts: Options, arg: str | None) -> None:
    opts.action = "collect-garbage"
    if arg is not None:
        opts.min_freed = size_to_number(arg)


def _free_space(opts: Options, arg: str | None) -> None:
    assert arg is not None
    opts.free_space = size_to_number(arg)


def _delete_generations(opts: Options, arg: str | None) -> None:
    store = StoreConfig.from_env(daemon=False).store_dir
    if arg is not None and arg.startswith(store):
        _warn("'-d' as an alias for '--delete' is deprecated; use '-D'")
        # Upstream replaces the whole option list here (quirk): earlier options are lost.
        fresh = Options(action="delete", paths=[arg])
        opts.__dict__.update(fresh.__dict__)
        return
    if arg is not None and parse_duration(arg) is None:
        raise UsageError(f'"{arg}" does not denote a duration')
    opts.delete_generations = True
    opts.generations_pattern = arg


def _verify(opts: Options, arg: str | None) -> None:
    options = [o for o in (arg or "").split(",") if o]
    for option in options:
        if option not in ("repair", "contents"):
            raise UsageError(f"{option}: invalid '--verify' option")
    opts.action = "verify"
    opts.verify_options = options


def _vacuum(opts: Options, arg: str | None) -> None:
    if os.getuid() != 0:
        raise UsageError("vacuuming the database can only be used by root")
    vacuum_database(StoreConfig.from_env(daemon=False).db_dir)
    raise Exit(0)


OPTIONS: tuple[Option[Options], ...] = (
    help_option(HELP),
    version_option(PROG),
    Option(("vacuum-database",), _vacuum),
    Option(("C", "collect-garbage"), _collect, optional=True),
    Option(("F", "free-space"), _free_space, required=True),
    Option(("D", "delete"), _set_action("delete")),
    Option(("d", "delete-generations"), _delete_generations, optional=True),
    Option(("optimize",), _set_action("optimize")),
    Option(("verify",), _verify, optional=True),
    Option(("list-roots",), _set_action("list-roots")),
    Option(("list-busy",), _set_action("list-busy")),
    Option(("list-dead",), _set_action("list-dead")),
    Option(("list-live",), _set_action("list-live")),
    Option(("references",), _set_action("list-references")),
    Option(("R", "requisites"), _set_action("list-requisites")),
    Option(("referrers",), _set_action("list-referrers")),
    Option(("derivers",), _set_action("list-derivers")),
    Option(("list-failures",), _set_action("list-failures")),
    Option(("clear-failures",), _set_action("clear-failures")),
)  # type: ignore[assignment]


def parse_args(argv: Sequence[str]) -> Options:
    """Fold `argv` into `Options`, calling each option's handler as it is met (like upstream,
    a bad value stops parsing at once).  Raises `UsageError`, `Unrecognized` or `Exit`."""
    return parse_command_line(argv, OPTIONS, Options(), lambda o, arg: o.paths.append(arg))


# --- diagnostics -------------------------------------------------------------------------------


def _info(message: str) -> None:
    cliargs.info(PROG, message)


def _warn(message: str) -> None:
    cliargs.warning(PROG, message)


class _DaemonLog:
    """Shows the daemon's messages on stderr; on a terminal, the per-item progress lines
    (`[…] deleting '…'`) overwrite each other instead of scrolling."""

    _PROGRESS = re.compile(r"^\[[^]]*\] deleting '")

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.pending = False

    def __call__(self, text: str) -> None:
        if self.tty and self._PROGRESS.match(text):
            self.stream.write("\r\x1b[K" + text.rstrip("\n"))
            self.pending = True
        else:
            self.finish()
            self.stream.write(text)
        self.stream.flush()

    def finish(self) -> None:
        if self.pending:
            self.stream.write("\r\x1b[K")
            self.pending = False


# --- actions -----------------------------------------------------------------------------------


class _Session:
    """The daemon connection, opened when an action first needs it (like newer upstream)."""

    def __init__(self) -> None:
        self.log = _DaemonLog(sys.stderr)
        self._client: DaemonClient | None = None

    @property
    def client(self) -> DaemonClient:
        if self._client is None:
            self._client = connect_daemon(log=self.log)
        return self._client

    def close(self) -> None:
        self.log.finish()
        if self._client is not None:
            self._client.close()
            self._client = None


def _symlink_target(file: str) -> str:
    while True:
        try:
            if not os.path.islink(file):
                return file
            file = os.readlink(file)
        except OSError:
            return file


def _store_directory(file: str, store_dir: str) -> str:
    m = re.match(re.escape(store_dir) + "/([^/]+)", file)
    return f"{store_dir}/{m.group(1)}" if m else file


def direct_store_path(path: str, store_dir: str) -> str:
    """`direct-store-path`: strip what follows `<store>/<hash>-<name>`."""
    prefix_length = len(store_dir) + 35
    if len(path) > prefix_length:
        slash = path.find("/", prefix_length)
        if slash >= 0:
            return path[:slash]
    return path


def requisites(client: DaemonClient, paths: Iterable[str]) -> list[str]:
    """`requisites`: the closure, in upstream's order (reverse breadth-first discovery)."""
    queue = list(paths)
    seen: set[str] = set()
    result: list[str] = []
    i = 0
    while i < len(queue):
        path = queue[i]
        i += 1
        if path in seen:
            continue
        seen.add(path)
        queue.extend(client.query_references(path))
        result.append(path)
    result.reverse()
    return result


def _print_lines(lines: Iterable[str]) -> None:
    out = sys.stdout
    for line in lines:
        out.write(line + "\n")
    out.flush()


def free_disk_space(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_bsize


def vacuum_database(db_dir: str) -> None:
    """`VACUUM` the store database in place (newer `guix gc --vacuum-database`)."""
    conn = sqlite3.connect(f"{db_dir}/db.sqlite", timeout=3600.0, isolation_level=None)
    try:
        conn.execute("VACUUM")
    finally:
        conn.close()


def delete_generations(config: StoreConfig, pattern: str | None) -> None:
    """Delete old generations of every profile of the caller (of everybody, for root)."""
    root_user = os.getuid() == 0
    seen: dict[str, None] = {}
    for root in profiles.gc_roots(config.state_dir, config.store_dir):
        if not (root_user or profiles.user_owned(root)):
            continue
        profile = profiles.generation_profile(root)
        if profile is not None:
            seen.setdefault(profile, None)
    duration = None if pattern is None else parse_duration(pattern)
    for profile in seen:
        profiles.delete_old_generations(profile, duration, out=sys.stdout.write)
    sys.stdout.flush()


def _run(opts: Options, session: _Session) -> int:
    config = StoreConfig.from_env(daemon=False)
    store_dir = config.store_dir
    # Upstream collects operands newest first, so PATHS are handled in reverse order.
    paths = opts.paths[::-1]

    def no_extra_arguments() -> None:
        if paths:
            raise UsageError("extraneous arguments: " + "".join(f"{p} " for p in paths))

    def relatives(query: Callable[[DaemonClient, str], list[str]]) -> None:
        client = session.client
        for path in paths:
            item = _store_directory(_symlink_target(path), store_dir)
            _print_lines(query(client, item))

    action = opts.action
    if action == "collect-garbage":
        no_extra_arguments()
        client = session.client
        if opts.delete_generations:
            delete_generations(config, opts.generations_pattern)
        if opts.free_space is not None:
            free = free_disk_space(store_dir)
            if free > opts.free_space:
                _info(f"already {number_to_size(free)} available on {store_dir}, nothing to do")
            else:
                to_free = opts.free_space - free
                _info(f"freeing {number_to_size(to_free)}")
                client.collect_garbage(GCAction.DELETE_DEAD, (), to_free)
                session.log.finish()
        else:
            min_freed = UNLIMITED if opts.min_freed is None else opts.min_freed
            _, freed = client.collect_garbage(GCAction.DELETE_DEAD, (), min_freed)
            session.log.finish()
            _info(f"freed {number_to_size(freed)}")
    elif action == "list-roots":
        no_extra_arguments()
        roots = profiles.gc_roots(config.state_dir, store_dir)
        if os.getuid() != 0:
            roots = [r for r in roots if profiles.user_owned(r)]
        _print_lines(roots)
    elif action == "list-busy":
        no_extra_arguments()
        _print_lines(busy_store_items(store_dir))
    elif action == "delete":
        session.client.collect_garbage(
            GCAction.DELETE_SPECIFIC, [direct_store_path(p, store_dir) for p in paths]
        )
    elif action == "list-references":
        relatives(lambda c, p: c.query_references(p))
    elif action == "list-requisites":
        relatives(lambda c, p: requisites(c, [p]))
    elif action == "list-referrers":
        relatives(lambda c, p: c.query_referrers(p))
    elif action == "list-derivers":
        relatives(lambda c, p: c.query_valid_derivers(p))
    elif action == "optimize":
        no_extra_arguments()
        session.client.optimise_store()
    elif action == "verify":
        no_extra_arguments()
        errors = session.client.verify_store(
            "contents" in opts.verify_options, "repair" in opts.verify_options
        )
        return 1 if errors else 0
    elif action == "list-failures":
        _print_lines(session.client.query_failed_paths())
    elif action == "clear-failures":
        session.client.clear_failed_paths([direct_store_path(p, store_dir) for p in paths])
    elif action == "list-dead":
        _print_lines(session.client.collect_garbage(GCAction.RETURN_DEAD)[0])
    elif action == "list-live":
        _print_lines(session.client.collect_garbage(GCAction.RETURN_LIVE)[0])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `guixsvc gc ARGS...`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    session = _Session()

    def body() -> int:
        try:
            return _run(parse_args(args), session)
        except BaseException:
            session.log.finish()
            raise

    return run_command(
        PROG,
        body,
        handlers=[
            (DaemonError, lambda e: e.message),  # type: ignore[attr-defined]
            (EOFError, lambda e: str(e) or type(e).__name__),
            (ProtocolError, lambda e: str(e) or type(e).__name__),
            (OSError, lambda e: str(e) or type(e).__name__),
        ],
        cleanup=session.close,
    )


if __name__ == "__main__":
    sys.exit(main())
