"""`guixsvc offload test|status [MACHINES-FILE [REGEXP]]`: upstream's `guix offload` checks.

`test` connects to each machine (deduplicated by name and port), makes its daemon add a text
item, sends it one of ours and takes one of its items back, which checks the whole chain the
daemon uses when offloading: SSH and the host key, the remote daemon socket, and the signing
keys authorised on both sides.  `status` prints each machine's kernel, architecture, host name,
normalised load, free store space and clock difference.  Messages and output are upstream's
(`guix offload: ...`); upstream's `guix repl` checks have no equivalent because nothing but
sshd and a daemon is needed on the machine.
"""

from __future__ import annotations

import io
import random
import re
import socket
import sys
import time
from collections.abc import Sequence

from guixsvc.offload.machines import (
    BuildMachine,
    MachinesError,
    default_machines_file,
    load_machines,
)
from guixsvc.offload.transport import SHORT_TIMEOUT, Transport, TransportError
from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.protocol.wire import encode_int
from guixsvc.store.config import StoreConfig

PROG = "guix offload"

USAGE = """Usage: guixsvc offload test|status [MACHINES-FILE [REGEXP]]
Test the build machines listed in MACHINES-FILE (default '{file}'), or show their status;
REGEXP restricts the machines to those whose name matches.
"""


class _Leave(Exception):
    pass


def _info(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")


def _nonce(name: str | None = None) -> str:
    return f"{name or socket.gethostname()}-{random.randrange(1000000)}"


def _machines(rest: list[str]) -> tuple[str, list[BuildMachine]]:
    if len(rest) > 2:
        raise _Leave("wrong number of arguments")
    file_name = rest[0] if rest else default_machines_file()
    pattern = re.compile(rest[1]) if len(rest) == 2 else None
    machines: list[BuildMachine] = []
    seen: set[tuple[str, int]] = set()
    warnings: list[str] = []
    for m in load_machines(file_name, warnings):
        if (m.name, m.port) in seen or (pattern and not pattern.search(m.name)):
            continue
        seen.add((m.name, m.port))
        machines.append(m)
    for w in warnings:
        sys.stderr.write(w + "\n")
    return file_name, machines


def _archive(data: bytes) -> io.BytesIO:
    return io.BytesIO(encode_int(1) + data + encode_int(0))


def check_availability(file_name: str, machines: list[BuildMachine]) -> None:
    """Upstream `check-machine-availability`."""
    _info(f"testing {len(machines)} build machines defined in '{file_name}'...")
    transports = [Transport(m, SHORT_TIMEOUT) for m in machines]
    try:
        remotes: list[DaemonClient] = []
        for m, t in zip(machines, transports, strict=True):
            try:
                remote = t.connect_daemon()
            except TransportError as exc:
                raise _Leave(str(exc)) from None
            remotes.append(remote)
            try:
                item = remote.add_text_to_store("test", "Hello, build machine!")
            except (DaemonError, OSError, EOFError) as exc:
                raise _Leave(
                    f"failed to talk to guix-daemon on '{m.name}' (test returned {exc})"
                ) from None
            _info(f"Guix is usable on '{m.name}' (test returned \"{item}\")")
        with DaemonClient() as local:
            for m, remote in zip(machines, remotes, strict=True):
                item = local.add_text_to_store("export-test", _nonce())
                try:
                    remote.import_paths(_archive(local.export_path(item)))
                except DaemonError as exc:
                    raise _Leave(
                        f"'{item}' was not properly imported on '{m.name}': {exc}"
                    ) from None
                if not remote.is_valid_path(item):
                    raise _Leave(f"'{item}' was not properly imported on '{m.name}'")
                _info(f"'{m.name}' successfully imported '{item}'")
            for m, remote in zip(machines, remotes, strict=True):
                item = remote.add_text_to_store("import-test", _nonce(m.name))
                try:
                    local.import_paths(_archive(remote.export_path(item)))
                except DaemonError as exc:
                    raise _Leave(f"failed to import '{item}' from '{m.name}': {exc}") from None
                if not local.is_valid_path(item):
                    raise _Leave(f"failed to import '{item}' from '{m.name}'")
                _info(f"successfully imported '{item}' from '{m.name}'")
        for remote in remotes:
            remote.close()
    finally:
        for t in transports:
            t.close()


def check_status(file_name: str, machines: list[BuildMachine]) -> None:
    """Upstream `check-machine-status`."""
    _info(f"getting status of {len(machines)} build machines defined in '{file_name}'...")
    store_dir = StoreConfig.from_env(daemon=False).store_dir
    for m in machines:
        now = time.time()
        try:
            with Transport(m, SHORT_TIMEOUT) as t:
                status = t.status(store_dir)
        except TransportError as exc:
            sys.stderr.write(f"{PROG}: warning: {exc}\n")
            continue
        remote_time = int(status.time) if status.time is not None else int(now)
        if remote_time < int(now):
            sys.stderr.write(
                f"{PROG}: warning: machine '{m.name}' is {int(now) - remote_time} seconds behind\n"
            )
        sysname, nodename, release, machine = (status.uname + ["?"] * 4)[:4]
        free = (status.free_space or 0) / 2**20
        sys.stdout.write(
            f"{m.name}\n  kernel: {sysname} {release}\n  architecture: {machine}\n"
            f"  host name: {nodename}\n  normalized load: {status.load:.2f}\n"
            f"  free disk space: {free:.2f} MiB\n  time difference: {remote_time - int(now)} s\n"
        )
    sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE.format(file=default_machines_file()))
        return 0 if args else 1
    if args[0] == "--version":
        from guixsvc import __version__

        sys.stdout.write(f"guix offload (guixsvc) {__version__}\n")
        return 0
    try:
        if args[0] == "test":
            check_availability(*_machines(args[1:]))
        elif args[0] == "status":
            check_status(*_machines(args[1:]))
        else:
            raise _Leave("invalid arguments: " + " ".join(f'"{a}"' for a in args))
    except (_Leave, MachinesError, re.error) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except (OSError, DaemonError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    return 0
