"""Store-operation benchmark: our guix-daemon next to the C++ daemons, in one run.

Not a test: it prints a table.  Issue 2 asks for ops/s of handshake, add-text-to-store,
valid-path? and query-path-info, MB/s of add-to-store for a 50 MB tree of 2000 files, and the
small operations again with 16 concurrent client processes -- for our daemon and, side by side,
for Debian's nix-daemon (nix-bin, protocol 1.34) on the operations the two protocols share, and
optionally for an already running upstream guix-daemon (`--peer-socket`).

Every daemon gets a fresh store under a temporary directory on /dev/shm (tmpfs, like the
reference numbers of the issue).  The client side is the same code for every daemon: our
`DaemonClient` for the Guix protocol, and `bench/nix_client.NixClient` (a subclass overriding
only what differs) for Nix.  The NAR of the tree is serialised once, before timing, so
add-to-store measures the daemon and the socket, not the client's NAR writer.

Usage: python bench/store_ops.py [--duration=S] [--clients=N] [--peer-socket=PATH] ...
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from bench.nix_client import NixClient  # noqa: E402
from guixsvc.protocol.client import DaemonClient  # noqa: E402
from guixsvc.store import nar  # noqa: E402

CHUNK = 64 * 1024

# -- the daemons ----------------------------------------------------------------------------------


@dataclass
class Target:
    """One daemon under test."""

    name: str
    socket: str
    store: str
    protocol: str  # "guix" or "nix"
    process: subprocess.Popen[bytes] | None = None
    log: str | None = None
    state: dict[str, Any] = field(default_factory=dict)

    meter: CpuMeter | None = None

    def measure(self) -> None:
        """Put the daemon (found through the listening socket's credentials) in a cgroup."""
        with self.client() as client:
            raw = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = struct.unpack("3i", raw)[0]
        self.meter = CpuMeter(self.name, pid)

    def cpu(self) -> float | None:
        return self.meter.read() if self.meter else None

    def client(self) -> DaemonClient:
        if self.protocol == "nix":
            return NixClient(self.socket)
        return DaemonClient(self.socket)

    def stop(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.meter is not None:
            self.meter.close()


@dataclass
class Result:
    rate: float  # operations (or megabytes) per second
    cpu: float | None  # daemon CPU seconds (all its processes) per operation (or megabyte)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class CpuMeter:
    """CPU time of a daemon and every worker it forks, through a cgroup of its own.

    The C++ daemons let the kernel reap their workers, so the times of exited workers never
    reach the parent's `cutime`; a cgroup's usage counter includes them.  Needs root and
    cgroup v1 `cpuacct` or cgroup v2; without them, readings are None.
    """

    def __init__(self, name: str, pid: int) -> None:
        self.path: Path | None = None
        self.origin: Path | None = None
        self.v2 = False
        v1 = Path("/sys/fs/cgroup/cpuacct")
        v2 = Path("/sys/fs/cgroup")
        try:
            if (v1 / "cpuacct.usage").exists():
                root = v1
            elif (v2 / "cgroup.controllers").exists():
                root, self.v2 = v2, True
            else:
                return
            origin = self._cgroup_of(pid)
            path = root / f"guixsvc-bench-{os.getpid()}-{name.split()[0]}"
            path.mkdir(exist_ok=True)
            self.path = path
            self.origin = root / origin.lstrip("/")
            # The daemon and the workers it already forked (ours pre-forks a pool); later
            # workers are born in the cgroup.
            (path / "cgroup.procs").write_text(f"{pid}\n")
            for child in _children(pid):
                with contextlib.suppress(OSError):  # it may have exited meanwhile
                    (path / "cgroup.procs").write_text(f"{child}\n")
        except OSError:
            self.close()
            self.path = None

    def _cgroup_of(self, pid: int) -> str:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, where = line.split(":", 2)
            if (self.v2 and controllers == "") or "cpuacct" in controllers.split(","):
                return where
        raise OSError("no cgroup")

    def read(self) -> float | None:
        if self.path is None:
            return None
        try:
            if not self.v2:
                return int((self.path / "cpuacct.usage").read_text()) / 1e9
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        except OSError:
            pass
        return None

    def close(self) -> None:
        """Move what is left (a daemon we did not start) back, then remove the cgroup."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if self.origin is not None:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.origin / "cgroup.procs").write_text(f"{pid}\n")
            for _ in range(50):
                try:
                    self.path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.path = None


def _wait_for_socket(target: Target, deadline: float = 30.0) -> None:
    assert target.process is not None
    end = time.monotonic() + deadline
    while not os.path.exists(target.socket):
        if target.process.poll() is not None or time.monotonic() > end:
            target.stop()
            text = Path(target.log).read_text(errors="replace") if target.log else ""
            raise RuntimeError(f"{target.name} did not start:\n{text}")
        time.sleep(0.02)


def start_ours(base: Path, extra: list[str], command: list[str] | None = None) -> Target:
    """Our daemon (or `command`, e.g. a profiling wrapper taking the same options)."""
    root = base / "ours"
    env = dict(os.environ)
    env.update(
        NIX_STORE_DIR=str(root / "store"),
        GUIX_STATE_DIRECTORY=str(root / "state"),
        GUIX_DATABASE_DIRECTORY=str(root / "state" / "db"),
        GUIX_LOG_DIRECTORY=str(root / "log"),
        GUIX_CONFIGURATION_DIRECTORY=str(root / "etc"),
    )
    (root / "etc").mkdir(parents=True)
    sock = str(root / "socket")
    log = str(root / "daemon.log")
    cmd = command or [sys.executable, "-m", "guixsvc.daemon.cli"]
    cmd = [*cmd, f"--listen={sock}", "--disable-chroot"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, *extra], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    target = Target("ours", sock, str(root / "store"), "guix", proc, log)
    _wait_for_socket(target)
    return target


NIX_CONF = """\
build-users-group =
sandbox = false
substituters =
experimental-features =
"""


def start_nix(base: Path, nix_daemon: str) -> Target:
    """Debian's nix-daemon as root on a private store, listening on its own socket."""
    root = base / "nix"
    for sub in ("store", "state", "log", "conf"):
        (root / sub).mkdir(parents=True)
    (root / "conf" / "nix.conf").write_text(NIX_CONF)
    sock = str(root / "socket")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "XDG_CONFIG_HOME": str(root / "conf"),
        "NIX_STORE_DIR": str(root / "store"),
        "NIX_STATE_DIR": str(root / "state"),
        "NIX_LOG_DIR": str(root / "log"),
        "NIX_CONF_DIR": str(root / "conf"),
        "NIX_DAEMON_SOCKET_PATH": sock,
    }
    log = str(root / "daemon.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [nix_daemon], env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT
        )
    target = Target("nix-daemon", sock, str(root / "store"), "nix", proc, log)
    _wait_for_socket(target)
    with target.client() as client:
        version = getattr(client, "nix_version", "")
        target.name = f"nix {version}".strip()
    return target


# -- the workload ---------------------------------------------------------------------------------


def make_tree(dest: Path, files: int = 2000, total: int = 50_000_000) -> None:
    """A deterministic tree: `files` files of pseudo-random bytes in 40 directories."""
    rng = random.Random(2)
    per_dir = max(1, files // 40)
    size = total // files
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(files):
        sub = tmp / f"d{i // per_dir:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        name = sub / f"f{i:04d}"
        name.write_bytes(rng.randbytes(size))
        if i % 10 == 0:
            name.chmod(0o755)
    tmp.rename(dest)


def serialise(tree: Path) -> list[memoryview]:
    data = memoryview(b"".join(nar.dump(tree)))
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def run_for(duration: float, op: Callable[[int], object]) -> tuple[int, float]:
    """Call op(0), op(1), ... until `duration` seconds passed; (count, seconds)."""
    start = time.monotonic()
    deadline = start + duration
    i = 0
    while True:
        op(i)
        i += 1
        now = time.monotonic()
        if now >= deadline:
            return i, now - start


def bench_handshake(t: Target, duration: float) -> tuple[float, float]:
    def once(_: int) -> None:
        t.client().close()

    return run_for(duration, once)


def bench_add_text(t: Target, duration: float) -> tuple[float, float]:
    tag = f"{t.name} {os.getpid()} {time.time_ns()}"
    client: DaemonClient = t.state["client"]
    paths: list[str] = []
    n, secs = run_for(
        duration, lambda i: paths.append(client.add_text_to_store("bench", f"{tag} {i}"))
    )
    t.state["paths"] = paths
    return n, secs


def bench_valid_path(t: Target, duration: float) -> tuple[float, float]:
    client: DaemonClient = t.state["client"]
    paths: list[str] = t.state["paths"]
    return run_for(duration, lambda i: client.is_valid_path(paths[i % len(paths)]))


def bench_query_path_info(t: Target, duration: float) -> tuple[float, float]:
    client: DaemonClient = t.state["client"]
    paths: list[str] = t.state["paths"]
    return run_for(duration, lambda i: client.query_path_info(paths[i % len(paths)]))


def bench_add_to_store(
    t: Target, chunks: list[memoryview], duration: float, min_runs: int = 2
) -> tuple[float, float]:
    """(megabytes of NAR added, seconds)."""
    client: DaemonClient = t.state["client"]
    size = sum(len(c) for c in chunks)
    tag = time.time_ns()
    runs = 0
    start = time.monotonic()
    while runs < min_runs or time.monotonic() - start < duration:
        client.add_nar_to_store(f"bench-tree-{tag}-{runs}", chunks)
        runs += 1
    return runs * size / 1e6, time.monotonic() - start


# -- concurrent clients ---------------------------------------------------------------------------

PHASES = ("handshake", "add-text", "valid-path?", "query-path-info")


def _concurrent_worker(t: Target, duration: float, barrier: Any, results: Any, index: int) -> None:
    out: dict[str, tuple[int, float, float]] = {}
    try:
        tag = f"{t.name} c{index} {os.getpid()} {time.time_ns()}"
        paths: list[str] = []
        client = t.client()
        ops: dict[str, Callable[[int], object]] = {
            "handshake": lambda _: t.client().close(),
            "add-text": lambda i: paths.append(client.add_text_to_store("bench", f"{tag} {i}")),
            "valid-path?": lambda i: client.is_valid_path(paths[i % len(paths)]),
            "query-path-info": lambda i: client.query_path_info(paths[i % len(paths)]),
        }
        for phase in PHASES:
            barrier.wait(60)
            start = time.monotonic()
            n, _ = run_for(duration, ops[phase])
            out[phase] = (n, start, time.monotonic())
        barrier.wait(60)
        client.close()
    except BaseException as exc:  # reported by the parent
        results.put((index, repr(exc)))
        with contextlib.suppress(Exception):
            barrier.abort()
        return
    results.put((index, out))


def bench_concurrent(t: Target, clients: int, duration: float) -> dict[str, Result]:
    """Aggregate ops/s of `clients` processes per phase; the parent takes CPU readings at the
    barriers that separate the phases."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_worker, args=(t, duration, barrier, results, i))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    cpu: list[float | None] = []
    with contextlib.suppress(threading.BrokenBarrierError):
        for _ in range(len(PHASES) + 1):
            barrier.wait(120)
            cpu.append(t.cpu())
    collected = [results.get(timeout=60 + 10 * duration) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r for _, r in collected if isinstance(r, str)]
    if errors:
        raise RuntimeError(f"{t.name}: concurrent client failed: {errors[0]}")
    out: dict[str, Result] = {}
    for k, phase in enumerate(PHASES):
        rows = [r[phase] for _, r in collected]
        total = sum(n for n, _, _ in rows)
        span = max(end for _, _, end in rows) - min(start for _, start, _ in rows)
        before, after = cpu[k], cpu[k + 1]
        used = after - before if before is not None and after is not None else None
        out[phase] = Result(total / span, used / total if used is not None else None)
    return out


# -- the Guile client's timing.scm ------------------------------------------------------------


def run_guile_timing(guile_dir: Path, t: Target, tree: Path, iterations: int) -> str:
    env = dict(os.environ, GUIX_DAEMON_SOCKET=t.socket, NIX_STORE_DIR=t.store)
    cmd = [str(guile_dir / "run.sh"), str(guile_dir / "timing.scm"), str(iterations), str(tree)]
    proc = subprocess.run(
        [*cmd, "3"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return proc.stdout + (proc.stderr if proc.returncode else "")


# -- main -------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the temporary stores go (default /dev/shm, a tmpfs)",
    )
    ap.add_argument("--duration", type=float, default=1.5, help="seconds per measurement")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client processes")
    ap.add_argument("--files", type=int, default=2000, help="files in the add-to-store tree")
    ap.add_argument("--megabytes", type=int, default=50, help="size of the tree")
    ap.add_argument("--tree", help="use this directory instead of a generated tree")
    ap.add_argument(
        "--nix-daemon",
        default=shutil.which("nix-daemon"),
        help="nix-daemon to compare against (Debian's nix-bin)",
    )
    ap.add_argument("--no-nix", action="store_true", help="skip the nix-daemon comparison")
    ap.add_argument("--peer-socket", help="an already running upstream guix-daemon's socket")
    ap.add_argument("--peer-store", help="its store directory (default: next to the socket)")
    ap.add_argument(
        "--ours-flag", action="append", default=[], help="extra option for our daemon (repeatable)"
    )
    ap.add_argument(
        "--ours-command",
        type=shlex.split,
        help="command starting our daemon (default: python -m guixsvc.daemon.cli)",
    )
    ap.add_argument(
        "--guile-client", type=Path, help="run DIR/timing.scm (Guile client) against Guix daemons"
    )
    ap.add_argument("--guile-iterations", type=int, default=2000)
    ap.add_argument(
        "--no-cpu",
        dest="cpu",
        action="store_false",
        help="do not move the daemons into cgroups to measure their CPU time",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary stores")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="guixsvc-bench-", dir=args.dir))
    targets: list[Target] = []
    began = time.monotonic()
    try:
        tree = Path(args.tree) if args.tree else base / "tree"
        if not args.tree:
            make_tree(tree, args.files, args.megabytes * 1_000_000)
        chunks = serialise(tree)
        nar_mb = sum(len(c) for c in chunks) / 1e6

        targets.append(start_ours(base, args.ours_flag, args.ours_command))
        if not args.no_nix and args.nix_daemon:
            targets.append(start_nix(base, args.nix_daemon))
        if args.peer_socket:
            store = args.peer_store or os.path.join(os.path.dirname(args.peer_socket), "store")
            targets.append(Target("guix-daemon", args.peer_socket, store, "guix"))
        print(
            f"# store under {base}; tree {tree}: {args.files} files, NAR {nar_mb:.1f} MB;"
            f" {args.duration:g} s per measurement; {os.cpu_count()} CPUs",
            flush=True,
        )

        rows: list[tuple[str, dict[str, Result]]] = []

        def row(label: str, fn: Callable[[Target], tuple[float, float]]) -> None:
            values = {}
            for t in targets:
                before = t.cpu()
                count, secs = fn(t)
                after = t.cpu()
                cpu = (after - before) / count if before is not None and after is not None else None
                values[t.name] = Result(count / secs, cpu)
            rows.append((label, values))
            print(
                f"  {label:<28}"
                + "".join(f"{t.name}={fmt(values[t.name].rate)}  " for t in targets),
                flush=True,
            )

        for t in targets:  # warm up: page cache, database, imports in forked workers
            for _ in range(5):
                t.client().close()
            if args.cpu:
                t.measure()
            t.state["client"] = t.client()

        d = args.duration
        row("handshake/s", lambda t: bench_handshake(t, d))
        row("add-text-to-store/s", lambda t: bench_add_text(t, d))
        row("valid-path?/s", lambda t: bench_valid_path(t, d))
        row("query-path-info/s", lambda t: bench_query_path_info(t, d))
        row(f"add-to-store MB/s ({nar_mb:.0f} MB)", lambda t: bench_add_to_store(t, chunks, 2 * d))
        for t in targets:
            t.state["client"].close()
        concurrent = {t.name: bench_concurrent(t, args.clients, d) for t in targets}
        for phase in PHASES:
            rows.append(
                (f"{args.clients} clients: {phase}/s", {n: v[phase] for n, v in concurrent.items()})
            )
        print_table(targets, rows)
        print(f"# total {time.monotonic() - began:.0f} s", flush=True)

        if args.guile_client:
            for t in targets:
                if t.protocol == "guix":
                    print(f"\n## Guile client timing.scm against {t.name}", flush=True)
                    print(run_guile_timing(args.guile_client, t, tree, args.guile_iterations))
    finally:
        for t in targets:
            with contextlib.suppress(Exception):
                client = t.state.get("client")
                if client is not None:
                    client.close()
            t.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def print_table(targets: list[Target], rows: list[tuple[str, dict[str, Result]]]) -> None:
    ours, peers = targets[0], targets[1:]

    def table(title: str, cell: Callable[[Result], float | None], unit: str) -> None:
        header = [title, ours.name]
        for p in peers:
            header += [p.name, f"ours/{p.name.split()[0]}"]
        lines = [header]
        for label, values in rows:
            if unit:  # "add-to-store MB/s (50 MB)" -> "add-to-store (50 MB) µs/MB"
                per = "MB" if " MB/s" in label else "op"
                label = f"{label.replace(' MB/s', '').replace('/s', '')} {unit}/{per}"
            mine = cell(values[ours.name])
            line = [label, fmt(mine)]
            for p in peers:
                theirs = cell(values[p.name])
                ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else "-"
                line += [fmt(theirs), ratio]
            lines.append(line)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        print()
        for j, line in enumerate(lines):
            cells = [line[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
            ]
            print("| " + " | ".join(cells) + " |")
            if j == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    table("throughput (higher is better)", lambda r: r.rate, "")
    if any(r.cpu is not None for _, values in rows for r in values.values()):
        table(
            "daemon CPU (lower is better)",
            lambda r: r.cpu * 1e6 if r.cpu is not None else None,
            "µs",
        )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
