"""`guixsvc migrate-store`: hand the store and Guix's data over between the root daemon and the
rootless one (upstream Guix System's `guix-ownership` one-shot service).

The rootless daemon (upstream's unprivileged mode, `privileged? #f`) must own the store, the
state directory, the configuration directory and the build logs; the root daemon wants them
back owned by root.  As upstream, the per-user profiles and the build-user pool under the state
directory keep their owners, symbolic links are changed themselves, never followed.

Differences from upstream, both for safety: the walk is descriptor-relative (`os.fwalk`), so a
store owner who rearranges its tree while root changes ownership cannot redirect a chown outside
the tree; and only entries with another owner are changed, the store's top directory last, so
an interrupted run is simply started again (idempotent).  A store on a read-only mount (the
store's mount unit) is made writable in a private mount namespace of this process first.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from guixsvc.cliargs import (
    Option,
    UsageError,
    help_option,
    parse_command_line,
    run_command,
    version_option,
)

PROG = "guixsvc migrate-store"
#: Entries of the state directory that are not the daemon's (upstream's `excluded`).
STATE_EXCLUDED = ("profiles", "userpool")
PROGRESS_EVERY = 10_000


class MigrateError(Exception):
    pass


def change_ownership(
    directory: str, uid: int, gid: int, progress: Callable[[int], None] | None = None
) -> int:
    """`chown -R UID:GID DIRECTORY` without following symbolic links; returns how many entries
    were changed.  The top directory is changed last."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISLNK(st.st_mode):
            return 0  # e.g. a configuration directory linked elsewhere: not followed
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(directory, uid, gid, follow_symlinks=False)
            return 1
        return 0
    changed = seen = 0
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(directory, follow_symlinks=False):
        for name in [*dirnames, *filenames]:
            seen += 1
            if progress is not None and seen % PROGRESS_EVERY == 0:
                progress(seen)
            try:
                entry = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (entry.st_uid, entry.st_gid) != (uid, gid):
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
                changed += 1
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(directory, uid, gid, follow_symlinks=False)
        changed += 1
    return changed


@dataclass
class Directories:
    store_dir: str
    state_dir: str
    conf_dir: str
    log_dir: str
    db_dir: str = ""


def claim_data_ownership(
    dirs: Directories, uid: int, gid: int, out: Callable[[str], None] = print
) -> int:
    """Upstream's `claim-data-ownership`: the store, the state directory but its excluded
    entries, the configuration directory and the logs; returns the number of entries changed."""
    out(f"Changing file ownership for {dirs.store_dir} and data directories to {uid}:{gid}...")

    def progress(where: str) -> Callable[[int], None]:
        return lambda n: out(f"  {where}: {n} files examined")

    total = 0
    if os.path.isdir(dirs.state_dir):
        for entry in sorted(os.listdir(dirs.state_dir)):
            if entry in STATE_EXCLUDED:
                continue
            path = os.path.join(dirs.state_dir, entry)
            total += change_ownership(path, uid, gid, progress(path))
        st = os.lstat(dirs.state_dir)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(dirs.state_dir, uid, gid, follow_symlinks=False)
            total += 1
    if dirs.db_dir and os.path.dirname(os.path.normpath(dirs.db_dir)) != dirs.state_dir:
        total += change_ownership(dirs.db_dir, uid, gid, progress(dirs.db_dir))
    total += change_ownership(dirs.conf_dir, uid, gid, progress(dirs.conf_dir))
    os.makedirs(dirs.log_dir, exist_ok=True)
    total += change_ownership(dirs.log_dir, uid, gid, progress(dirs.log_dir))
    # The store last, its top directory last of all (`change_ownership`): that is what tells
    # whether a migration is needed, so an interrupted one is noticed and done again.
    total += change_ownership(dirs.store_dir, uid, gid, progress(dirs.store_dir))
    out(f"{total} files changed owner" if total else "nothing to change")
    return total


