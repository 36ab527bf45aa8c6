"""The host-state guard sees what a leaking test would leave on the host (on a private tree)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from tests import hostguard


def _roots(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "gnu" / "store"), str(tmp_path / "var" / "guix")]


def test_unchanged_tree_has_no_differences(tmp_path: Path) -> None:
    store, state = _roots(tmp_path)
    os.makedirs(os.path.join(store, "abc-hello", "bin"))
    os.makedirs(os.path.join(state, "db"))
    assert (
        hostguard.differences(
            hostguard.snapshot([store, state]), hostguard.snapshot([store, state])
        )
        == []
    )


def test_new_store_item_new_root_and_db_rows_are_seen(tmp_path: Path) -> None:
    store, state = _roots(tmp_path)
    paths = [store, state]
    before = hostguard.snapshot(paths)  # neither exists yet
    os.makedirs(os.path.join(state, "db"))
    os.makedirs(store)
    after_create = hostguard.snapshot(paths)
    assert any(store in line for line in hostguard.differences(before, after_create))

    db = os.path.join(state, "db", "db.sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY, path TEXT)")
    base = hostguard.snapshot(paths)
    (Path(store) / "0000-activated").write_text("leak")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO ValidPaths (path) VALUES ('x')")
    os.makedirs(os.path.join(state, "gcroots", "auto"))
    changed = "\n".join(hostguard.differences(base, hostguard.snapshot(paths)))
    assert "added f 0000-activated" in changed
    assert "ValidPaths: was 0, now 1" in changed
    assert "added d gcroots/auto" in changed


def test_store_variables_point_away_from_the_host() -> None:
    """conftest points inherited store variables at a throw-away root for the whole session."""
    for name in ("NIX_STORE_DIR", "GUIX_STATE_DIRECTORY", "GUIX_LOG_DIRECTORY"):
        value = os.environ[name]
        assert "guixsvc-tests-decoy-" in value, (name, value)
        assert not any(value.startswith(p) for p in hostguard.HOST_PATHS)
    assert "GUIX_DAEMON_SOCKET" not in os.environ


def test_snapshot_leaves_a_wal_database_alone(tmp_path: Path) -> None:
    """Reading the row count must not create db.sqlite-wal/-shm (the guard's own footprint)."""
    state = tmp_path / "var" / "guix"
    (state / "db").mkdir(parents=True)
    db = state / "db" / "db.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY, path TEXT)")
    conn.execute("INSERT INTO ValidPaths (path) VALUES ('x')")
    conn.commit()
    conn.close()  # the last connection checkpoints and removes -wal and -shm
    assert sorted(p.name for p in (state / "db").iterdir()) == ["db.sqlite"]
    snap = hostguard.snapshot([str(state)])
    assert snap[f"{db} ValidPaths"] == 1
    assert sorted(p.name for p in (state / "db").iterdir()) == ["db.sqlite"]
