"""Process titles of the daemon: what `guix processes` (and ps) read for each daemon process.

Upstream's `guix processes` (guix/scripts/processes.scm) takes a process whose command line
starts with a `guix-daemon` program for a daemon process, and one whose second argument is a
number for a session serving the client with that pid (nix-daemon.cc writes the client's pid over
`argv[1]` of the forked session process).  Our sessions are pre-forked Python workers, so the
daemon renames its processes by rewriting their original argument area (what /proc/PID/cmdline
shows) and their `comm` (`prctl`): the main process and idle workers read `guix-daemon ARGS…`, a
worker serving a local client reads `guix-daemon CLIENT-PID ARGS…` until the session ends.  A TCP
client has no pid: as upstream, its session keeps the idle name.  The `guix processes` command
itself is `guixsvc.processes`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

__all__ = ["set_daemon_title", "set_process_title", "set_session_title"]

_PR_SET_NAME = 15


def _argument_area() -> tuple[int, int] | None:
    """(address, size) of this process's original argument strings (`arg_start`/`arg_end`
    of /proc/self/stat, fields 48 and 49)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        start, end = int(fields[48 - 3]), int(fields[49 - 3])
    except (OSError, ValueError, IndexError):
        return None
    if not start or end <= start:
        return None
    return start, end - start


_AREA = None if sys.platform != "linux" else _argument_area()
_DAEMON_ARGS: list[str] = []


def set_process_title(args: Sequence[str]) -> None:
    """Make /proc/self/cmdline read ARGS (NUL-separated, cut to the original area) and
    /proc/self/comm the first one's base name."""
    if _AREA is None:
        return
    start, size = _AREA
    data = b"".join(os.fsencode(a) + b"\0" for a in args)[: size - 1]
    data = data.ljust(size, b"\0")  # the last byte stays NUL: the kernel reads the area as is
    ctypes.memmove(start, data, size)
    name = os.fsencode(os.path.basename(args[0]))[:15] if args else b""
    if name:
        _libc().prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def set_daemon_title(args: Sequence[str] | None = None) -> None:
    """`guix-daemon ARGS…`: the main process and idle workers.  ARGS (the daemon's options)
    are remembered from the first call, in the main process."""
    if args is not None:
        rest = list(args)
        while rest and rest[0].isdigit():  # never mistaken for a session's client pid
            rest.pop(0)
        _DAEMON_ARGS[:] = rest
    set_process_title(["guix-daemon", *_DAEMON_ARGS])


def set_session_title(client_pid: int) -> None:
    """`guix-daemon CLIENT-PID ARGS…`: a worker serving a local client."""
    set_process_title(["guix-daemon", str(client_pid), *_DAEMON_ARGS])
