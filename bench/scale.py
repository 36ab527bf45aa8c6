"""Scale benchmark: is the per-request cost of our daemon flat from 1k to 1M valid paths, and how
long do `guixsvc gc --list-dead` and a collection of the dead items take at each size?

    python bench/scale.py [--sizes 1000,100000,1000000] [--dead 100000] [--seconds 1.5]

For each size N the store (under /dev/shm, `--dir`) gets N live paths, registered directly in
SQLite in one transaction (not through N RPCs) with an empty file each: item i refers to items
2i+1 and 2i+2, so the one GC root (item 0) keeps all of them alive through a closure of depth
log2(N).  Our daemon is started on it and one client measures valid-path?, query-path-info and
query-referrers on random paths and add-text-to-store with distinct texts (µs per request,
wall clock, median of `--rounds`).  Then `--dead` unreachable paths (each referring to a random
live one) are registered, and `guixsvc gc --list-dead` and `guixsvc gc` (deleting them) are
timed through the daemon.  The ratio column divides each cost by the cost at the smallest size.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guixsvc.protocol.client import DaemonClient  # noqa: E402
from guixsvc.store import base32  # noqa: E402
from guixsvc.store.db import StoreDatabase  # noqa: E402
from tests.conftest import start_daemon, stop_daemon  # noqa: E402

HASH = "sha256:" + "00" * 32


def item_name(i: int, kind: str) -> str:
    digest = hashlib.sha1(f"{kind}{i}".encode()).digest()
    return f"{base32.encode(digest)}-{kind}-{i}"


def register(root: Path, names: list[str], refs: Callable[[int], list[tuple[int, int]]]) -> None:
    """Insert `names` as ValidPaths with consecutive ids and `refs(first id)` in one
    transaction, creating an empty file per path."""
    store = root / "store"
    for name in names:
        os.close(os.open(store / name, os.O_CREAT | os.O_WRONLY, 0o444))
    conn = sqlite3.connect(root / "state" / "db" / "db.sqlite")
    try:
        conn.execute("pragma synchronous = off")
        now = int(time.time())
        with conn:
            start_id = (conn.execute("select max(id) from ValidPaths").fetchone()[0] or 0) + 1
            conn.executemany(
                "insert into ValidPaths (id, path, hash, registrationTime, narSize)"
                " values (?, ?, ?, ?, ?)",
                ((start_id + k, f"{store}/{n}", HASH, now, 112) for k, n in enumerate(names)),
            )
            conn.executemany("insert into Refs (referrer, reference) values (?, ?)", refs(start_id))
    finally:
        conn.close()


def build(root: Path, n: int) -> list[str]:
    for d in ("store/.links", "state/gcroots", "state/profiles", "state/temproots", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    StoreDatabase.open(str(root / "state" / "db"), fsync=False).close()
    names = [item_name(i, "live") for i in range(n)]
    register(
        root,
        names,
        lambda first: [
            (first + i, first + c) for i in range(n) for c in (2 * i + 1, 2 * i + 2) if c < n
        ],
    )
    os.symlink(root / "store" / names[0], root / "state" / "gcroots" / "top")
    return [f"{root}/store/{name}" for name in names]


def add_dead(root: Path, n_live: int, dead: int, rng: random.Random) -> None:
    names = [item_name(i, "dead") for i in range(dead)]
    # The live items have ids 1..n_live (registered first, in a fresh database).
    register(
        root, names, lambda first: [(first + k, rng.randrange(n_live) + 1) for k in range(dead)]
    )


def per_request(fn: Callable[[int], object], seconds: float) -> float:
    """µs per call of fn(i), i = 0, 1, ... for `seconds`."""
    i = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn(i)
            i += 1
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / i * 1e6


def gc_cli(daemon_env: dict[str, str], sock: str, *args: str) -> tuple[float, int]:
    env = dict(daemon_env, GUIX_DAEMON_SOCKET=sock, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "gc", *args],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - start, len(proc.stdout.splitlines())


def measure(base: Path, n: int, dead: int, seconds: float, rounds: int) -> dict[str, float]:
    root = base / f"s{n}"
    rng = random.Random(n)
    t0 = time.perf_counter()
    paths = build(root, n)
    out = {"build s": time.perf_counter() - t0}
    daemon = start_daemon(root)
    try:
        with DaemonClient(daemon.socket) as c:
            pick = [paths[rng.randrange(n)] for _ in range(4096)]
            salt = os.urandom(4).hex()
            ops: dict[str, Callable[[int], object]] = {
                "valid-path? µs": lambda i: c.is_valid_path(pick[i & 4095]),
                "query-path-info µs": lambda i: c.query_path_info(pick[i & 4095]),
                "query-referrers µs": lambda i: c.query_referrers(pick[i & 4095]),
                "add-text µs": lambda i: c.add_text_to_store(f"t{i}", f"{salt}{i}", []),
            }
            for name, fn in ops.items():
                salt = os.urandom(4).hex()
                out[name] = statistics.median(per_request(fn, seconds) for _ in range(rounds))
        t0 = time.perf_counter()
        add_dead(root, n, dead, rng)
        out["add dead s"] = time.perf_counter() - t0
        out["list-dead s"], listed = gc_cli(daemon.env, daemon.socket, "--list-dead")
        out["gc s"], _ = gc_cli(daemon.env, daemon.socket, "-C")
        left = sum(1 for name in os.listdir(root / "store") if "-dead-" in name)
        print(f"  N={n}: --list-dead printed {listed} lines; {left} dead items left after gc",
              flush=True)  # fmt: skip
    finally:
        stop_daemon(daemon)
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--dead", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.dir))
    results: dict[int, dict[str, float]] = {}
    try:
        for n in sizes:
            results[n] = measure(base, n, args.dead, args.seconds, args.rounds)
            print(f"  N={n}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[n].items()),
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    first = results[sizes[0]]
    head = f"| {'valid paths':<20}|" + "|".join(f"{n:>12,} " for n in sizes)
    head += "|" + "|".join(f" {n:,}/{sizes[0]:,}".rjust(16) + " " for n in sizes[1:]) + "|"
    print(head)
    print("|" + "-" * 21 + "|" + "|".join("-" * 13 for _ in sizes) + "|"
          + "|".join("-" * 17 for _ in sizes[1:]) + "|")  # fmt: skip
    for key in first:
        line = f"| {key:<20}|" + "|".join(f"{results[n][key]:>12,.1f} " for n in sizes)
        line += "|" + "|".join(f"{results[n][key] / first[key]:>16.2f} " for n in sizes[1:])
        print(line + "|")
    print(f"({args.dead:,} dead items added after the request timings, then listed and deleted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
