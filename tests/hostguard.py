"""The host-state guard: the test suite must never touch the host's Guix store or state.

Every daemon, publish server and gc the tests start must run on a private store.  A launcher that
drops the environment (systemd-socket-activate passes only a few variables on; nsenter, su and a
subprocess given `env=` can do the same) silently sends a child to the defaults — the host's
`/gnu/store` and `/var/guix`.  `tests/conftest.py` snapshots the host paths below when the session
starts and fails the run when anything there differs at its end; it also points the store
variables of the test process itself at a throw-away directory, so a child that merely inherits
the environment lands there and not on the host.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

#: The host paths no test may change (upstream's defaults).
HOST_PATHS: tuple[str, ...] = ("/gnu/store", "/var/guix", "/etc/guix", "/var/log/guix")

#: How deep below each host path the listing goes: deep enough to see a new store item, a new db
#: file, a new root or log, shallow enough to stay cheap on a real Guix host.
DEPTH = 3

#: The variables that decide where a daemon, publish or gc puts things.
STORE_VARIABLES: tuple[str, ...] = (
    "NIX_STORE_DIR",
    "GUIX_STATE_DIRECTORY",
    "GUIX_DATABASE_DIRECTORY",
    "GUIX_LOG_DIRECTORY",
    "GUIX_CONFIGURATION_DIRECTORY",
    "GUIX_DAEMON_SOCKET",
)

Snapshot = dict[str, object]


def _listing(top: str, depth: int) -> list[str]:
    """Relative names (with a type letter) below `top`, `depth` levels deep, links not followed."""
    out: list[str] = []
    stack = [("", 0)]
    while stack:
        rel, level = stack.pop()
        try:
            entries = sorted(
                os.scandir(os.path.join(top, rel) if rel else top), key=lambda e: e.name
            )
        except OSError as e:
            out.append(f"{rel or '.'}: unreadable ({e.strerror})")
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_symlink():
                out.append(f"l {name} -> {os.readlink(entry.path)}")
            elif entry.is_dir(follow_symlinks=False):
                out.append(f"d {name}")
                if level + 1 < depth:
                    stack.append((name, level + 1))
            else:
                out.append(f"f {name}")
    return sorted(out)


def _valid_path_count(db: str) -> int | str:
    # immutable=1: even a read-only reader of a WAL database would create db.sqlite-shm and
    # db.sqlite-wal, changing the very state it guards (rows still in a WAL show up as that file).
    try:
        with sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0])
    except sqlite3.Error as e:
        return f"unreadable ({e})"


def snapshot(paths: Iterable[str] = HOST_PATHS, depth: int = DEPTH) -> Snapshot:
    """What can be seen of `paths`: existence, listing and, for a state directory, its db's rows."""
    result: Snapshot = {}
    for path in paths:
        if not os.path.lexists(path):
            result[path] = None
            continue
        if not os.path.isdir(path) or os.path.islink(path):
            st = os.lstat(path)
            result[path] = ("not a directory", st.st_mode, st.st_size)
            continue
        result[path] = _listing(path, depth)
        db = os.path.join(path, "db", "db.sqlite")
        if os.path.exists(db):
            result[f"{db} ValidPaths"] = _valid_path_count(db)
    return result


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """Human-readable lines for every path whose state changed between two snapshots."""
    lines: list[str] = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):
            added = sorted(set(new) - set(old))
            removed = sorted(set(old) - set(new))
            lines.append(
                f"{key}: "
                + ", ".join(
                    [f"added {a}" for a in added[:10]] + [f"removed {r}" for r in removed[:10]]
                )
            )
        else:
            lines.append(f"{key}: was {old!r}, now {new!r}")
    return lines
