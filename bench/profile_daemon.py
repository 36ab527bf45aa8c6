"""Profile our daemon's per-connection workers with cProfile, one workload per connection.

The daemon forks a worker per connection (guixsvc/daemon/pool.py), so a profiler attached to
the main process sees nothing of the request path.  This helper runs the daemon with `os.fork`
and `os._exit` wrapped: a forked child profiles itself from the fork on and dumps its stats when
it exits.  It then drives one connection per workload (handshakes, add-text, valid-path?,
query-path-info, add-to-store) and prints, per workload, the functions with the most own time.

Usage: python bench/profile_daemon.py [--ops=N] [--top=N]
       python bench/profile_daemon.py --serve OUTDIR DAEMON-ARGS...   (internal)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def serve(outdir: str, daemon_args: list[str]) -> int:
    """Run the daemon; each forked worker writes OUTDIR/<pid>.prof when it exits."""
    real_fork, real_exit = os.fork, os._exit
    profiler: list[cProfile.Profile] = []

    def fork() -> int:
        pid = real_fork()
        if pid == 0:
            profiler.clear()
            profiler.append(cProfile.Profile())
            profiler[0].enable()
        return pid

    def exit_(status: int) -> None:
        if profiler:
            profiler[0].disable()
            profiler[0].dump_stats(os.path.join(outdir, f"{os.getpid()}.prof"))
        real_exit(status)

    os.fork = fork
    os._exit = exit_  # type: ignore[assignment]
    from guixsvc.daemon.cli import main as daemon_main

    return daemon_main(daemon_args)


def drive(args: argparse.Namespace) -> int:
    from bench.store_ops import make_tree, serialise
    from guixsvc.protocol.client import DaemonClient

    base = Path(tempfile.mkdtemp(prefix="guixsvc-prof-", dir=args.dir))
    root, prof = base / "store", base / "prof"
    prof.mkdir()
    (root / "etc").mkdir(parents=True)
    env = dict(
        os.environ,
        NIX_STORE_DIR=str(root / "store"),
        GUIX_STATE_DIRECTORY=str(root / "state"),
        GUIX_DATABASE_DIRECTORY=str(root / "state" / "db"),
        GUIX_LOG_DIRECTORY=str(root / "log"),
        GUIX_CONFIGURATION_DIRECTORY=str(root / "etc"),
    )
    sock = str(root / "socket")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(prof), f"--listen={sock}", "--disable-chroot"],
        env=env,
        cwd=ROOT,
    )
    try:
        while not os.path.exists(sock):
            if proc.poll() is not None:
                return 1
            time.sleep(0.02)
        tree = base / "tree"
        make_tree(tree, args.files, args.files * 25_000)
        chunks = serialise(tree)
        DaemonClient(sock).close()  # warm-up; its profile is discarded below
        time.sleep(0.2)
        for f in prof.glob("*.prof"):
            f.unlink()

        def workload(name: str, body: Callable[[], None]) -> None:
            before = set(prof.glob("*.prof"))
            start = time.monotonic()
            body()
            secs = time.monotonic() - start
            deadline = time.monotonic() + 10
            while len(set(prof.glob("*.prof")) - before) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # let every worker of this workload exit and dump
            files = sorted(set(prof.glob("*.prof")) - before)
            report(name, secs, [str(f) for f in files], args.top)

        n = args.ops
        paths: list[str] = []

        def handshakes() -> None:
            for _ in range(n // 10):
                DaemonClient(sock).close()

        def add_text() -> None:
            with DaemonClient(sock) as c:
                for i in range(n):
                    paths.append(c.add_text_to_store("prof", f"profile {time.time_ns()} {i}"))

        def valid() -> None:
            with DaemonClient(sock) as c:
                for p in paths:
                    c.is_valid_path(p)

        def info() -> None:
            with DaemonClient(sock) as c:
                for p in paths:
                    c.query_path_info(p)

        def add_tree() -> None:
            with DaemonClient(sock) as c:
                c.add_nar_to_store(f"prof-tree-{time.time_ns()}", chunks)

        workload(f"{n // 10} handshakes", handshakes)
        workload(f"{n} add-text-to-store", add_text)
        workload(f"{n} valid-path?", valid)
        workload(f"{n} query-path-info", info)
        workload(f"add-to-store {args.files} files", add_tree)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def report(name: str, secs: float, files: list[str], top: int) -> None:
    print(f"\n===== {name}: {secs:.2f} s client-side, {len(files)} worker profile(s)")
    if not files:
        return
    stats = pstats.Stats(files[0], stream=io.StringIO())
    for f in files[1:]:
        stats.add(f)
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=2000, help="requests per workload")
    ap.add_argument("--files", type=int, default=400, help="files in the add-to-store tree")
    ap.add_argument("--top", type=int, default=25, help="functions shown per workload")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    return drive(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
