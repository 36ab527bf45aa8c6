"""Build throughput: wall time of 50 independent trivial builds and of a 20-deep chain.

Run as root (builds use the chroot and build users):  python bench/build_bench.py
Each scenario runs against a fresh daemon at `-M 1` and `-M 2`; the builder is the static
busybox of Debian's busybox-static package, added to the store first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.build.conftest import (
    GROUP,
    USERS,
    Builds,
    add_busybox,
    start_build_daemon,
)
from tests.conftest import stop_daemon


def _users(create: bool) -> None:
    for user in USERS:
        subprocess.run(["userdel", user], capture_output=True)
    subprocess.run(["groupdel", GROUP], capture_output=True)
    if create:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        for user in USERS:
            subprocess.run(["useradd", "--system", "--no-create-home", "-g", GROUP, "-G", GROUP,
                            "-s", "/usr/sbin/nologin", user], check=True)  # fmt: skip


def run(jobs: int, scenario: str) -> float:
    base = Path(tempfile.mkdtemp(prefix="guixsvc-bench-", dir="/tmp"))
    base.chmod(0o755)
    daemon = start_build_daemon(base, f"--build-users-group={GROUP}", f"--max-jobs={jobs}")
    try:
        client = daemon.client()
        client.set_options(verbosity=0)
        b = Builds(daemon, client, add_busybox(client, base), [])
        if scenario == "independent":
            drvs = [b.derivation(f"t{i}", f"echo {i} > $out")[0] for i in range(50)]
        else:
            prev: tuple[str, dict[str, str]] | None = None
            for i in range(20):
                if prev is None:
                    prev = b.derivation("c0", "echo 0 > $out")
                else:
                    prev = b.derivation(
                        f"c{i}", f"cat {prev[1]['out']} > $out; echo {i} >> $out",
                        inputs={prev[0]: ("out",)},
                    )  # fmt: skip
            assert prev is not None
            drvs = [prev[0]]
        start = time.monotonic()
        client.build_paths(drvs)
        elapsed = time.monotonic() - start
        client.close()
        return elapsed
    finally:
        stop_daemon(daemon)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root")
    _users(True)
    try:
        for scenario, count in (("independent", 50), ("chain", 20)):
            for jobs in (1, 2):
                t = run(jobs, scenario)
                print(f"{scenario:12} -M {jobs}: {t:6.2f} s  ({t / count * 1000:.0f} ms/build)")
    finally:
        _users(False)


if __name__ == "__main__":
    main()
