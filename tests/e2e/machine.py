"""A booted systemd in a container, driven through the API of NixOS's test driver.

Each `Machine` boots a copy-on-write view (overlayfs) of the cached Debian root with
`systemd-nspawn --boot` and runs commands in it with `nsenter` into the container's PID 1
namespaces (machinectl needs systemd-machined on the host, which we cannot rely on).  The method
names and return values follow NixOS's `test-driver` (`start`, `succeed`, `fail`, `execute`,
`wait_for_unit`, `wait_until_succeeds`, `wait_for_open_port`, `systemctl`, `shutdown`, ...) so the
scenario scripts under `scenarios/` run unchanged under `nixos-tests/`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(AssertionError):
    """A command or wait in the machine did not go as the scenario required."""


def _children(pid: int) -> list[int]:
    result = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            result.append(int(entry))
    return result


class Machine:
    """One container.  `root` is the cached Debian root (read-only lower layer)."""

    def __init__(
        self,
        name: str,
        root: Path,
        workdir: Path,
        *,
        network_zone: str | None = None,
        binds: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.name = name
        self.image = root
        self.dir = workdir / name
        self.network_zone = network_zone
        self.binds = binds
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.merged = self.dir / "root"
        self.timings: dict[str, float] = {}

    # -- life cycle ----------------------------------------------------------------------------

    def _mount_overlay(self) -> None:
        for sub in ("upper", "work", "root"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.merged):
            return
        options = f"lowerdir={self.image},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.merged)], check=True
        )

    def start(self, timeout: float = 60) -> None:
        if self.process is not None:
            return
        started = time.monotonic()
        self._mount_overlay()
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={self.merged}",
            f"--machine={self.name}",
            f"--hostname={self.name}",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
        ]
        if self.network_zone:
            cmd.append(f"--network-zone={self.network_zone}")
        else:
            cmd.append("--private-network")
        for source, target in self.binds:
            cmd.append(f"--bind-ro={source}:{target}")
        env = dict(os.environ, SYSTEMD_NSPAWN_TMPFS_TMP="1")
        self.log_file = open(self.dir / "console.log", "wb")  # noqa: SIM115 - closed in shutdown
        self.process = subprocess.Popen(
            cmd, stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.process.poll() is not None:
                raise MachineError(f"{self.name}: systemd-nspawn exited: {self._console_tail()}")
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: no container init after {timeout}s")
            for child in _children(self.process.pid):
                with contextlib.suppress(OSError):
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                    if comm in ("systemd", "init"):
                        self.leader = child
            if self.leader is None:
                time.sleep(0.05)
        # systemctl needs PID 1's private bus socket, which appears a moment after exec.
        self.wait_until_succeeds("test -S /run/systemd/private", timeout=int(timeout))
        _status, out = self.execute("systemctl is-system-running --wait", timeout=timeout)
        if out.strip() not in ("running", "degraded"):
            raise MachineError(f"{self.name}: boot ended as {out.strip()!r}")
        self.timings["boot"] = time.monotonic() - started

    def _console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "console.log").read_text(errors="replace")[-3000:]
        return ""

    def shutdown(self, timeout: float = 30) -> None:
        """Power off (NixOS: `shutdown`) and release the overlay."""
        if self.process is None:
            return
        if self.process.poll() is None:
            # SIGRTMIN+4 asks systemd for a clean poweroff; nspawn then exits.
            with contextlib.suppress(ProcessLookupError):
                if self.leader:
                    os.kill(self.leader, signal.SIGRTMIN + 4)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()
        self.process = None
        self.leader = None
        for _ in range(20):
            if not os.path.ismount(self.merged):
                break
            if subprocess.run(["umount", str(self.merged)], check=False).returncode:
                time.sleep(0.2)

    crash = shutdown

    def is_up(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- commands ------------------------------------------------------------------------------

    def _nsenter(self, command: str) -> list[str]:
        if self.leader is None:
            raise MachineError(f"{self.name} is not running; call start() first")
        return [
            "nsenter", f"--target={self.leader}",
            "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
            "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "HOME=/root",
            "/bin/sh", "-c", command,
        ]  # fmt: skip

    def execute(
        self, command: str, check_return: bool = True, timeout: float | None = 900
    ) -> tuple[int, str]:
        """Run a shell command; (exit status, stdout).  stderr goes to the log."""
        result = subprocess.run(
            self._nsenter(command),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        self.last_stderr = result.stderr.decode(errors="replace")
        return result.returncode, result.stdout.decode(errors="replace")

    def succeed(self, *commands: str, timeout: float | None = None) -> str:
        output = ""
        for command in commands:
            status, out = self.execute(command, timeout=timeout)
            if status != 0:
                raise MachineError(
                    f"{self.name}: command `{command}` failed (exit code {status})\n"
                    f"stdout: {out}\nstderr: {self.last_stderr}"
                )
            output += out
        return output

    def fail(self, *commands: str, timeout: float | None = None) -> str:
        output = ""
        for command in commands:
            status, out = self.execute(command, timeout=timeout)
            if status == 0:
                raise MachineError(f"{self.name}: command `{command}` unexpectedly succeeded")
            output += out
        return output

    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status, out = self.execute(command, timeout=timeout)
            if status == 0:
                return out
            if time.monotonic() > deadline:
                raise MachineError(
                    f"{self.name}: `{command}` did not succeed within {timeout}s "
                    f"(last exit {status}): {out}{self.last_stderr}"
                )
            time.sleep(0.2)

    def wait_until_fails(self, command: str, timeout: int = 900) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status, out = self.execute(command, timeout=timeout)
            if status != 0:
                return out
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: `{command}` kept succeeding for {timeout}s")
            time.sleep(0.2)

    def systemctl(self, q: str, user: str | None = None) -> tuple[int, str]:
        if user is not None:
            q = f"--user --machine={shlex.quote(user)}@ {q}"
        return self.execute(f"systemctl {q}")

    def get_unit_info(self, unit: str) -> dict[str, str]:
        status, out = self.systemctl(f"--no-pager show {shlex.quote(unit)}")
        if status != 0:
            raise MachineError(f"{self.name}: cannot get unit info for {unit}: {out}")
        info = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            info[key] = value
        return info

    def wait_for_unit(self, unit: str, user: str | None = None, timeout: int = 900) -> None:
        """Wait until `unit` is active; fail at once if it failed (NixOS semantics)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_unit_info(unit)
            state = info.get("ActiveState")
            if state == "active":
                return
            if state == "failed":
                raise MachineError(
                    f"{self.name}: unit {unit} reached state failed\n{self._journal(unit)}"
                )
            if state == "inactive":
                if info.get("LoadState") != "loaded":
                    raise MachineError(f"{self.name}: unit {unit} is not loaded")
                _status, jobs = self.systemctl("list-jobs --full 2>&1")
                if "No jobs" in jobs and self.get_unit_info(unit).get("ActiveState") == state:
                    raise MachineError(
                        f"{self.name}: unit {unit} is inactive and there are no pending jobs"
                    )
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: unit {unit} still {state} after {timeout}s")
            time.sleep(0.1)

    def _journal(self, unit: str) -> str:
        return self.execute(f"journalctl --no-pager -n 40 -u {shlex.quote(unit)}")[1]

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        probe = (
            "python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], "
            f"int(sys.argv[2])), 1).close()' {shlex.quote(addr)} {port}"
        )
        self.wait_until_succeeds(probe, timeout)

    def wait_for_file(self, filename: str, timeout: int = 900) -> None:
        self.wait_until_succeeds(f"test -e {shlex.quote(filename)}", timeout)

    def copy_from_host(self, source: str, target: str) -> None:
        """Copy a host file or directory into the running machine (NixOS: same name)."""
        dest = self.merged / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--", source, str(dest)], check=True)

    def log(self, message: str) -> None:
        print(f"{self.name}: {message}", flush=True)

    @contextlib.contextmanager
    def nested(self, message: str) -> Iterator[None]:
        started = time.monotonic()
        self.log(message)
        yield
        self.timings[message] = time.monotonic() - started
