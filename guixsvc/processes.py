"""`guix processes` for our daemon: session processes named as upstream names them, and the
command that lists them.

Upstream's `guix processes` (guix/scripts/processes.scm) scans /proc: a process whose command
line starts with a `guix-daemon` program is a daemon process, and one whose second argument is
a number is a session serving the client with that pid (nix-daemon.cc writes the client's pid
over `argv[1]` of the forked session process).  The session's children are the processes whose
parent it is, and its locks are the open files `<store>/….lock`.

Our sessions are pre-forked Python workers that name themselves as upstream's are named
(`guixsvc.daemon.proctitle`), so this command finds them the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "DaemonSession",
    "Process",
    "daemon_sessions",
    "main",
]

PROG = "guix processes"

# --- reading /proc -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    pid: int
    parent: int | None
    command: list[str]


@dataclass
class DaemonSession:
    process: Process
    client: Process
    children: list[Process] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)


def _read_ppid(pid: str) -> int | None:
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("PPid:"):
                ppid = int(line[5:].strip())
                return ppid or None
    return None


def processes() -> list[Process]:
    """Every live process (`processes`): pid, parent (None for PID 1 and kernel threads) and
    command line (NUL-split, empty strings dropped)."""
    found = []
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            ppid = _read_ppid(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
        command = [os.fsdecode(a) for a in raw.split(b"\0") if a]
        found.append(Process(int(pid), ppid, command))
    return found


def open_files(pid: int) -> list[str]:
    directory = f"/proc/{pid}/fd"
    try:
        fds = sorted((fd for fd in os.listdir(directory) if fd.isdigit()), key=int)
    except (FileNotFoundError, PermissionError):
        return []
    files = []
    for fd in fds:
        try:
            files.append(os.readlink(f"{directory}/{fd}"))
        except (FileNotFoundError, PermissionError):
            continue
    return files


def _number(text: str) -> int | None:
    """Guile's `string->number` for what a pid argument can be (an integer)."""
    try:
        return int(text, 10)
    except ValueError:
        return None


def daemon_sessions(store_prefix: str) -> list[DaemonSession]:
    """`daemon-sessions`: the session processes of every `guix-daemon` on the machine."""
    procs = processes()
    by_pid = {p.pid: p for p in procs}
    sessions = []
    for p in procs:
        if len(p.command) < 2 or os.path.basename(p.command[0]) != "guix-daemon":
            continue
        client_pid = _number(p.command[1])
        if client_pid is None:
            continue
        client = by_pid.get(client_pid)
        if client is None:  # the client died; the session is about to end
            continue
        locks = [f for f in open_files(p.pid) if f.startswith(store_prefix) and f.endswith(".lock")]
        children = [c for c in procs if c.parent == p.pid]
        sessions.append(DaemonSession(p, client, children, locks))
    return sessions


# --- output ---------------------------------------------------------------------------------------


def _words(command: Sequence[str]) -> str:
    return "".join(f" {a}" for a in command)


def recutils(sessions: Sequence[DaemonSession]) -> str:
    """`daemon-sessions->recutils`."""
    out = []
    for s in sessions:
        out.append(f"SessionPID: {s.process.pid}\n")
        out.append(f"ClientPID: {s.client.pid}\n")
        out.append(f"ClientCommand:{_words(s.client.command)}\n")
        out.extend(f"LockHeld: {lock}\n" for lock in s.locks)
        for child in s.children:
            out.append(f"ChildPID: {child.pid}\n")
            out.append(f"ChildCommand: :{_words(child.command)}\n")  # sic, upstream's format
        out.append("\n")
    return "".join(out)


SESSION_REC_TYPE = (
    "%rec: Session\n%type: PID int\n%type: ClientPID int\n%key: PID\n"
    "%mandatory: ClientPID ClientCommand"
)
LOCK_REC_TYPE = "%rec: Lock\n%mandatory: LockHeld\n%type: Session rec Session"
CHILD_REC_TYPE = (
    "%rec: ChildProcess\n%type: PID int\n%type: Session rec Session\n%key: PID\n%mandatory: Command"
)


def normalized(sessions: Sequence[DaemonSession]) -> str:
    """`daemon-sessions->normalized-record` (including upstream's `LockHeld: testing testing`,
    which it prints instead of the lock's name)."""
    out = [SESSION_REC_TYPE, "\n\n"]
    for s in sessions:
        out.append(f"PID: {s.process.pid}\nClientPID: {s.client.pid}\n")
        out.append(f"ClientCommand:{_words(s.client.command)}\n\n")
    out += [LOCK_REC_TYPE, "\n\n"]
    for s in sessions:
        for _ in s.locks:
            out.append(f"LockHeld: testing testing\nSession: {s.process.pid}\n\n")
    out += [CHILD_REC_TYPE, "\n\n"]
    for s in sessions:
        for child in s.children:
            out.append(f"PID: {child.pid}\nCommand:{_words(child.command)}\n")
            out.append(f"Session: {s.process.pid}\n\n")
    return "".join(out)


FORMATS = ("recutils", "normalized")

HELP = """Usage: guix processes
List the current Guix sessions and their processes.

  -h, --help             display this help and exit
  -V, --version          display version information and exit

  -f, --format=FORMAT    display results as normalized record sets
      --list-formats     display available formats
"""


def main(argv: Sequence[str] | None = None) -> int:
    from guixsvc.cliargs import (
        BUG_REPORT,
        Exit,
        Option,
        UsageError,
        help_option,
        parse_command_line,
        run_command,
        version_option,
    )
    from guixsvc.store.config import StoreConfig

    args = list(sys.argv[1:] if argv is None else argv)
    chosen: dict[str, str] = {"format": "recutils"}

    def set_format(seed: object, value: str | None) -> None:
        if value not in FORMATS:
            raise UsageError(f"{value}: unsupported output format")
        chosen["format"] = value

    def list_formats(seed: object, value: str | None) -> None:
        sys.stdout.write("The available formats are:\n\n" + "".join(f"  - {f}\n" for f in FORMATS))
        raise Exit(0)

    def operand(seed: object, word: str) -> None:
        raise UsageError(f"{word}: extraneous argument")

    options: list[Option[object]] = [
        help_option(HELP + BUG_REPORT),
        version_option(PROG),
        Option(("f", "format"), set_format, required=True),
        Option(("list-formats",), list_formats),
    ]

    def body() -> int:
        parse_command_line(args, options, None, operand)
        prefix = StoreConfig.from_env(daemon=False).store_dir
        sessions = daemon_sessions(prefix)
        render = normalized if chosen["format"] == "normalized" else recutils
        sys.stdout.write(render(sessions))
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
