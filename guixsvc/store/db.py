"""The store database: SQLite with upstream's schema (`guix/store/schema.sql`, version 7).

The database in `<db-dir>/db.sqlite` is shared with upstream's guix-daemon and with `guix gc`
tools, so the schema (tables, columns, constraints, index and trigger names), the `schema` version
file, the `big-lock` protocol and the way values are stored (`sha256:<base16>` hashes, Unix-second
times, NULL deriver / NAR size when unknown) all follow upstream (`nix/libstore/local-store.cc`).

Usage model: one `StoreDatabase` per process.  The SQLite connection is opened lazily by the process
that uses it and never carried across `fork()` (a child gets its own connection and its own shared
`big-lock`).  Statements are plain SQL strings, which Python's `sqlite3` prepares once and caches;
batch writes use `executemany` inside a single transaction.  `transaction()` lets a caller group
several calls (e.g. register a `.drv`, add its outputs, verify them) all or nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

from guixsvc.store.locks import LVL_ERROR, MessageLog, SysError, emit, lock_fd, open_lock_file

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "CycleError",
    "InvalidPathError",
    "StoreDatabase",
    "StoreDatabaseError",
    "ValidPathInfo",
    "ensure_reserved",
]

SCHEMA_VERSION = 7

#: The store schema.  Semantically identical to upstream's `schema.sql` (same tables, columns,
#: types, constraints, index and trigger names), so that databases are interchangeable.
SCHEMA = """\
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null, -- "sha256:" + base16 NAR hash
    registrationTime integer not null, -- Unix seconds
    deriver          text, -- NULL when unknown
    narSize          integer -- NULL when unknown
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- A self-reference (N, N) would make deleting path N violate the "restrict"
-- rule of Refs.reference, so drop it before the row goes.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- output name, e.g. "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);

create table if not exists FailedPaths (
    path text primary key not null,
    time integer not null
);
"""

# Statements (the same SQL upstream prepares in `openDB`, give or take the ordering clauses).
_SQL_REGISTER = (
    "insert into ValidPaths (path, hash, registrationTime, deriver, narSize) values (?, ?, ?, ?, ?)"
)
_SQL_REGISTER_NEW = _SQL_REGISTER + " on conflict (path) do nothing"
_SQL_UPDATE = "update ValidPaths set narSize = ?, hash = ? where path = ?"
_SQL_ADD_REF = "insert or replace into Refs (referrer, reference) values (?, ?)"
_SQL_PATH_INFO_REFS = (
    "select v.hash, v.registrationTime, v.deriver, v.narSize, r.path from ValidPaths v"
    " left join Refs f on f.referrer = v.id left join ValidPaths r on r.id = f.reference"
    " where v.path = ?"
)
_SQL_PATH_ID = "select id from ValidPaths where path = ?"
_SQL_REFERENCES = (
    "select path from Refs join ValidPaths on reference = id where referrer = ? order by path"
)
_SQL_REFERENCE_IDS = "select reference from Refs where referrer = ?"
_SQL_REFERRERS = (
    "select path from Refs join ValidPaths on referrer = id"
    " where reference = (select id from ValidPaths where path = ?) order by path"
)
_SQL_INVALIDATE = "delete from ValidPaths where path = ?"
_SQL_ADD_FAILED = "insert or ignore into FailedPaths (path, time) values (?, ?)"
_SQL_HAS_FAILED = "select time from FailedPaths where path = ?"
_SQL_FAILED = "select path from FailedPaths order by path"
_SQL_CLEAR_FAILED = (
    "delete from FailedPaths where ?1 = '*' or path = ?1 or path in"
    " (select d.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where v.path = ?1)"
)
_SQL_ADD_DRV_OUTPUT = "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)"
_SQL_VALID_DERIVERS = (
    "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id"
    " where d.path = ? order by v.path"
)
_SQL_DRV_OUTPUTS = "select id, path from DerivationOutputs where drv = ? order by id"
_SQL_FROM_HASH_PART = "select path from ValidPaths where path >= ? limit 1"
_SQL_ALL_VALID = "select path from ValidPaths order by path"

_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SCHEMA_INT_RE = re.compile(r"\s*[+-]?[0-9]+")

_SQLITE_BUSY = 5
_SQLITE_PROTOCOL = 15

T = TypeVar("T")

# Connections inherited across fork must never be closed by the child (closing could checkpoint
# and delete the parent's WAL, or release locks the parent relies on); they are parked here.
_abandoned_connections: list[sqlite3.Connection] = []


class StoreDatabaseError(Exception):
    """Errors about the store database (opening, schema version, SQLite failures)."""


class CycleError(StoreDatabaseError):
    """`cycle detected in the references of `X'` (upstream raises a BuildError)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"cycle detected in the references of `{path}'")
        self.path = path


