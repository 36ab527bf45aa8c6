"""OpenSSH as the offload transport: the remote daemon's socket, forwarded by `ssh -L`.

Upstream `guix offload` talks to the build machine's daemon through Guile-SSH and `guix repl`
on the remote side.  We want the same reach with nothing installed remotely but sshd and a
daemon (ours or upstream's), so we let OpenSSH do the forwarding: `ssh -N -L LOCAL:REMOTE`
listens on a Unix socket in a private (0700) directory of ours and opens a
`direct-streamlocal@openssh.com` channel to the remote daemon's socket for each connection
(sshd's default `AllowStreamLocalForwarding yes`); our worker-protocol client (`DaemonClient`)
connects to that socket.  No remote program.  (`ssh -W` takes only host:port in OpenSSH 9.2.)

The host is authenticated with the machine's `host-key` only: a private known_hosts file holding
that key under a fixed alias (`HostKeyAlias`), `StrictHostKeyChecking=yes`, no user or global
configuration (upstream uses "/dev/null" for both), batch mode (no prompts).  The load and free
space of a machine come from a plain remote command (`/proc/loadavg`, `nproc`, `df`), which any
Linux build machine, Guix System or not, answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

from guixsvc.offload.machines import BuildMachine
from guixsvc.protocol.client import CLIENT_VERSION, DaemonClient

HOST_ALIAS = "guixsvc-offload-machine"
_END = "guixsvc-offload-status-end"
SHORT_TIMEOUT = 15  # upstream's %short-timeout


class TransportError(Exception):
    """The machine could not be reached (connection, authentication, host key, remote gone)."""


def ssh_program() -> str:
    return os.environ.get("GUIXSVC_SSH", "ssh")


def _host_key_algorithms(key_type: str) -> str:
    if key_type == "ssh-rsa":
        return "rsa-sha2-512,rsa-sha2-256,ssh-rsa"
    return key_type


class _SocketClient(DaemonClient):
    """A DaemonClient over an already connected stream socket."""

    def __init__(self, sock: socket.socket, log: Callable[[str], None] | None = None) -> None:
        self.sock = sock
        self.rfile = cast(BinaryIO, sock.makefile("rb", buffering=65536))
        self.version = CLIENT_VERSION
        self.log = log
        self._handshake(True)


def _parse_status(lines: list[str]) -> RemoteStatus:
    load = 1.0
    try:
        one = float(lines[0].split()[0])
        cores = max(int(lines[1]), 1)
        load = min(one / cores, 1.0)
    except (IndexError, ValueError):
        load = 1.0  # a misbehaving node counts as fully loaded, as upstream
    free: int | None = None
    with contextlib.suppress(IndexError, ValueError):
        free = int(lines[2].split()[3]) * 1024
    uname = lines[3].split() if len(lines) > 3 else []
    now: float | None = None
    with contextlib.suppress(IndexError, ValueError):
        now = float(lines[4])
    return RemoteStatus(load, free, uname, now)


@dataclass
class RemoteStatus:
    load: float  # normalised, in [0, 1]
    free_space: int | None  # bytes available on the store's file system
    uname: list[str]
    time: float | None


class Transport:
    """SSH access to one build machine."""

    def __init__(self, machine: BuildMachine, timeout: int = SHORT_TIMEOUT) -> None:
        self.machine = machine
        self.timeout = timeout
        self._dir = tempfile.mkdtemp(prefix="guixsvc-offload-")
        self.known_hosts = os.path.join(self._dir, "known_hosts")
        parts = machine.host_key.split()
        if len(parts) < 2:
            self.close()
            raise TransportError(
                f"invalid host key for machine '{machine.name}': '{machine.host_key}'"
            )
        self.key_type = parts[0]
        with open(self.known_hosts, "w") as f:
            f.write(f"{HOST_ALIAS} {parts[0]} {parts[1]}\n")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.local_socket = os.path.join(self._dir, "daemon.sock")
        self.session: subprocess.Popen[bytes] | None = None
        self._status: RemoteStatus | None = None
        self._stderr_fd: int | None = None

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()
        self.procs = []
        self.session = None
        if self._stderr_fd is not None:
            os.close(self._stderr_fd)
            self._stderr_fd = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # a worker that ends abruptly still ends its sessions
        with contextlib.suppress(Exception):
            if self.procs:
                self.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, *extra: str) -> list[str]:
        m = self.machine
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": self.known_hosts,
            "GlobalKnownHostsFile": "/dev/null",
            "HostKeyAlias": HOST_ALIAS,
            "HostKeyAlgorithms": _host_key_algorithms(self.key_type),
            "CheckHostIP": "no",
            "IdentitiesOnly": "yes",
            "IdentityFile": m.key_file,
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "ConnectTimeout": str(self.timeout),
            "ServerAliveInterval": "10",
            "ServerAliveCountMax": "3",
            "ControlMaster": "no",
            "ControlPath": "none",
            "Compression": "yes" if "zlib" in m.compression else "no",
            "LogLevel": "ERROR",
        }
        args = [ssh_program(), "-F", "/dev/null", "-p", str(m.port), "-l", m.user]
        for k, v in options.items():
            args += ["-o", f"{k}={v}"]
        return [*args, *extra]

    def _failure(self, stderr: bytes) -> TransportError:
        text = stderr.decode(errors="replace")
        name = self.machine.name
        if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION" in text:
            return TransportError(
                f"server at '{name}' returned a host key other than '{self.machine.host_key}'"
                " (host key verification failed)"
            )
        lines = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.startswith("@") and "Warning: Permanently" not in line
        ]
        return TransportError(
            f"failed to connect to '{name}': {lines[-1] if lines else 'ssh failed'}"
        )

    def status(self, store_dir: str) -> RemoteStatus:
        """Upstream `node-load` and `node-free-disk-space`, read through the session that also
        forwards the daemon socket (`open`): one SSH connection serves the choice and the
        build."""
        if self.session is None:
            self.open(store_dir)
        assert self._status is not None
        return self._status

    def open(self, store_dir: str) -> None:
        """One SSH session: the remote daemon socket forwarded to `self.local_socket`
        (`-L`), and a remote shell that prints the machine's status each time it reads a line
        (`refresh`); its standard input keeps the session, and the forwarding, open until
        `close`, so one connection can serve many builds."""
        local = self.local_socket
        command = (
            "while read _; do cat /proc/loadavg; nproc; "
            f"df -Pk '{store_dir}' 2>/dev/null | tail -n 1 | grep . || echo; uname -srnm; "
            f"date +%s; echo {_END}; done"
        )
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                self.argv(
                    "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
                    "-L", f"{local}:{self.machine.daemon_socket}", self.machine.name, command,
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err_w,
            )  # fmt: skip
        except OSError as exc:
            os.close(err_r)
            raise TransportError(f"cannot run ssh: {exc.strerror}") from None
        finally:
            os.close(err_w)
        self.procs.append(proc)
        self.session = proc
        self._stderr_fd = err_r
        deadline = time.monotonic() + self.timeout + 5
        self._status = self._query(deadline)
        while not os.path.exists(local):  # the listener is set up before the session
            if proc.poll() is not None or time.monotonic() > deadline:
                raise self._failure(self._read_stderr())
            time.sleep(0.005)

    def refresh(self, store_dir: str) -> RemoteStatus:
        """The machine's status now, through the open session (opened first if need be).  Safe
        to call from several processes sharing the session (a lock file serialises them)."""
        if self.session is None:
            self.open(store_dir)
            assert self._status is not None
            return self._status
        fd = os.open(os.path.join(self._dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            self._status = self._query(time.monotonic() + self.timeout)
            return self._status
        finally:
            os.close(fd)

    def alive(self) -> bool:
        return self.session is not None and self.session.poll() is None

    def _query(self, deadline: float) -> RemoteStatus:
        proc = self.session
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        out = b""
        fd = proc.stdout.fileno()
        try:
            os.write(proc.stdin.fileno(), b"\n")
            while _END.encode() not in out:
                left = deadline - time.monotonic()
                ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
                chunk = os.read(fd, 4096) if ready else b""
                if not chunk:
                    raise OSError("no answer")
                out += chunk
        except OSError:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(1)
            raise self._failure(self._read_stderr()) from None
        return _parse_status(out.decode(errors="replace").splitlines())

    def connect_daemon(
        self, log: Callable[[str], None] | None = None, store_dir: str = "/gnu/store"
    ) -> DaemonClient:
        """A worker-protocol connection to the machine's daemon socket through the session's
        forwarding (opened first if need be)."""
        if self.session is None:
            self.open(store_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.local_socket)
            return _SocketClient(sock, log)
        except (EOFError, OSError) as exc:
            sock.close()
            detail = self.stderr_text() or str(exc)
            raise TransportError(
                f"failed to talk to the daemon at '{self.machine.daemon_socket}' on "
                f"'{self.machine.name}': {detail}"
            ) from None

    def _read_stderr(self) -> bytes:
        fd = self._stderr_fd
        if fd is None:
            return b""
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
            return os.read(fd, 65536)
        return b""

    def stderr_text(self) -> str:
        """What ssh reported so far (after a connection broke)."""
        return self._read_stderr().decode(errors="replace").strip()