def migrate(dirs: Directories, user: str | None, out: Callable[[str], None] = print) -> int:
    """To `user` (the rootless daemon's) or, when None, back to root."""
    if user is None:
        uid = gid = 0
        out("Changing to privileged guix-daemon.")
    else:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise MigrateError(f"{user}: no such user") from None
        uid, gid = pw.pw_uid, pw.pw_gid
        if uid == 0:
            raise MigrateError(f"{user}: the unprivileged daemon's user cannot be root")
        out("Changing to unprivileged guix-daemon.")
    if os.geteuid() != 0:
        raise MigrateError("changing ownership needs root")
    if os.path.isdir(dirs.store_dir) and not os.access(dirs.store_dir, os.W_OK):
        from guixsvc.daemon.localstore import make_store_writable

        make_store_writable(dirs.store_dir)
    return claim_data_ownership(dirs, uid, gid, out)


HELP = """\
Usage: guixsvc migrate-store --to-user=USER | --to-root
Hand the store, state, configuration and log directories over to USER, the user of the
rootless guix-daemon, or back to root.  Stop guix-daemon first.  Safe to run again.

      --to-user=USER     make USER (e.g. guix-daemon) the owner
      --to-root          make root the owner again

  -h, --help             display this help and exit
  -V, --version          display version information and exit

The directories are those of NIX_STORE_DIR, GUIX_STATE_DIRECTORY,
GUIX_CONFIGURATION_DIRECTORY and GUIX_LOG_DIRECTORY (defaults /gnu/store, /var/guix,
/etc/guix, /var/log/guix).
"""


@dataclass
class _Options:
    user: str | None = None
    to_root: bool = False


def _extraneous(opts: _Options, arg: str) -> None:
    raise UsageError(f"{arg}: extraneous argument")


OPTIONS: tuple[Option[_Options], ...] = (
    help_option(HELP),
    version_option(PROG, "guixsvc"),
    Option(("to-user",), lambda o, a: setattr(o, "user", a), required=True),
    Option(("to-root",), lambda o, _: setattr(o, "to_root", True)),
)  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        PROG, lambda: _run(parse_command_line(words, OPTIONS, _Options(), _extraneous))
    )


def _run(args: _Options) -> int:
    if (args.user is None) == (not args.to_root):
        raise UsageError("exactly one of --to-user and --to-root is required")
    from guixsvc.store.config import StoreConfig

    config = StoreConfig.from_env()
    dirs = Directories(
        config.store_dir, config.state_dir, config.conf_dir, config.log_dir, config.db_dir
    )
    try:
        migrate(dirs, None if args.to_root else args.user, lambda s: print(s, flush=True))
    except (MigrateError, OSError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    return 0


def with_writable_store(argv: Sequence[str] | None = None) -> int:
    """`guixsvc with-writable-store USER GROUP COMMAND ARGS...` (upstream Guix System's
    `run-with-writable-store`): as root, make the store writable in a private mount namespace
    (it stays read-only for everybody else), become USER:GROUP with no supplementary groups and
    no capabilities left, and exec COMMAND there: the rootless daemon's start.  The process keeps
    its PID, so systemd's socket (LISTEN_PID) and notifications reach the daemon."""
    words = list(sys.argv[1:] if argv is None else argv)
    prog = "guixsvc with-writable-store"
    if len(words) < 3 or words[0] in ("-h", "--help"):
        sys.stderr.write(f"Usage: {prog} USER GROUP COMMAND ARGS...\n")
        return 0 if words[:1] in (["-h"], ["--help"]) else 1
    user, group, command = words[0], words[1], words[2:]
    try:
        import grp

        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        sys.stderr.write(f"{prog}: error: no such user or group: {exc}\n")
        return 1
    if uid == 0:
        sys.stderr.write(f"{prog}: error: refusing to run the daemon as root\n")
        return 1
    from guixsvc.daemon.localstore import make_store_writable
    from guixsvc.protocol.store_api import StoreError
    from guixsvc.store.config import StoreConfig

    try:
        make_store_writable(StoreConfig.from_env().store_dir)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from root to another uid: every capability is dropped
        os.execvp(command[0], command)
    except (OSError, StoreError) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 1
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
