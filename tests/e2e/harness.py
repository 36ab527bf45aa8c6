"""Build our wheel and units once, and provision booted Debian machines with them.

A machine is provisioned before it boots (`systemd-nspawn --pipe` in the stopped root, no
network needed): the wheel is installed into Debian's python3 with pip (its dependencies come from
Debian packages already in the root), the units rendered by `guixsvc units --prefix /usr/local`
are installed into /etc/systemd/system and enabled exactly as an administrator would, the build
users come from the sysusers.d file, and a static busybox is put where scenarios can add it to
the store as a builder.  So what boots is a system where nothing but the sockets (and the store
mount and the gc timer) is started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.machine import Machine

REPO = Path(__file__).resolve().parents[2]
# Inside the machines.
PROVISION_DIR = "/opt/guixsvc-e2e"
BUSYBOX = f"{PROVISION_DIR}/busybox"
ENABLED_UNITS = ("gnu-store.mount", "guix-daemon.socket", "guix-publish.socket", "guix-gc.timer")


def build_wheel(dest: Path) -> Path:
    """`pip wheel --no-deps` of the working tree (build backend from PyPI, as pip does)."""
    dest.mkdir(parents=True, exist_ok=True)
    had_build_dir = (REPO / "build").exists()
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--wheel-dir", str(dest), str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if not had_build_dir:
        # setuptools leaves a build/ directory behind in the source tree.
        shutil.rmtree(REPO / "build", ignore_errors=True)
    wheels = sorted(dest.glob("guixsvc-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"pip wheel failed:\n{result.stdout}{result.stderr}")
    return wheels[-1]


def render_units(dest: Path, *, rootless: bool = False) -> Path:
    """Units for a machine where pip installed our console scripts in /usr/local/bin
    (`rootless`: `guixsvc units --rootless`, the daemon as the `guix-daemon` user)."""
    from guixsvc.units import UnitSettings, render, write_units

    rendered = render(UnitSettings(prefix="/usr/local", rootless=rootless))
    write_units(rendered, dest / "units", dest / "sysusers.conf")
    return dest


def find_busybox() -> str | None:
    """A statically linked busybox (Debian busybox-static) to use as a builder in the store."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(candidate):
            out = subprocess.run(["ldd", candidate], capture_output=True, text=True, check=False)
            if "not a dynamic executable" in out.stdout + out.stderr:
                return candidate
    return None


def provision(
    machine: Machine, wheel: Path, rendered: Path, busybox: str | None, *, rootless: bool = False
) -> float:
    """Install guixsvc and its units into the machine's root before it boots (`rootless`: the
    store and data directories handed to `guix-daemon` by `guixsvc migrate-store`)."""
    started = time.monotonic()
    machine._mount_overlay()
    root = machine.merged
    target = root / PROVISION_DIR.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, target / wheel.name)
    if busybox:
        shutil.copy2(busybox, target / "busybox")
    # systemd sets the host name from /etc/hostname, over nspawn's --hostname.
    (root / "etc/hostname").write_text(f"{machine.name}\n")
    units_dir = root / "etc/systemd/system"
    for unit in sorted((rendered / "units").iterdir()):
        shutil.copy2(unit, units_dir / unit.name)
    (root / "etc/sysusers.d").mkdir(parents=True, exist_ok=True)
    shutil.copy2(rendered / "sysusers.conf", root / "etc/sysusers.d/guix.conf")
    script = " && ".join(
        [
            "pip install --quiet --no-deps --no-index --break-system-packages "
            f"--root-user-action=ignore {PROVISION_DIR}/{wheel.name}",
            "systemd-sysusers",
            "mkdir -p /gnu/store /var/guix /etc/guix",
            *(["guixsvc migrate-store --to-user=guix-daemon"] if rootless else []),
            "systemctl enable " + " ".join(ENABLED_UNITS),
        ]
    )
    result = subprocess.run(
        [
            "systemd-nspawn", "--quiet", "--pipe", "--register=no", "--keep-unit",
            "--private-network", f"--directory={root}", "/bin/sh", "-c", script,
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"provisioning {machine.name} failed:\n{result.stdout}{result.stderr}")
    return time.monotonic() - started


SUBNET = "192.168.1"


def connect_zone(zone: str, machines: list[Machine]) -> dict[str, str]:
    """Bring the zone's bridge up and address the machines on it; name → address."""
    bridge = f"vz-{zone}"
    subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
    addresses = {m.name: f"{SUBNET}.{n}" for n, m in enumerate(machines, 1)}
    hosts = "".join(f"{addr} {name}\n" for name, addr in addresses.items())
    for machine in machines:
        machine.succeed(
            "ip link set host0 up",
            f"ip address add {addresses[machine.name]}/24 dev host0",
            f"printf %s '{hosts}' >> /etc/hosts",
        )
    # Reachability without touching the peers' services: a connection to a closed port is
    # refused at once when packets flow.  A host firewall that filters bridged traffic (Docker's
    # FORWARD policy with br_netfilter) drops them instead.
    probe = (
        "python3 -c 'import socket, sys\n"
        "try: socket.create_connection((sys.argv[1], 9), 2)\n"
        "except ConnectionRefusedError: sys.exit(0)\n"
        "except OSError: sys.exit(1)\n"
        "sys.exit(2)' "
    )
    first, *others = machines
    for other in others:
        try:
            first.wait_until_succeeds(probe + other.name, timeout=20)
        except AssertionError as exc:
            nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
            hint = f"; {nf} = {nf.read_text().strip()}" if nf.exists() else ""
            raise NetworkUnavailable(
                f"{first.name} cannot reach {other.name} over bridge {bridge}{hint}: {exc}"
            ) from None
    return addresses


class NetworkUnavailable(Exception):
    """The machines' private network does not carry packets on this host."""