class InvalidPathError(Exception):
    """A store path has no `ValidPaths` row.

    Upstream words this two ways: ``path ‘R’ is not valid`` (typographic quotes, from
    `queryValidPathId`: registration references, derivation outputs) and ``path `R' is not valid``
    (from `queryPathInfo`: references, deriver, path info); `backtick` selects the latter.
    """

    def __init__(self, path: str, *, backtick: bool = False) -> None:
        text = f"path `{path}' is not valid" if backtick else f"path ‘{path}’ is not valid"
        super().__init__(text)
        self.path = path


@dataclass
class ValidPathInfo:
    """One `ValidPaths` row with its references.

    `nar_hash` is the database form ``sha256:<64 hex digits>``; `nar_size` None (or 0) means
    unknown; `registration_time` None (or 0) means "now" when registering.
    """

    path: str
    nar_hash: str
    nar_size: int | None
    references: frozenset[str] = field(default_factory=frozenset)
    deriver: str | None = None
    registration_time: int | None = None


def ensure_reserved(db_dir: str, reserve: bool, size: int = 8 * 1024 * 1024) -> None:
    """(Re)create or delete `<db-dir>/reserved` (the space freed before a GC on a full disk).

    With `reserve`, the file is (re)created with mode 0600 when missing or of the wrong size;
    without, it is deleted.  Errors are ignored, as upstream does.
    """
    path = f"{db_dir}/reserved"
    try:
        if not reserve:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        try:
            if os.stat(path).st_size == size:
                return
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                block = b"X" * min(size, 1 << 20)
                written = 0
                while written < size:
                    written += os.write(fd, block[: size - written])
            # A bigger old file must shrink too.
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError:
        pass


def _busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_PROTOCOL)


