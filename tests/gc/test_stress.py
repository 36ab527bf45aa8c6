"""8 clients add and root items while the collector loops; nothing live may ever be lost."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

from guixsvc.protocol.client import DaemonClient
from guixsvc.protocol.ops import GCAction
from guixsvc.store import nar
from guixsvc.store.db import StoreDatabase
from tests.conftest import Daemon

CLIENTS = 8
DURATION = 12.0  # seconds of concurrent activity
MAX_ITEMS = 150  # per client


def _complete(client: DaemonClient, path: str) -> bool:
    """Valid, present, and its on-disk NAR hash equals the registered one."""
    if not client.is_valid_path(path) or not os.path.lexists(path):
        return False
    info = client.query_path_info(path)
    digest = hashlib.sha256(b"".join(nar.dump(path))).hexdigest()
    return digest == info.nar_hash


def test_concurrent_adds_and_collections(daemon: Daemon, tmp_path: Path) -> None:
    deadline = time.monotonic() + DURATION
    errors: list[BaseException] = []
    sessions: list[tuple[DaemonClient, list[str], list[str]]] = []
    gc_runs = 0
    stop = threading.Event()

    def worker(n: int) -> None:
        rng = random.Random(n)
        client = daemon.client()
        added: list[str] = []  # temp roots of this (still open) session
        rooted: list[str] = []  # items with a permanent or indirect root
        sessions.append((client, added, rooted))
        links = tmp_path / f"links{n}"
        links.mkdir()
        try:
            while time.monotonic() < deadline and len(added) < MAX_ITEMS and not stop.is_set():
                refs = rng.sample(added, min(len(added), rng.randrange(3)))
                if rng.random() < 0.3:
                    tree = tmp_path / f"tree{n}-{len(added)}"
                    (tree / "sub").mkdir(parents=True)
                    (tree / "sub" / "data").write_bytes(os.urandom(rng.randrange(1, 20000)))
                    path = client.add_to_store(f"tree{n}", str(tree))
                else:
                    text = f"{n}-{len(added)}-{rng.random()}"
                    path = client.add_text_to_store(f"text{n}", text, refs)
                added.append(path)
                roll = rng.random()
                if roll < 0.2:
                    # An indirect root, as `guix build -r` makes.
                    link = links / f"result-{len(added)}"
                    os.symlink(path, link)
                    client.add_indirect_root(str(link))
                    rooted.append(path)
                elif roll < 0.3:
                    # A permanent root, as `add-permanent-root` makes.
                    os.symlink(path, f"{daemon.state_dir}/gcroots/{os.path.basename(path)}")
                    rooted.append(path)
        except BaseException as e:
            errors.append(e)
            stop.set()

    def collector() -> None:
        nonlocal gc_runs
        try:
            with daemon.client() as client:
                while time.monotonic() < deadline and not stop.is_set():
                    client.collect_garbage(GCAction.DELETE_DEAD)
                    gc_runs += 1
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=collector))
    for t in threads:
        t.start()
    for t in threads:
        t.join(DURATION + 60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert gc_runs >= 2

    # One more collection while every session is still open.
    with daemon.client() as gc_client:
        gc_client.collect_garbage(GCAction.DELETE_DEAD)
        for client, added, rooted in sessions:
            for path in added:
                assert _complete(gc_client, path), f"temp-rooted {path} was lost"
            del client, rooted

    # Close the sessions: only permanent and indirect roots (and their closures) remain.
    rooted_all = {p for _, _, rooted in sessions for p in rooted}
    for client, _, _ in sessions:
        client.close()
    time.sleep(0.5)  # let the workers exit and unlink their temp-roots files
    with daemon.client() as gc_client:
        gc_client.collect_garbage(GCAction.DELETE_DEAD)
        closure: set[str] = set()
        stack = list(rooted_all)
        while stack:
            p = stack.pop()
            if p not in closure:
                closure.add(p)
                stack.extend(gc_client.query_references(p))
        for path in closure:
            assert _complete(gc_client, path), f"rooted {path} was lost"
        valid = set(gc_client.query_all_valid_paths())
    assert valid == closure

    # The database matches the directory.
    entries = {f"{daemon.store_dir}/{n}" for n in os.listdir(daemon.store_dir)}
    assert entries - {f"{daemon.store_dir}/.links"} == valid
    db = StoreDatabase.open(os.path.dirname(daemon.db_path), fsync=False)
    try:
        assert set(db.all_valid_paths()) == valid
    finally:
        db.close()
