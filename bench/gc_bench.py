"""Garbage-collector benchmark: deleting 10,000 dead paths, and `--list-dead` on 100,000 paths.

The stores are populated directly through `StoreDatabase` (plus real files), then collected the
way the daemon does it: in process with the engine (`guixsvc.daemon.collector.Collector`), and
through a running daemon with `guixsvc gc` (`--list-dead`, collection).  Usage:

    python bench/gc_bench.py [--dead 10000] [--store 100000] [--no-daemon]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guixsvc.daemon.collector import Collector  # noqa: E402
from guixsvc.protocol.ops import GCAction  # noqa: E402
from guixsvc.store.db import StoreDatabase, ValidPathInfo  # noqa: E402
from guixsvc.store.paths import StoreDir  # noqa: E402
from tests.conftest import stop_daemon  # noqa: E402
from tests.gc.conftest import start_ready_daemon  # noqa: E402


def populate(root: Path, count: int, *, rooted: float, directories: float) -> list[str]:
    """`count` registered items; each refers to up to 2 earlier ones; a fraction is rooted."""
    store = root / "store"
    for d in (store / ".links", root / "state" / "gcroots", root / "state" / "profiles",
              root / "state" / "temproots", root / "state" / "db", root / "etc"):  # fmt: skip
        d.mkdir(parents=True, exist_ok=True)
    sd = StoreDir(str(store))
    rng = random.Random(42)
    db = StoreDatabase.open(str(root / "state" / "db"), fsync=False)
    paths: list[str] = []
    batch: list[ValidPathInfo] = []
    try:
        for i in range(count):
            digest = hashlib.sha256(str(i).encode()).digest()
            path = sd.display(sd.make_store_path("text", digest, f"item-{i}"))
            if rng.random() < directories:
                os.mkdir(path)
                with open(f"{path}/f", "wb") as f:
                    f.write(b"x" * 512)
            else:
                with open(path, "wb") as f:
                    f.write(b"y" * 256)
            refs = (
                frozenset(rng.sample(paths[-1000:], min(len(paths), 2))) if paths else frozenset()
            )
            batch.append(ValidPathInfo(path, "sha256:" + "00" * 32, 600, refs))
            paths.append(path)
            if len(batch) == 5000:
                db.register_valid_paths(batch)
                batch = []
        if batch:
            db.register_valid_paths(batch)
    finally:
        db.close()
    for path in rng.sample(paths, int(count * rooted)):
        os.symlink(path, root / "state" / "gcroots" / os.path.basename(path))
    return paths


def engine(root: Path, action: GCAction) -> tuple[float, int]:
    db = StoreDatabase.open(str(root / "state" / "db"), fsync=True)
    try:
        collector = Collector(str(root / "store"), str(root / "state"), db, busy=list,
                              log=lambda level, text: None)  # fmt: skip
        start = time.perf_counter()
        out = collector.run(action)
        return time.perf_counter() - start, len(out.paths)
    finally:
        db.close()


def cli(root: Path, *args: str) -> tuple[float, int]:
    daemon = start_ready_daemon(root)
    try:
        env = dict(daemon.env, GUIX_DAEMON_SOCKET=daemon.socket, PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "guixsvc.cli", "gc", *args], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        return time.perf_counter() - start, len(proc.stdout.splitlines())
    finally:
        stop_daemon(daemon)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dead", type=int, default=10_000)
    p.add_argument("--store", type=int, default=100_000)
    p.add_argument("--no-daemon", action="store_true", help="engine timings only")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gc-bench-"))
    try:
        root = base / "dead"
        t0 = time.perf_counter()
        populate(root, args.dead, rooted=0.0, directories=0.5)
        print(f"populated {args.dead} dead paths in {time.perf_counter() - t0:.1f} s")
        seconds, n = engine(root, GCAction.DELETE_DEAD)
        print(f"engine: deleted {n} dead paths in {seconds:.2f} s ({n / seconds:.0f} paths/s)")
        assert n == args.dead, n
        if not args.no_daemon:
            shutil.rmtree(root)
            populate(root, args.dead, rooted=0.0, directories=0.5)
            seconds, _ = cli(root, "-C")
            left = len(os.listdir(root / "store")) - 1
            print(f"guixsvc gc (daemon): collected {args.dead - left} dead paths in "
                  f"{seconds:.2f} s ({(args.dead - left) / seconds:.0f} paths/s)")  # fmt: skip

        root = base / "big"
        t0 = time.perf_counter()
        populate(root, args.store, rooted=0.05, directories=0.0)
        print(f"populated {args.store} paths in {time.perf_counter() - t0:.1f} s")
        seconds, n = engine(root, GCAction.RETURN_DEAD)
        print(f"engine: --list-dead over {args.store} paths: {n} dead in {seconds:.2f} s "
              f"({args.store / seconds:.0f} paths/s)")  # fmt: skip
        if not args.no_daemon:
            seconds, n = cli(root, "--list-dead")
            print(f"guixsvc gc --list-dead (daemon): {n} lines in {seconds:.2f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
