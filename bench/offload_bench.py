"""Offloading: 40 independent CPU-bound derivations on 1, 2 and 3 machines, and the per-build
overhead of an offloaded build compared with a local one.

Run as root:  python bench/offload_bench.py [--builds 40] [--work 1000000]
The machines are the test cluster of tests/offload/helpers.py: the local daemon (`--max-jobs=1`)
plus 0, 1 or 2 build machines (real sshd in front of a daemon with its own store, one
`parallel-builds` slot each).  Every machine, the local one included, is put in its own cgroup
limited to one CPU (cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`), so "3 machines" means three
cores' worth of builders even on a bigger host; on a host with fewer cores than machines the
speed-up is bounded by the cores.  Each build runs a busybox `sh` loop of `--work` iterations.
The overhead row builds trivial derivations one at a time, here and offloaded: the difference
per build is what SSH, the transfer of the inputs and outputs and the registration cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.offload.helpers import Cluster, make_cluster, stop_cluster


def _cgroup_root() -> tuple[Path, str] | None:
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists():
        return v2, "v2"
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1, "v1"
    return None


def _descendants(pids: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen


class OneCore:
    """A cgroup limited to one CPU holding a process tree."""

    def __init__(self, name: str) -> None:
        found = _cgroup_root()
        self.path: Path | None = None
        if found is None:
            print(f"note: no writable cpu cgroup; {name} is not limited to one core")
            return
        root, kind = found
        self.path = root / f"guixsvc-offload-bench-{os.getpid()}-{name}"
        self.path.mkdir()
        if kind == "v2":
            with contextlib.suppress(OSError):
                (root / "cgroup.subtree_control").write_text("+cpu")
            (self.path / "cpu.max").write_text("100000 100000")
        else:
            (self.path / "cpu.cfs_period_us").write_text("100000")
            (self.path / "cpu.cfs_quota_us").write_text("100000")

    def add(self, pids: list[int]) -> None:
        if self.path is None:
            return
        for pid in _descendants(pids):
            with contextlib.suppress(OSError):
                (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        if self.path is None:
            return
        parent = self.path.parent
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (parent / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _script(work: int, salt: str) -> str:
    return f"i=0; while [ $i -lt {work} ]; do i=$((i+1)); done; echo {salt} $i > $out"


def run_builds(c: Cluster, n: int, work: int, tag: str) -> tuple[float, dict[str, int]]:
    b = c.connect()
    drvs = [b.derivation(f"bench-{tag}-{i}", _script(work, f"{tag}{i}"))[0] for i in range(n)]
    start = time.monotonic()
    b.client.build_paths(drvs)
    elapsed = time.monotonic() - start
    where = {m.name: sum(c.offloaded_to(d) == [m.name] for d in drvs) for m in c.machines}
    where["here"] = n - sum(where.values())
    return elapsed, where


def overhead(c: Cluster, n: int) -> tuple[float, float]:
    """Seconds per trivial build: (local, offloaded), builds one after another."""
    (c.local.conf / "machines.scm").unlink(missing_ok=True)
    b = c.connect()
    drvs = [b.derivation(f"ovh-local-{i}", f"echo {i} > $out")[0] for i in range(n)]
    start = time.monotonic()
    for d in drvs:
        b.client.build_paths([d])
    local = (time.monotonic() - start) / n
    c.write_machines(c.machine_entry(c.machines[0]))
    b = c.connect()
    drvs = [b.derivation(f"ovh-remote-{i}", f"echo {i} > $out")[0] for i in range(n)]
    start = time.monotonic()
    for d in drvs:
        b.client.build_paths([d])
    remote = (time.monotonic() - start) / n
    assert all(c.offloaded_to(d) for d in drvs[-1:]), "".join(c.logs)
    return local, remote


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", type=int, default=40)
    ap.add_argument("--work", type=int, default=1000000)
    ap.add_argument("--overhead-builds", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (sshd, mount namespaces, cgroups)", file=sys.stderr)
        return 1
    # SIGTERM ends the run through the `finally` below (daemons, sshd, cgroups cleaned up).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    base = Path(tempfile.mkdtemp(prefix="guixsvc-offload-bench-", dir="/tmp"))
    cluster = make_cluster(base, 2, "--max-jobs=1")
    groups: list[OneCore] = []
    try:
        for name, node in [("local", cluster.local)] + [
            (f"m{i}", m.node) for i, m in enumerate(cluster.machines)
        ]:
            group = OneCore(name)
            group.add([p.pid for p in node.procs])
            groups.append(group)
        print(f"{args.builds} independent builds, {args.work} shell-loop iterations each; "
              f"{os.cpu_count()} cores on this host")  # fmt: skip
        results: list[tuple[int, float]] = []
        for n_machines in (1, 2, 3):
            remotes = cluster.machines[: n_machines - 1]
            if remotes:
                cluster.write_machines(*(cluster.machine_entry(m) for m in remotes))
            else:
                (cluster.local.conf / "machines.scm").unlink(missing_ok=True)
            elapsed, where = run_builds(cluster, args.builds, args.work, f"m{n_machines}")
            results.append((n_machines, elapsed))
            speedup = results[0][1] / elapsed
            print(
                f"{n_machines} machine(s): {elapsed:7.2f} s  speed-up {speedup:4.2f}x  "
                f"builds per machine {where}"
            )
        local, remote = overhead(cluster, args.overhead_builds)
        print(
            f"trivial build, one at a time: local {local * 1000:.0f} ms, offloaded "
            f"{remote * 1000:.0f} ms: offloading overhead {(remote - local) * 1000:.0f} ms/build"
        )
    finally:
        stop_cluster(cluster)
        for group in groups:
            group.remove()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
