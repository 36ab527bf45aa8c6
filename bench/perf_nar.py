"""Quick NAR throughput self-check (not a test): `python bench/perf_nar.py [MB] [FILES]`.

Builds a tree of about 50 MB in 2000 files (sizes spread from a few bytes to ~100 KiB, a few
larger files, some subdirectories), then times `nar.dump` (plus hashing), `NarParser` with a
NullSink, and `NarParser` + `RestoreSink` (which writes files; timed on the temp directory's
file system and on /dev/shm, next to `cp -a` of the same tree, because creating thousands of
files is bound by the file system).  The target is >100 MB/s for dump and parse.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from guixsvc.store import nar


def build_tree(root: str, total: int, count: int) -> None:
    rng = random.Random(42)
    os.mkdir(root)
    big = 4  # a few large files hold half the bytes
    big_size = total // 2 // big
    small_avg = (total - big * big_size) // (count - big)
    blob = os.urandom(big_size + 1)
    for i in range(count):
        d = os.path.join(root, f"dir{i % 40:02}")
        os.makedirs(d, exist_ok=True)
        size = big_size if i < big else rng.randint(0, 2 * small_avg)
        with open(os.path.join(d, f"file{i:05}"), "wb") as f:
            f.write(blob[:size])
        if i % 7 == 0:
            os.chmod(os.path.join(d, f"file{i:05}"), 0o755)


def timed(label: str, nbytes: int, fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    rate = nbytes / elapsed / 1e6
    print(f"{label:<34} {elapsed * 1000:8.1f} ms  {rate:8.1f} MB/s")
    return rate


def main() -> None:
    total = int(sys.argv[1]) * 1_000_000 if len(sys.argv) > 1 else 50_000_000
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    tmp = tempfile.mkdtemp(prefix="nar-perf-")
    tmps = [tmp]
    try:
        src = os.path.join(tmp, "src")
        build_tree(src, total, count)
        data = b"".join(nar.dump(src))  # warm the page cache
        size = len(data)
        print(f"tree: {count} files, NAR size {size / 1e6:.1f} MB")

        def dump_only() -> None:
            for _ in nar.dump(src):
                pass

        def dump_hash() -> None:
            h = hashlib.sha256()
            for chunk in nar.dump(src):
                h.update(chunk)

        def parse_null(chunk: int) -> None:
            parser = nar.NarParser(nar.NullSink())
            view = memoryview(data)
            for i in range(0, size, chunk):
                parser.feed(view[i : i + chunk])
            parser.finish()

        counter = iter(range(1_000_000))

        def parse_restore(base: str) -> None:
            dest = os.path.join(base, f"dest{next(counter)}")
            view = memoryview(data)
            nar.restore((view[i : i + 65536] for i in range(0, size, 65536)), dest)

        def copy(base: str) -> None:
            subprocess.run(["cp", "-a", src, os.path.join(base, f"cp{next(counter)}")], check=True)

        rates = [
            timed("dump", size, dump_only),
            timed("dump + sha256", size, dump_hash),
            timed("parse, NullSink, 64 KiB feeds", size, lambda: parse_null(65536)),
            timed("parse, NullSink, 4 KiB feeds", size, lambda: parse_null(4096)),
        ]
        # Writing files is bound by the file system; compare with `cp -a` of the same tree.
        bases = [tmp]
        if os.path.isdir("/dev/shm"):
            bases.append(tempfile.mkdtemp(prefix="nar-perf-", dir="/dev/shm"))
            tmps.append(bases[-1])
        for base in bases:
            rate = timed(
                f"parse + RestoreSink in {base[:14]}", size, lambda b=base: parse_restore(b)
            )
            timed("  (cp -a of the tree, same fs)", size, lambda b=base: copy(b))
            if base.startswith("/dev/shm"):
                rates.append(rate)
        print("OK" if min(rates) > 100 else "SLOW: below 100 MB/s")
    finally:
        for t in tmps:
            shutil.rmtree(t)


if __name__ == "__main__":
    main()
