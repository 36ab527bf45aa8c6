"""Tests for guixsvc.store.db against upstream's schema facts (store.md §10) with real SQLite.

The schema is checked by introspection (PRAGMA table_info / foreign_key_list / index_list and
sqlite_master) against the facts of upstream's `guix/store/schema.sql`, and its constraints by
behaviour (cascade, restrict, the self-reference trigger, autoincrement).  Locks are checked from
forked processes with raw fcntl calls.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guixsvc.store.db import (
    SCHEMA,
    SCHEMA_VERSION,
    CycleError,
    InvalidPathError,
    StoreDatabase,
    StoreDatabaseError,
    ValidPathInfo,
    ensure_reserved,
)
from tests.store.forked import Child

STORE = "/gnu/store"


def sp(i: int, name: str = "pkg") -> str:
    h = hashlib.sha1(str(i).encode()).hexdigest()[:32].translate(str.maketrans("eotu", "0123"))
    return f"{STORE}/{h}-{name}"


def nar_hash(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def info(i: int, refs: tuple[int, ...] = (), **kw: object) -> ValidPathInfo:
    return ValidPathInfo(
        path=sp(i),
        nar_hash=nar_hash(i),
        nar_size=kw.pop("nar_size", 1000 + i),  # type: ignore[arg-type]
        references=frozenset(sp(r) for r in refs),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def db_dir(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
def db(db_dir: str) -> Iterator[StoreDatabase]:
    d = StoreDatabase.open(db_dir)
    yield d
    d.close()


def _raw(db_dir: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{db_dir}/db.sqlite", isolation_level=None)
    conn.execute("pragma foreign_keys = 1")
    return conn


# --- schema ---------------------------------------------------------------------------------


def test_schema_objects_match_upstream(db: StoreDatabase, db_dir: str) -> None:
    conn = _raw(db_dir)
    objects = {
        (t, n, tbl) for t, n, tbl in conn.execute("select type, name, tbl_name from sqlite_master")
    }
    assert objects == {
        ("table", "ValidPaths", "ValidPaths"),
        ("table", "sqlite_sequence", "sqlite_sequence"),  # from `autoincrement'
        ("index", "sqlite_autoindex_ValidPaths_1", "ValidPaths"),  # path unique
        ("table", "Refs", "Refs"),
        ("index", "sqlite_autoindex_Refs_1", "Refs"),  # primary key (referrer, reference)
        ("index", "IndexReferrer", "Refs"),
        ("index", "IndexReference", "Refs"),
        ("trigger", "DeleteSelfRefs", "ValidPaths"),
        ("table", "DerivationOutputs", "DerivationOutputs"),
        ("index", "sqlite_autoindex_DerivationOutputs_1", "DerivationOutputs"),
        ("index", "IndexDerivationOutputs", "DerivationOutputs"),
        ("table", "FailedPaths", "FailedPaths"),
        ("index", "sqlite_autoindex_FailedPaths_1", "FailedPaths"),
    }


# (name, type, notnull, pk) of every column, in order: upstream schema.sql.
EXPECTED_COLUMNS = {
    "ValidPaths": [
        ("id", "integer", 1, 1),
        ("path", "text", 1, 0),
        ("hash", "text", 1, 0),
        ("registrationTime", "integer", 1, 0),
        ("deriver", "text", 0, 0),
        ("narSize", "integer", 0, 0),
    ],
    "Refs": [("referrer", "integer", 1, 1), ("reference", "integer", 1, 2)],
    "DerivationOutputs": [("drv", "integer", 1, 1), ("id", "text", 1, 2), ("path", "text", 1, 0)],
    "FailedPaths": [("path", "text", 1, 1), ("time", "integer", 1, 0)],
}


@pytest.mark.parametrize("table", sorted(EXPECTED_COLUMNS))
def test_columns(db: StoreDatabase, db_dir: str, table: str) -> None:
    conn = _raw(db_dir)
    cols = [
        (name, typ.lower(), notnull, pk, dflt)
        for _, name, typ, notnull, dflt, pk in conn.execute(f"pragma table_info({table})")
    ]
    assert [c[:4] for c in cols] == EXPECTED_COLUMNS[table]
    assert all(c[4] is None for c in cols)  # no defaults anywhere


def test_foreign_keys_and_indexes(db: StoreDatabase, db_dir: str) -> None:
    conn = _raw(db_dir)

    def fks(table: str) -> set[tuple[str, str, str, str, str]]:
        return {
            (row[2], row[3], row[4], row[5], row[6])
            for row in conn.execute(f"pragma foreign_key_list({table})")
        }

    assert fks("Refs") == {
        ("ValidPaths", "referrer", "id", "NO ACTION", "CASCADE"),
        ("ValidPaths", "reference", "id", "NO ACTION", "RESTRICT"),
    }
    assert fks("DerivationOutputs") == {("ValidPaths", "drv", "id", "NO ACTION", "CASCADE")}
    assert fks("ValidPaths") == set() and fks("FailedPaths") == set()

    def indexes(table: str) -> dict[str, tuple[int, str, list[str]]]:
        out = {}
        for _, name, unique, origin, partial in conn.execute(f"pragma index_list({table})"):
            assert partial == 0
            cols = [r[2] for r in conn.execute(f"pragma index_info({name})")]
            out[name] = (unique, origin, cols)
        return out

    assert indexes("ValidPaths") == {"sqlite_autoindex_ValidPaths_1": (1, "u", ["path"])}
    assert indexes("Refs") == {
        "sqlite_autoindex_Refs_1": (1, "pk", ["referrer", "reference"]),
        "IndexReferrer": (0, "c", ["referrer"]),
        "IndexReference": (0, "c", ["reference"]),
    }
    assert indexes("DerivationOutputs") == {
        "sqlite_autoindex_DerivationOutputs_1": (1, "pk", ["drv", "id"]),
        "IndexDerivationOutputs": (0, "c", ["path"]),
    }
    assert indexes("FailedPaths") == {"sqlite_autoindex_FailedPaths_1": (1, "pk", ["path"])}
    (trigger_sql,) = conn.execute(
        "select sql from sqlite_master where type = 'trigger' and name = 'DeleteSelfRefs'"
    ).fetchone()
    assert "before delete on validpaths" in " ".join(trigger_sql.lower().split())


def test_constraint_behaviour(db: StoreDatabase, db_dir: str) -> None:
    conn = _raw(db_dir)
    ins = "insert into ValidPaths (path, hash, registrationTime) values (?, 'h', 1)"
    a = conn.execute(ins, ("a",)).lastrowid
    b = conn.execute(ins, ("b",)).lastrowid
    c = conn.execute(ins, ("c",)).lastrowid
    conn.execute("insert into Refs values (?, ?)", (a, b))
    conn.execute("insert into Refs values (?, ?)", (a, a))  # self-reference
    conn.execute("insert into DerivationOutputs values (?, 'out', 'x')", (a,))
    # restrict: b is referenced by a
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("delete from ValidPaths where id = ?", (b,))
    # a refers to itself: the trigger removes that row first, cascade removes the rest
    conn.execute("delete from ValidPaths where id = ?", (a,))
    assert conn.execute("select count(*) from Refs").fetchone() == (0,)
    assert conn.execute("select count(*) from DerivationOutputs").fetchone() == (0,)
    conn.execute("delete from ValidPaths where id = ?", (b,))
    # autoincrement: ids are never reused
    conn.execute("delete from ValidPaths where id = ?", (c,))
    d = conn.execute(ins, ("d",)).lastrowid
    assert d == c + 1
    # unique / not null / foreign key on insert
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(ins, ("d",))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("insert into ValidPaths (path, registrationTime) values ('e', 1)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("insert into Refs values (?, 999)", (d,))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("insert into FailedPaths (path) values ('x')")


def test_schema_script_is_idempotent(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.sqlite")
    conn.executescript(SCHEMA)
    conn.executescript(SCHEMA)
    assert conn.execute("select count(*) from sqlite_master").fetchone() == (13,)


# --- opening --------------------------------------------------------------------------------


def test_open_creates_store_files_and_sets_pragmas(db: StoreDatabase, db_dir: str) -> None:
    assert Path(db_dir, "schema").read_bytes() == b"7"
    assert SCHEMA_VERSION == 7
    assert Path(db_dir, "big-lock").exists()
    assert stat.S_IMODE(os.stat(f"{db_dir}/big-lock").st_mode) == 0o600
    assert db._conn is None  # nothing SQLite is open until first use (safe to fork)
    conn = db._connection()
    assert conn.execute("pragma journal_mode").fetchone() == ("wal",)
    assert conn.execute("pragma wal_autocheckpoint").fetchone() == (40000,)
    assert conn.execute("pragma foreign_keys").fetchone() == (1,)
    assert conn.execute("pragma synchronous").fetchone() == (1,)  # normal
    assert conn.execute("pragma busy_timeout").fetchone() == (3_600_000,)


def test_open_without_wal_and_fsync(db_dir: str) -> None:
    d = StoreDatabase.open(db_dir, wal=False, fsync=False)
    conn = d._connection()
    assert conn.execute("pragma journal_mode").fetchone() == ("truncate",)
    assert conn.execute("pragma synchronous").fetchone() == (0,)
    d.close()
    # Re-opening with WAL switches the (persistent) journal mode back.
    d = StoreDatabase.open(db_dir)
    assert d._connection().execute("pragma journal_mode").fetchone() == ("wal",)
    d.close()


def test_big_lock_held_shared(db: StoreDatabase, db_dir: str) -> None:
    path = f"{db_dir}/big-lock"

    def probe(c: Child) -> None:
        fd = os.open(path, os.O_RDWR)
        results = []
        for op in (fcntl.LOCK_SH, fcntl.LOCK_EX):
            try:
                fcntl.lockf(fd, op | fcntl.LOCK_NB)
                results.append("1")
            except OSError:
                results.append("0")
        c.send(" ".join(results))

    child = Child(probe)
    assert child.recv() == "1 0"
    assert child.join() == 0
    db.close()
    child = Child(probe)
    assert child.recv() == "1 1"
    assert child.join() == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("8", "current store schema is version 8, but I only support 7"),
        ("6", "Your store database uses an implausibly old schema, version 6."),
        ("7\n", "`{db}/schema' is corrupt"),
        ("seven", "`{db}/schema' is corrupt"),
    ],
)
def test_schema_version_errors(db_dir: str, content: str, message: str) -> None:
    os.makedirs(db_dir)
    Path(db_dir, "schema").write_text(content)
    with pytest.raises(StoreDatabaseError) as info:
        StoreDatabase.open(db_dir)
    assert str(info.value) == message.format(db=db_dir)


def test_existing_schema_without_database(db_dir: str) -> None:
    os.makedirs(db_dir)
    Path(db_dir, "schema").write_text("7")
    with pytest.raises(StoreDatabaseError, match=r"cannot open store database `.*/db\.sqlite'"):
        StoreDatabase.open(db_dir)


def test_reopen_keeps_data(db_dir: str) -> None:
    with StoreDatabase.open(db_dir) as d:
        d.register_valid_paths([info(1)])
    with StoreDatabase.open(db_dir) as d:
        assert d.is_valid(sp(1))


# --- registration and queries ---------------------------------------------------------------


def test_register_and_query(db: StoreDatabase) -> None:
    before = int(time.time())
    db.register_valid_paths(
        [
            info(1),
            info(2, (1, 2), deriver=sp(9, "x.drv")),
            info(3, (1, 2), nar_size=0, registration_time=12345),
        ]
    )
    after = int(time.time())
    pi = db.path_info(sp(2))
    assert pi is not None
    assert pi.nar_hash == nar_hash(2) and pi.nar_size == 1002 and pi.deriver == sp(9, "x.drv")
    assert pi.references == frozenset({sp(1), sp(2)})
    assert before <= (pi.registration_time or 0) <= after
    p3 = db.path_info(sp(3))
    assert p3 is not None and p3.nar_size is None and p3.registration_time == 12345
    assert p3.deriver is None
    assert db.path_info(sp(4)) is None
    assert db.references(sp(3)) == sorted([sp(1), sp(2)])
    assert db.referrers(sp(1)) == sorted([sp(2), sp(3)])
    assert db.referrers(sp(2)) == sorted([sp(2), sp(3)])
    assert db.referrers(sp(77)) == []
    assert db.is_valid(sp(1)) and not db.is_valid(sp(4))
    assert db.valid_subset([sp(4), sp(3), sp(1), sp(3)]) == sorted([sp(1), sp(3)])
    assert db.all_valid_paths() == sorted([sp(1), sp(2), sp(3)])
    with pytest.raises(InvalidPathError) as e:
        db.references(sp(4))
    assert str(e.value) == f"path `{sp(4)}' is not valid"

    # Stored the way upstream stores it.
    raw = _raw(db.db_dir).execute(
        "select hash, narSize, deriver from ValidPaths where path = ?", (sp(3),)
    )
    assert raw.fetchone() == (nar_hash(3), None, None)

    # Re-registering updates hash and size only, and adds references.
    db.register_valid_paths([info(2, (3,), nar_size=5, deriver=None)])
    pi = db.path_info(sp(2))
    assert pi is not None and pi.nar_size == 5 and pi.deriver == sp(9, "x.drv")
    assert pi.references == frozenset({sp(1), sp(2), sp(3)})


def test_register_unknown_reference_rolls_back(db: StoreDatabase) -> None:
    db.register_valid_paths([info(1)])
    with pytest.raises(InvalidPathError) as e:
        db.register_valid_paths([info(2, (1,)), info(3, (1, 4))])
    assert str(e.value) == f"path ‘{sp(4)}’ is not valid"
    assert db.all_valid_paths() == [sp(1)]
    assert db.referrers(sp(1)) == []


def test_register_batch_may_refer_forward(db: StoreDatabase) -> None:
    db.register_valid_paths([info(1, (2,)), info(2)])
    assert db.references(sp(1)) == [sp(2)]


def test_register_cycle_rolls_back(db: StoreDatabase) -> None:
    with pytest.raises(CycleError) as e:
        db.register_valid_paths([info(1, (2,)), info(2, (3,)), info(3, (1,)), info(4)])
    assert str(e.value).startswith("cycle detected in the references of `")
    assert db.all_valid_paths() == []
    # Self-references are not cycles.
    db.register_valid_paths([info(1, (1,))])


def test_register_cycle_through_existing_references(db: StoreDatabase) -> None:
    db.register_valid_paths([info(1), info(2, (1,))])
    # Updating 1 to refer to 2 closes a cycle among the batch {1, 2}.
    with pytest.raises(CycleError):
        db.register_valid_paths([info(1, (2,)), info(2)])
    assert db.references(sp(1)) == []


def test_register_rejects_bad_hash(db: StoreDatabase) -> None:
    bad = ValidPathInfo(sp(1), "sha256:ABC", 1, frozenset())
    with pytest.raises(ValueError):
        db.register_valid_paths([bad])


def test_transaction_all_or_nothing(db: StoreDatabase) -> None:
    drv = ValidPathInfo(sp(5, "p.drv"), nar_hash(5), 10, frozenset())

    class Boom(Exception):
        pass

    with pytest.raises(Boom), db.transaction():
        db.register_valid_paths([drv])
        db.add_derivation_outputs(drv.path, {"out": sp(6), "lib": sp(7)})
        assert db.derivation_outputs(drv.path) == {"lib": sp(7), "out": sp(6)}
        raise Boom
    assert not db.is_valid(drv.path)
    assert db.valid_derivers(sp(6)) == []

    with db.transaction():
        db.register_valid_paths([drv])
        # A failing inner call is undone alone; the caller decides about the rest.
        with pytest.raises(InvalidPathError):
            db.register_valid_paths([info(8, (99,))])
        db.add_derivation_outputs(drv.path, {"out": sp(6)})
    assert db.is_valid(drv.path) and not db.is_valid(sp(8))
    assert db.derivation_outputs(drv.path) == {"out": sp(6)}
    assert db.valid_derivers(sp(6)) == [drv.path]
    with pytest.raises(InvalidPathError) as e:
        db.derivation_outputs(sp(42, "q.drv"))
    assert str(e.value) == f"path ‘{sp(42, 'q.drv')}’ is not valid"
    with pytest.raises(InvalidPathError):
        db.add_derivation_outputs(sp(42, "q.drv"), {"out": sp(6)})


def test_invalidate(db: StoreDatabase) -> None:
    drv = ValidPathInfo(sp(5, "p.drv"), nar_hash(5), 10, frozenset())
    db.register_valid_paths([info(1, (1,)), info(2, (1, 2)), drv])
    db.add_derivation_outputs(drv.path, {"out": sp(2)})
    with pytest.raises(StoreDatabaseError, match="FOREIGN KEY constraint failed"):
        db.invalidate_path(sp(1))
    db.invalidate_path(sp(2))
    db.invalidate_path(sp(1))
    db.invalidate_path(drv.path)
    assert db.all_valid_paths() == []
    conn = _raw(db.db_dir)
    assert conn.execute("select count(*) from Refs").fetchone() == (0,)
    assert conn.execute("select count(*) from DerivationOutputs").fetchone() == (0,)


def test_update_path_info(db: StoreDatabase) -> None:
    db.register_valid_paths([info(1)])
    db.update_path_info(sp(1), nar_hash(100), 0)
    pi = db.path_info(sp(1))
    assert pi is not None and pi.nar_hash == nar_hash(100) and pi.nar_size is None


def test_path_from_hash_part(db: StoreDatabase) -> None:
    db.register_valid_paths([info(1), info(2)])
    h1 = sp(1)[len(STORE) + 1 :][:32]
    assert db.path_from_hash_part(f"{STORE}/{h1}") == sp(1)
    assert db.path_from_hash_part(f"{STORE}/{'z' * 32}") is None
    assert db.path_from_hash_part(f"{STORE}/{'0' * 32}") is None


def test_failed_paths(db: StoreDatabase) -> None:
    drv = ValidPathInfo(sp(5, "p.drv"), nar_hash(5), 10, frozenset())
    db.register_valid_paths([drv])
    db.add_derivation_outputs(drv.path, {"out": sp(6), "doc": sp(7)})
    for p in (sp(6), sp(7), sp(8), sp(9)):
        db.add_failed_path(p)
    db.add_failed_path(sp(9))  # insert or ignore
    assert db.failed_paths() == sorted([sp(6), sp(7), sp(8), sp(9)])
    assert db.has_path_failed(sp(8)) and not db.has_path_failed(sp(1))
    db.clear_failed_paths([drv.path, sp(8)])
    assert db.failed_paths() == [sp(9)]
    db.add_failed_path(sp(1))
    db.clear_failed_paths(["*"])
    assert db.failed_paths() == []


# --- processes ------------------------------------------------------------------------------


def test_forked_children_get_their_own_connection(db: StoreDatabase, db_dir: str) -> None:
    db.register_valid_paths([info(1)])
    parent_conn = db._connection()

    def child_side(c: Child) -> None:
        db.register_valid_paths([info(2, (1,))])
        assert db._connection() is not parent_conn
        # The child holds its own shared big-lock.
        fd = os.open(f"{db_dir}/big-lock", os.O_RDWR)
        c.send(str(db._big_lock is not None))
        c.send(" ".join(db.all_valid_paths()))
        os.close(fd)

    child = Child(child_side)
    assert child.recv() == "True"
    assert child.recv() == " ".join(sorted([sp(1), sp(2)]))
    assert child.join() == 0
    # The parent's connection survived the child's exit (WAL intact).
    assert db._connection() is parent_conn
    assert db.references(sp(2)) == [sp(1)]
    db.register_valid_paths([info(3)])
    assert len(db.all_valid_paths()) == 3


def test_concurrent_writers(db: StoreDatabase, db_dir: str) -> None:
    db.close()
    n = 150

    def writer(offset: int) -> Callable[[Child], None]:
        def run(c: Child) -> None:
            d = StoreDatabase.open(db_dir)
            c.wait_for()
            for i in range(n):
                k = offset + i
                d.register_valid_paths([info(k, (k - 1,) if i else ())])
            d.close()
            c.send("done")

        return run

    children = [Child(writer(0)), Child(writer(10_000))]
    for c in children:
        c.tell("go")
    for c in children:
        assert c.recv() == "done"
        assert c.join() == 0
    with StoreDatabase.open(db_dir) as d:
        assert len(d.all_valid_paths()) == 2 * n
        assert d.references(sp(10_000 + n - 1)) == [sp(10_000 + n - 2)]


def test_bulk_registration(db: StoreDatabase) -> None:
    """5000 paths with references in one call (speed is measured in bench/, not here)."""
    n = 5000
    infos = [info(i, tuple(range(max(0, i - 3), i))) for i in range(n)]
    db.register_valid_paths(infos)
    assert len(db.all_valid_paths()) == n
    assert db.referrers(sp(0)) == sorted([sp(1), sp(2), sp(3)])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sets(st.integers(0, 19), max_size=4), min_size=1, max_size=20))
def test_random_dags(tmp_path_factory: pytest.TempPathFactory, refs: list[set[int]]) -> None:
    # Only references to lower numbers (plus self): a DAG.
    graph = {i: {r for r in rs if r <= i} for i, rs in enumerate(refs)}
    d = StoreDatabase.open(str(tmp_path_factory.mktemp("db")))
    try:
        d.register_valid_paths([info(i, tuple(rs)) for i, rs in reversed(list(graph.items()))])
        for i, rs in graph.items():
            assert d.references(sp(i)) == sorted(sp(r) for r in rs)
            expected_referrers = sorted(sp(j) for j, js in graph.items() if i in js)
            assert d.referrers(sp(i)) == expected_referrers
    finally:
        d.close()


# --- reserved space -------------------------------------------------------------------------


def test_ensure_reserved(tmp_path: Path) -> None:
    path = tmp_path / "reserved"
    ensure_reserved(str(tmp_path), True)
    st_ = path.stat()
    assert st_.st_size == 8 * 1024 * 1024 and stat.S_IMODE(st_.st_mode) == 0o600
    path.write_bytes(b"short")
    ensure_reserved(str(tmp_path), True, size=65536)
    assert path.stat().st_size == 65536
    ensure_reserved(str(tmp_path), False)
    assert not path.exists()
    ensure_reserved(str(tmp_path), False)  # nothing to delete: fine
    ensure_reserved(str(tmp_path / "missing"), True)  # errors are ignored
