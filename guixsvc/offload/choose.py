"""Which build machine takes a derivation: upstream's `choose-build-machine`.

Candidates are the machines whose `systems` include the derivation's system and whose
`features` include all of its `requiredSystemFeatures` (`machine-matches?`).  A machine has
`parallel-builds` slots, each a lock file `$GUIX_STATE_DIRECTORY/offload/NAME:PORT/N` held with
an fcntl write lock for the duration of a build, the same files and locks as upstream, so our
daemon and upstream's `guix offload` share the limit.  Among the machines with a free slot, in
random order then sorted by decreasing `speed`, the first whose normalised load (1-minute load
average / cores, at most 1.0) is below its `overload-threshold` and that has at least 100 MiB
free for its store is chosen.  A machine that cannot be reached is skipped, as upstream does.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from guixsvc.offload.machines import BuildMachine
from guixsvc.offload.transport import RemoteStatus
from guixsvc.store.locks import lock_fd

MINIMUM_DISK_SPACE = 100 * 2**20  # upstream's %minimum-disk-space


def machine_matches(machine: BuildMachine, system: str, features: list[str]) -> bool:
    return system in machine.systems and all(f in machine.features for f in features)


#: Slot files this process holds.  POSIX locks never conflict within a process, and closing
#: any descriptor of a file drops the process's lock on it, so a held slot must not even be
#: opened again here.
_HELD: set[str] = set()


class Slot:
    """One held build slot of a machine (released by closing the lock file)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        _HELD.add(path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _HELD.discard(self.path)

    def __del__(self) -> None:  # a worker that ends abruptly still frees its slots
        self.release()


def acquire_slot(state_dir: str, machine: BuildMachine) -> Slot | None:
    """Upstream `acquire-build-slot`: the first slot file we can lock without waiting."""
    directory = os.path.join(state_dir, "offload", machine.slot_name)
    os.makedirs(directory, exist_ok=True)
    for n in range(machine.parallel_builds):
        path = os.path.join(directory, str(n))
        if path in _HELD:
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if lock_fd(fd, "w", False):
                return Slot(fd, path)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        os.close(fd)
    return None


@dataclass
class Choice:
    """The outcome: a machine with its slot, or why there is none."""

    machine: BuildMachine | None = None
    slot: Slot | None = None
    #: Some candidate is busy (no free slot): trying again later may succeed.
    busy: bool = False


def pick_machine(
    candidates: list[BuildMachine], *, state_dir: str, rng: random.Random | None = None
) -> Choice:
    """Steps 1 and 2 of `choose-build-machine`: a slot on every candidate that has one free,
    random order then decreasing speed, the first one kept and the other slots released.
    Step 3, the load and disk space check (`suitable`), is made by the process that runs the
    build, so that the daemon's build loop never waits for an SSH connection; an unsuitable
    machine sends the build back to be placed again without it."""
    rng = rng or random.Random()
    shuffled = list(candidates)
    rng.shuffle(shuffled)
    choice = Choice()
    with_slots: list[tuple[BuildMachine, Slot]] = []
    for m in shuffled:
        slot = acquire_slot(state_dir, m)
        if slot is None:
            choice.busy = True
        else:
            with_slots.append((m, slot))
    with_slots.sort(key=lambda ms: -ms[0].speed)  # stable: equal speeds stay shuffled
    if with_slots:
        choice.machine, choice.slot = with_slots[0]
        for _, other in with_slots[1:]:
            other.release()
    return choice


def suitable(machine: BuildMachine, status: RemoteStatus, report: Callable[[str], None]) -> bool:
    """Step 3: the machine's normalised load is below its `overload-threshold` (unless #f) and
    it has 100 MiB free for its store; upstream's messages."""
    report(f"normalized load on machine '{machine.name}' is {status.load:.2f}\n")
    if status.free_space is not None and status.free_space < MINIMUM_DISK_SPACE:
        report(
            f"skipping machine '{machine.name}' because it is low on disk space "
            f"({status.free_space / 2**20:.2f} MiB free)\n"
        )
        return False
    threshold = machine.overload_threshold
    return threshold is None or status.load < threshold
