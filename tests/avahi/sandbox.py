"""Private "machines" for mDNS tests: each one is a network + mount + UTS namespace with its
own hostname, a private tmpfs on /run, a system-bus-like dbus-daemon on
/run/dbus/system_bus_socket and a real avahi-daemon on it.  Two machines are joined by a veth
pair so that one sees the other's announcements as remote (upstream's discovery ignores
services of the local Avahi daemon).  Nothing touches the host's /run, network or buses.

Run as ``python -m tests.avahi.sandbox NAME ADDRESS/PREFIX WORKDIR [PEER_PID]`` inside
``unshare -n -m -u``; it prints ``ready`` once avahi-daemon runs, then waits for SIGTERM.
Test commands join a machine with nsenter.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
IFACE = "gx0"

DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONFIG = """[server]
host-name={name}
use-ipv4=yes
use-ipv6=no
allow-interfaces={iface}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
publish-aaaa-on-ipv4=no
[reflector]
[rlimits]
"""


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(argv: list[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, env=env
    )


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def machine_main(name: str, address: str, workdir: str, peer_pid: str | None) -> int:
    """The body of one machine (already inside its namespaces)."""
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        socket.sethostname(name)
        _sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
        os.makedirs("/run/dbus")
        os.makedirs("/run/avahi-daemon")
        _sh("ip", "link", "set", "lo", "up")
        if peer_pid:
            _sh("ip", "link", "add", "name", IFACE, "type", "veth", "peer", "name", IFACE,
                "netns", peer_pid)  # fmt: skip
        deadline = time.monotonic() + 20
        while f"{IFACE}:" not in Path("/proc/self/net/dev").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("no veth from the peer machine")
            time.sleep(0.02)
        _sh("ip", "addr", "add", address, "dev", IFACE)
        _sh("ip", "link", "set", IFACE, "multicast", "on", "up")
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        (work / "bus.conf").write_text(DBUS_CONFIG.format(address=SYSTEM_BUS))
        (work / "avahi.conf").write_text(AVAHI_CONFIG.format(name=name, iface=IFACE))
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=SYSTEM_BUS)
        with open(work / "dbus.log", "wb") as log:
            bus = ["dbus-daemon", f"--config-file={work / 'bus.conf'}", "--nofork", "--nopidfile"]
            procs.append(_start(bus, log, env))
        while not os.path.exists("/run/dbus/system_bus_socket"):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dbus-daemon did not start")
            time.sleep(0.02)
        with open(work / "avahi.log", "wb") as log:
            daemon = ["avahi-daemon", "-f", str(work / "avahi.conf"), "--no-drop-root",
                      "--no-chroot", "--no-rlimits", "--no-proc-title", "--debug"]  # fmt: skip
            procs.append(_start(daemon, log, env))
        _wait_avahi_running(procs[1], deadline)
        print("ready", flush=True)
        while True:
            signal.pause()
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_avahi_running(proc: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        r = subprocess.run(
            ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.Avahi", "/",
             "org.freedesktop.Avahi.Server.GetState"],
            capture_output=True, text=True,
            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=SYSTEM_BUS),
        )  # fmt: skip
        if r.returncode == 0 and r.stdout.split()[-1:] == ["2"]:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"avahi-daemon did not come up: {r.stderr.strip()}")
        time.sleep(0.1)


# -- the test side ------------------------------------------------------------------------------


def skip_unless_possible() -> None:
    """Skip with the precise reason when machines cannot be made here."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network/mount namespaces for private avahi-daemons")
    missing = [
        f"{tool} (Debian package {pkg})"
        for tool, pkg in [
            ("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2"),
            ("dbus-daemon", "dbus-daemon"), ("dbus-send", "dbus-bin"),
            ("avahi-daemon", "avahi-daemon"), ("avahi-browse", "avahi-utils"),
        ]
        if shutil.which(tool) is None
    ]  # fmt: skip
    if missing:
        pytest.skip("missing " + ", ".join(missing))
    try:
        import dbus_fast  # noqa: F401
    except ImportError:
        pytest.skip("Python package dbus-fast is not installed (pip install 'dbus-fast>=2')")
    probe = subprocess.run(
        ["unshare", "-n", "-m", "-u", "--propagation", "private", "sh", "-c",
         "ip link add name gxa type veth peer name gxb && mount -t tmpfs tmpfs /run"],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot make namespaces with a veth pair: {probe.stderr.strip()}")


class Machine:
    def __init__(self, name: str, address: str, workdir: Path, peer: Machine | None = None):
        self.name = name
        self.address = address.split("/")[0]
        self.workdir = workdir
        argv = [
            "unshare", "-n", "-m", "-u", "--propagation", "private",
            sys.executable, "-m", "tests.avahi.sandbox", name, address, str(workdir),
        ]  # fmt: skip
        if peer is not None:
            argv.append(str(peer.pid))
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=open(workdir / "machine.log", "wb"),  # noqa: SIM115
            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
        )  # fmt: skip
        self.pid = self.proc.pid
        self.children: list[subprocess.Popen[bytes]] = []

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(
                f"machine {self.name} failed:\n"
                + (self.workdir / "machine.log").read_text(errors="replace")
                + "\n".join(
                    (self.workdir / n).read_text(errors="replace")
                    for n in ("dbus.log", "avahi.log")
                    if (self.workdir / n).exists()
                )
            )

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", "--uts", "--", *cmd]

    def env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=SYSTEM_BUS, PYTHONPATH=str(ROOT), **extra)

    def spawn(
        self, *cmd: str, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            p = subprocess.Popen(
                self.argv(*cmd), stdout=f, stderr=subprocess.STDOUT, env=env or self.env(),
                cwd=ROOT,
            )  # fmt: skip
        self.children.append(p)
        return p

    def run(
        self, *cmd: str, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*cmd), capture_output=True, text=True, timeout=timeout,
            env=env or self.env(), cwd=ROOT,
        )  # fmt: skip

    def stop(self) -> None:
        for p in reversed(self.children):
            stop(p)
        stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(machine_main(sys.argv[1], sys.argv[2], sys.argv[3], (sys.argv[4:] or [None])[0]))