#: This process's pid, kept current across `os.fork` without a system call per query.
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class StoreDatabase:
    """The store database of one process (upstream `LocalStore`'s database part).

    Create with `StoreDatabase.open(db_dir)`.  Paths are full store file names (`/gnu/store/…`).
    Lists returned are sorted bytewise (SQLite's BINARY collation on UTF-8 text).
    """

    def __init__(
        self,
        db_dir: str,
        *,
        wal: bool = True,
        fsync: bool = True,
        read_only: bool = False,
        log: MessageLog | None = None,
    ) -> None:
        self.db_dir = db_dir
        self.db_path = f"{db_dir}/db.sqlite"
        self.schema_path = f"{db_dir}/schema"
        self.wal = wal
        self.fsync = fsync
        self.read_only = read_only
        self._log = log
        self._conn: sqlite3.Connection | None = None
        self._big_lock: int | None = None
        self._pid = os.getpid()
        self._depth = 0
        self._warned_busy = False

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, db_dir: str, *, wal: bool = True, fsync: bool = True, log: MessageLog | None = None
    ) -> StoreDatabase:
        """Open (creating a new one if there is no `schema` file) the database in `db_dir`.

        Takes `big-lock` shared (printing ``waiting for the big store lock...`` if it has to
        wait); if `big-lock` cannot be opened because of EACCES, the database is opened without
        it and `read_only` is set.  Raises `StoreDatabaseError` with upstream's messages for a
        too new or too old schema.  No SQLite connection stays open: each process that uses the
        object connects on first use, so `open()` may be called before forking workers.
        """
        self = cls(db_dir, wal=wal, fsync=fsync, log=log)
        if not os.path.isdir(db_dir):
            try:
                os.makedirs(db_dir, exist_ok=True)
            except OSError as e:
                raise SysError(f"creating directory `{db_dir}'", e.errno) from e
        try:
            self._take_big_lock()
        except SysError as e:
            if e.errno != errno.EACCES:
                raise
            self.read_only = True
            self._connect(create=False).close()
            return self

        try:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise StoreDatabaseError(
                    f"current store schema is version {version}, "
                    f"but I only support {SCHEMA_VERSION}"
                )
            if version == 0:  # a new store
                self._connect(create=True).close()
                try:
                    with open(self.schema_path, "w", encoding="ascii") as f:
                        f.write(str(SCHEMA_VERSION))
                except OSError as e:
                    raise SysError(f"opening file `{self.schema_path}'", e.errno) from e
            elif version < SCHEMA_VERSION:
                raise StoreDatabaseError(
                    f"Your store database uses an implausibly old schema, version {version}."
                )
            else:
                # Check that it opens; the process that uses it connects on first use.
                self._connect(create=False).close()
        except BaseException:
            self.close()
            raise
        return self

    def schema_version(self) -> int:
        """The number in `<db-dir>/schema`, 0 if the file does not exist."""
        try:
            with open(self.schema_path, encoding="latin-1") as f:
                text = f.read()
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise SysError(f"opening file `{self.schema_path}'", e.errno) from e
        if not _SCHEMA_INT_RE.fullmatch(text):
            raise StoreDatabaseError(f"`{self.schema_path}' is corrupt")
        return int(text)

    def _take_big_lock(self) -> None:
        fd = open_lock_file(f"{self.db_dir}/big-lock", True)
        assert fd is not None
        try:
            if not lock_fd(fd, "r", False):
                emit(self._log, LVL_ERROR, "waiting for the big store lock...")
                lock_fd(fd, "r", True)
        except BaseException:
            os.close(fd)
            raise
        self._big_lock = fd

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not os.access(self.db_dir, os.R_OK | os.W_OK):
            raise SysError(
                f"store database directory `{self.db_dir}' is not writable",
                errno.EACCES if os.path.exists(self.db_dir) else errno.ENOENT,
            )
        uri = "file:" + urllib.parse.quote(self.db_path) + ("?mode=rwc" if create else "?mode=rw")
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=3600.0, isolation_level=None, cached_statements=64
            )
        except sqlite3.Error as e:
            raise StoreDatabaseError(f"cannot open store database `{self.db_path}'") from e
        try:
            conn.execute("pragma foreign_keys = 1")
            conn.execute(f"pragma synchronous = {'normal' if self.fsync else 'off'}")
            mode = "wal" if self.wal else "truncate"
            (previous,) = conn.execute("pragma main.journal_mode").fetchone()
            if str(previous).lower() != mode:
                conn.execute(f"pragma main.journal_mode = {mode}")
            if self.wal:
                conn.execute("pragma wal_autocheckpoint = 40000")
            if create:
                conn.executescript(SCHEMA)
        except sqlite3.Error as e:
            conn.close()
            raise StoreDatabaseError(f"initialising database: {e}") from e
        return conn

    def _connection(self) -> sqlite3.Connection:
        """This process's connection, opened on first use (and again after a fork)."""
        pid = _pid
        if pid != self._pid:
            # We are a forked child: nothing of the parent's may be used or closed.
            if self._conn is not None:
                _abandoned_connections.append(self._conn)
                self._conn = None
            if self._big_lock is not None:
                os.close(self._big_lock)  # the child holds no lock through it
                self._big_lock = None
            self._pid = pid
            self._depth = 0
            if not self.read_only:
                self._take_big_lock()
        if self._conn is None:
            self._conn = self._connect(create=False)
        return self._conn

    def close(self) -> None:
        """Close the connection and release `big-lock` (in the process that opened them)."""
        conn, self._conn = self._conn, None
        fd, self._big_lock = self._big_lock, None
        if os.getpid() != self._pid:
            if conn is not None:
                _abandoned_connections.append(conn)
            if fd is not None:
                os.close(fd)
            return
        try:
            if conn is not None:
                conn.close()
        finally:
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> StoreDatabase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- transactions ------------------------------------------------------------------------

    def _sleep_busy(self) -> None:
        if not self._warned_busy:
            emit(self._log, LVL_ERROR, "warning: SQLite database is busy")
            self._warned_busy = True
        time.sleep(random.randrange(100) / 1000.0)

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying on SQLITE_BUSY when not inside a caller's transaction."""
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if self._depth or not _busy(e):
                    raise
                self._sleep_busy()

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0 and self._pid == _pid

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing block: `BEGIN IMMEDIATE` … `COMMIT`, `ROLLBACK` on any exception.

        Nested use is safe: an inner block is a savepoint, rolled back alone if it raises (the
        exception still propagates; the outer block decides).
        """
        conn = self._connection()
        if self._depth == 0:
            while True:
                try:
                    conn.execute("begin immediate")
                    break
                except sqlite3.OperationalError as e:
                    if not _busy(e):
                        raise
                    self._sleep_busy()
            self._depth = 1
            try:
                yield conn
            except BaseException:
                self._depth = 0
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("rollback")
                raise
            try:
                conn.execute("commit")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("rollback")
                raise
            finally:
                self._depth = 0
        else:
            name = f"guixsvc_sp{self._depth}"
            conn.execute(f"savepoint {name}")
            self._depth += 1
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"rollback to {name}")
                    conn.execute(f"release {name}")
                raise
            else:
                conn.execute(f"release {name}")
            finally:
                self._depth -= 1

    # --- queries -----------------------------------------------------------------------------

    def _path_id(self, conn: sqlite3.Connection, path: str) -> int | None:
        row = conn.execute(_SQL_PATH_ID, (path,)).fetchone()
        return None if row is None else int(row[0])

    def path_id(self, path: str) -> int | None:
        """The `ValidPaths.id` of `path`, None if it is not valid."""
        conn = self._connection()
        return self._retry(lambda: self._path_id(conn, path))

    def is_valid(self, path: str) -> bool:
        conn = self._connection()
        try:  # the common case without the retry machinery (a closure and two calls)
            return conn.execute(_SQL_PATH_ID, (path,)).fetchone() is not None
        except sqlite3.OperationalError as e:
            if self._depth or not _busy(e):
                raise
        return self.path_id(path) is not None

    def valid_subset(self, paths: Iterable[str]) -> list[str]:
        """The valid ones among `paths`, sorted, without duplicates."""
        conn = self._connection()
        wanted = sorted(set(paths), key=os.fsencode)

        def run() -> list[str]:
            return [p for p in wanted if conn.execute(_SQL_PATH_ID, (p,)).fetchone() is not None]

        return self._retry(run)

    def path_info(self, path: str) -> ValidPathInfo | None:
        conn = self._connection()

        def run() -> ValidPathInfo | None:
            # One statement: the row and its references (NULL for a path without any).
            rows = conn.execute(_SQL_PATH_INFO_REFS, (path,)).fetchall()
            if not rows:
                return None
            nar_hash, reg_time, deriver, nar_size, _ = rows[0]
            refs = frozenset(r[4] for r in rows if r[4] is not None)
            return ValidPathInfo(
                path=path,
                nar_hash=nar_hash,
                nar_size=nar_size,
                references=refs,
                deriver=deriver,
                registration_time=reg_time,
            )

        return self._retry(run)

    def references(self, path: str) -> list[str]:
        """Sorted references of `path` (self-reference included); InvalidPathError if invalid."""
        conn = self._connection()

        def run() -> list[str]:
            pid = self._path_id(conn, path)
            if pid is None:
                raise InvalidPathError(path, backtick=True)
            return [r for (r,) in conn.execute(_SQL_REFERENCES, (pid,))]

        return self._retry(run)

    def referrers(self, path: str) -> list[str]:
        """Sorted valid paths referring to `path` (empty if `path` is not valid)."""
        conn = self._connection()
        return self._retry(lambda: [r for (r,) in conn.execute(_SQL_REFERRERS, (path,))])

    def valid_derivers(self, path: str) -> list[str]:
        """Sorted valid derivations that list `path` among their outputs."""
        conn = self._connection()
        return self._retry(lambda: [r for (r,) in conn.execute(_SQL_VALID_DERIVERS, (path,))])

    def derivation_outputs(self, drv_path: str) -> dict[str, str]:
        """Output name → output path of a valid derivation (InvalidPathError otherwise)."""
        conn = self._connection()

        def run() -> dict[str, str]:
            pid = self._path_id(conn, drv_path)
            if pid is None:
                raise InvalidPathError(drv_path)
            return {name: out for name, out in conn.execute(_SQL_DRV_OUTPUTS, (pid,))}

        return self._retry(run)

    def path_from_hash_part(self, prefix: str) -> str | None:
        """The valid path starting with `prefix` (`<store>/<32-char hash>`), or None."""
        conn = self._connection()

        def run() -> str | None:
            row = conn.execute(_SQL_FROM_HASH_PART, (prefix,)).fetchone()
            if row is None or row[0] is None or not row[0].startswith(prefix):
                return None
            return str(row[0])

        return self._retry(run)

    def all_valid_paths(self) -> list[str]:
        conn = self._connection()
        return self._retry(lambda: [p for (p,) in conn.execute(_SQL_ALL_VALID)])

    # --- registration ------------------------------------------------------------------------

    def register_valid_paths(self, infos: Sequence[ValidPathInfo]) -> None:
        """Make `infos` valid in one transaction (joining the caller's, if any).

        Known paths get their hash and NAR size updated; new ones are inserted (registration
        time "now" unless given).  Then the references are added: each must be valid or be in
        the batch (else `InvalidPathError`).  Finally a reference cycle among the batch raises
        `CycleError`.  Any error rolls everything back.
        """
        items = list(infos)
        if not items:
            return
        for info in items:
            if not _HASH_RE.fullmatch(info.nar_hash):
                raise ValueError(
                    f"invalid NAR hash `{info.nar_hash}' for `{info.path}' "
                    "(expected sha256:<base16>)"
                )
        if self.in_transaction:
            self._register(items)
        else:
            self._retry(lambda: self._register(items))

    def _register(self, items: list[ValidPathInfo]) -> None:
        now = int(time.time())
        with self.transaction() as conn:
            # Insert, in one statement that is a no-op for a path already there (then its row
            # gets the update); a row id is the cursor's `lastrowid`, no query needed.  Updates
            # come after the inserts: an update of a path that occurs twice in the batch must
            # follow its insert, which is what sequential processing would do.
            updates: list[tuple[int | None, str, str]] = []
            ids: dict[str, int] = {}
            for info in items:
                size = info.nar_size or None
                if info.path not in ids:
                    row = (
                        info.path,
                        info.nar_hash,
                        info.registration_time or now,
                        info.deriver or None,
                        size,
                    )
                    cur = conn.execute(_SQL_REGISTER_NEW, row)
                    if cur.rowcount == 1:
                        assert cur.lastrowid is not None
                        ids[info.path] = cur.lastrowid
                        continue
                updates.append((size, info.nar_hash, info.path))
            if updates:
                conn.executemany(_SQL_UPDATE, updates)

            for info in items:
                if info.path not in ids:
                    pid = self._path_id(conn, info.path)
                    assert pid is not None
                    ids[info.path] = pid
            batch_ids = dict(ids)
            refs: list[tuple[int, int]] = []
            for info in items:
                referrer = batch_ids[info.path]
                for ref in info.references:
                    rid = ids.get(ref)
                    if rid is None:
                        rid = self._path_id(conn, ref)
                        if rid is None:
                            raise InvalidPathError(ref)
                        ids[ref] = rid
                    refs.append((referrer, rid))
            if refs:
                conn.executemany(_SQL_ADD_REF, refs)
            if len(batch_ids) > 1:  # one path alone has no cycle (self-references are allowed)
                self._check_cycles(conn, batch_ids)

    def _check_cycles(self, conn: sqlite3.Connection, batch: dict[str, int]) -> None:
        """Depth-first search over references within `batch` (as upstream's topoSortPaths)."""
        by_id = {pid: path for path, pid in batch.items()}
        edges: dict[str, list[str]] = {}
        for path, pid in batch.items():
            targets = {
                by_id[r]
                for (r,) in conn.execute(_SQL_REFERENCE_IDS, (pid,))
                if r != pid and r in by_id
            }
            edges[path] = sorted(targets, key=os.fsencode)
        visited: set[str] = set()
        parents: set[str] = set()
        for start in sorted(batch, key=os.fsencode):
            if start in visited:
                continue
            visited.add(start)
            parents.add(start)
            stack: list[tuple[str, Iterator[str]]] = [(start, iter(edges[start]))]
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    parents.discard(node)
                    continue
                if nxt in parents:
                    raise CycleError(nxt)
                if nxt in visited:
                    continue
                visited.add(nxt)
                parents.add(nxt)
                stack.append((nxt, iter(edges[nxt])))

    def add_derivation_outputs(self, drv_path: str, outputs: Mapping[str, str]) -> None:
        """Record the outputs (name → path) of the valid derivation `drv_path`."""

        def run() -> None:
            with self.transaction() as conn:
                pid = self._path_id(conn, drv_path)
                if pid is None:
                    raise InvalidPathError(drv_path)
                conn.executemany(
                    _SQL_ADD_DRV_OUTPUT, [(pid, name, out) for name, out in outputs.items()]
                )

        self._run_write(run)

    def update_path_info(self, path: str, nar_hash: str, nar_size: int | None) -> None:
        """Set the hash and NAR size (None/0 → NULL) of a valid path."""
        if not _HASH_RE.fullmatch(nar_hash):
            raise ValueError(f"invalid NAR hash `{nar_hash}'")
        conn = self._connection()
        self._run_write(lambda: conn.execute(_SQL_UPDATE, (nar_size or None, nar_hash, path)))

    def invalidate_path(self, path: str) -> None:
        """Delete the row of `path` (its references, outputs go with it by cascade).

        The caller must make sure no other path refers to it; otherwise the foreign key's
        "restrict" rule makes this fail with `StoreDatabaseError`.
        """
        conn = self._connection()
        try:
            self._run_write(lambda: conn.execute(_SQL_INVALIDATE, (path,)))
        except sqlite3.IntegrityError as e:
            raise StoreDatabaseError(f"executing SQLite statement: {e}") from e

    def _run_write(self, fn: Callable[[], object]) -> None:
        if self.in_transaction:
            fn()
        else:
            self._retry(fn)

    # --- failed paths ------------------------------------------------------------------------

    def failed_paths(self) -> list[str]:
        conn = self._connection()
        return self._retry(lambda: [p for (p,) in conn.execute(_SQL_FAILED)])

    def has_path_failed(self, path: str) -> bool:
        conn = self._connection()
        return self._retry(lambda: conn.execute(_SQL_HAS_FAILED, (path,)).fetchone() is not None)

    def add_failed_path(self, path: str) -> None:
        conn = self._connection()
        self._run_write(lambda: conn.execute(_SQL_ADD_FAILED, (path, int(time.time()))))

    def clear_failed_paths(self, paths: Iterable[str]) -> None:
        """For each string: `*` clears everything; a path clears itself and, for a valid
        derivation, its outputs."""
        items = [(p,) for p in paths]

        def run() -> None:
            with self.transaction() as conn:
                conn.executemany(_SQL_CLEAR_FAILED, items)

        self._run_write(run)
