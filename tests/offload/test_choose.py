"""Machine choice without SSH: matching, slots (shared with other processes through fcntl locks,
as upstream's `acquire-build-slot`), speed order, the load/space verdict."""

from __future__ import annotations

import os
import random
from pathlib import Path

from guixsvc.offload.choose import (
    acquire_slot,
    machine_matches,
    pick_machine,
    suitable,
)
from guixsvc.offload.machines import BuildMachine
from guixsvc.offload.transport import RemoteStatus


def _m(name: str, **kw: object) -> BuildMachine:
    return BuildMachine(name=name, user="u", host_key="ssh-ed25519 K", systems=["x86_64-linux"],
                        **kw)  # type: ignore[arg-type]  # fmt: skip


def test_matching() -> None:
    m = _m("a", features=["kvm", "big"])
    assert machine_matches(m, "x86_64-linux", [])
    assert machine_matches(m, "x86_64-linux", ["kvm"])
    assert not machine_matches(m, "x86_64-linux", ["kvm", "gpu"])
    assert not machine_matches(m, "aarch64-linux", [])


def test_slots_are_exclusive_within_and_across_processes(tmp_path: Path) -> None:
    m = _m("a", parallel_builds=2, port=2222)
    s1 = acquire_slot(str(tmp_path), m)
    s2 = acquire_slot(str(tmp_path), m)
    assert s1 is not None and s2 is not None and s1.path != s2.path
    assert s1.path == str(tmp_path / "offload" / "a:2222" / "0")
    assert acquire_slot(str(tmp_path), m) is None  # same process: bookkeeping, not the lock
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        got = acquire_slot(str(tmp_path), _m("a", parallel_builds=2, port=2222))
        os.write(w, b"none" if got is None else b"slot")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 10) == b"none"  # another process: the fcntl locks
    s1.release()
    assert acquire_slot(str(tmp_path), m) is not None


def test_fastest_free_machine_is_picked(tmp_path: Path) -> None:
    slow, fast, busy = _m("slow"), _m("fast", speed=3.0), _m("busy", speed=10.0)
    held = acquire_slot(str(tmp_path), busy)
    choice = pick_machine([slow, fast, busy], state_dir=str(tmp_path), rng=random.Random(1))
    assert choice.machine is fast and choice.busy and choice.slot is not None
    # The slots of the machines not chosen were released.
    assert acquire_slot(str(tmp_path), slow) is not None
    assert held is not None
    equal = [_m(f"m{i}") for i in range(4)]
    picked = {
        pick_machine(equal, state_dir=str(tmp_path / f"r{i}"), rng=random.Random(i)).machine.name  # type: ignore[union-attr]
        for i in range(20)
    }
    assert len(picked) > 1  # equal speeds: random, as upstream's shuffle


def test_load_and_space_verdict() -> None:
    lines: list[str] = []
    m = _m("a")
    assert suitable(m, RemoteStatus(0.59, 2**30, [], None), lines.append)
    assert lines == ["normalized load on machine 'a' is 0.59\n"]
    assert not suitable(m, RemoteStatus(0.6, 2**30, [], None), lines.append)
    assert suitable(_m("b", overload_threshold=None), RemoteStatus(1.0, 2**30, [], None), print)
    lines.clear()
    assert not suitable(m, RemoteStatus(0.1, 50 * 2**20, [], None), lines.append)
    assert lines[1] == "skipping machine 'a' because it is low on disk space (50.00 MiB free)\n"
