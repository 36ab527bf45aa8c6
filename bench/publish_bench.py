"""Benchmark `guixsvc publish` with wrk on loopback: narinfo requests/s and nar MB/s
(uncompressed, zstd, cached) at 1 and 64 connections.

    python bench/publish_bench.py [--seconds N] [--size-mb M]

Needs root-free nothing special; needs `wrk` (Debian package wrk).  Starts its own daemon and
publish servers on a temporary store and removes everything afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guixsvc.pki import keys
from tests.substitutes.helpers import start_node, start_publish, stop_node


def wrk(url: str, conns: int, seconds: int) -> tuple[float, float]:
    out = subprocess.run(
        ["wrk", f"-c{conns}", f"-t{min(conns, 2)}", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    assert m is not None
    scale = {"B": 1e-6, "KB": 1e-3 * 1.024, "MB": 1.048576, "GB": 1073.741824}[m.group(2)]
    return rps, float(m.group(1)) * scale


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=64)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found (Debian package wrk)")
        return 1
    base = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    node = start_node(base / "n", base / "n" / "store", None)
    try:
        keys.generate_key_files(str(node.conf))
        blob = base / "blob"
        with open(blob, "wb") as f:  # half random, half compressible
            f.write(os.urandom(args.size_mb << 19))
            f.write(b"guix " * ((args.size_mb << 19) // 5))
        with node.client() as c:
            small = c.add_text_to_store("small", "hello", [])
            big = c.add_to_store("big", str(blob))
        _, plain = start_publish(node, None, "-C", "zstd:3", name="publish-plain")
        cache = base / "cache"
        _, cached = start_publish(node, None, "-C", "zstd:3", f"--cache={cache}", name="pc")
        big_base = os.path.basename(big)
        # The first request schedules baking (and answers 404 for a big item).
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(f"{cached}/{big_base[:32]}.narinfo").read()
        deadline = time.monotonic() + 300
        while not (cache / "zstd" / f"{big_base}.narinfo").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("baking took too long")
            time.sleep(0.2)
        rows = [
            ("narinfo", f"{plain}/{os.path.basename(small)[:32]}.narinfo"),
            ("nar none", f"{plain}/nar/{big_base}"),
            ("nar zstd", f"{plain}/nar/zstd/{big_base}"),
            ("nar cached zstd", f"{cached}/nar/zstd/{big_base}"),
        ]
        print(f"{'what':<18}{'conns':>6}{'req/s':>12}{'MB/s':>10}")
        for name, url in rows:
            for conns in (1, 64):
                rps, mbs = wrk(url, conns, args.seconds)
                print(f"{name:<18}{conns:>6}{rps:>12.1f}{mbs:>10.1f}", flush=True)
    finally:
        stop_node(node)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
