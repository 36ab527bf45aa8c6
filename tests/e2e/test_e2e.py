"""End-to-end: our units on a real booted systemd (Debian bookworm in systemd-nspawn).

Skips (with the reason) when not root, when GUIXSVC_E2E=0, when debootstrap or systemd-nspawn
is missing (Debian packages debootstrap, systemd-container) or cannot make/boot the root.  The
scenarios themselves live in `scenarios/` so nixos-tests can run the same scripts.
Timings of each phase are printed (`pytest -s`) and attached to the test report.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import harness, image
from tests.e2e.machine import Machine
from tests.e2e.scenarios import daemon_socket, daemon_switch, gc_timer, publish_substitute
from tests.e2e.scenarios._lib import ScenarioSkipped

pytestmark = pytest.mark.skipif(
    os.environ.get("GUIXSVC_E2E", "1") == "0", reason="disabled with GUIXSVC_E2E=0"
)

TIMINGS: dict[str, float] = {}


def _timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 2)
    print(f"e2e timing: {name} {TIMINGS[name]}s", flush=True)


@pytest.fixture(scope="session")
def e2e_root(pytestconfig: pytest.Config) -> Path:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def announce(line: str) -> None:
        # Shown even under `pytest -q` with output captured: debootstrap is a silent minute.
        with capture.global_and_fixture_disabled():
            print(f"\n{line}", flush=True)

    started = time.monotonic()
    try:
        root = image.ensure_image(announce=announce)
    except image.ImageUnavailable as exc:
        pytest.skip(f"end-to-end test unavailable: {exc}")
    _timed("image (debootstrap or cache)", started)
    probe = subprocess.run(
        ["systemd-nspawn", "--quiet", "--pipe", "--register=no", "--keep-unit", "--private-network",
         "--read-only", f"--directory={root}", "/bin/true"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"systemd-nspawn cannot run containers here: {probe.stderr.strip()}")
    return root


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    started = time.monotonic()
    work = tmp_path_factory.mktemp("e2e-build")
    wheel = harness.build_wheel(work / "wheel")
    rendered = harness.render_units(work)
    harness.render_units(work / "rootless", rootless=True)
    _timed("wheel + units", started)
    return wheel, rendered


@pytest.fixture
def machines(e2e_root: Path, built: tuple[Path, Path]) -> Iterator[Callable[..., Machine]]:
    wheel, rendered = built
    busybox = harness.find_busybox()
    made: list[Machine] = []
    workdir = Path(tempfile.mkdtemp(prefix="guixsvc-e2e-"))

    def make(name: str, network_zone: str | None = None, rootless: bool = False) -> Machine:
        machine = Machine(name, e2e_root, workdir, network_zone=network_zone)
        made.append(machine)
        units = rendered / "rootless" if rootless else rendered
        TIMINGS[f"provision {name}"] = round(
            harness.provision(machine, wheel, units, busybox, rootless=rootless), 2
        )
        return machine

    yield make
    for machine in made:
        machine.shutdown()
        TIMINGS.update({f"{machine.name} {k}": round(v, 2) for k, v in machine.timings.items()})
    subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
    print(f"e2e timings: {TIMINGS}", flush=True)


def _run(scenario: Callable[[], list[str] | None], name: str) -> None:
    started = time.monotonic()
    try:
        skipped = scenario() or []
    except ScenarioSkipped as exc:
        _timed(name, started)
        pytest.skip(str(exc))
    _timed(name, started)
    for reason in skipped:
        print(f"e2e {name}: step skipped: {reason}", flush=True)


def test_daemon_socket_activation(machines: Callable[..., Machine]) -> None:
    machine = machines("daemon")
    machine.start()
    TIMINGS["daemon boot"] = round(machine.timings["boot"], 2)
    busybox = harness.BUSYBOX if harness.find_busybox() else None
    _run(lambda: daemon_socket.run(machine, busybox=busybox), "scenario daemon")


def test_daemon_switch(machines: Callable[..., Machine]) -> None:
    """A changed daemon flag applied as `nixos-rebuild switch` does: nothing dropped or killed."""
    machine = machines("switch")
    machine.start()
    busybox = harness.BUSYBOX if harness.find_busybox() else None
    _run(lambda: daemon_switch.run(machine, busybox=busybox), "scenario switch")


def test_publish_substitutes(machines: Callable[..., Machine]) -> None:
    zone = "gx" + secrets.token_hex(4)
    server = machines("server", network_zone=zone)
    client = machines("client", network_zone=zone)
    server.start()
    client.start()
    try:
        harness.connect_zone(zone, [server, client])
    except (OSError, subprocess.CalledProcessError, harness.NetworkUnavailable) as exc:
        pytest.skip(f"cannot set up the private network between the machines: {exc}")
    _run(lambda: publish_substitute.run(server, client), "scenario publish")


def test_gc_timer(machines: Callable[..., Machine]) -> None:
    machine = machines("gc")
    machine.start()
    _run(lambda: gc_timer.run(machine), "scenario gc")


def test_rootless(machines: Callable[..., Machine]) -> None:
    """`guixsvc units --rootless`: socket activation and a sandboxed build in user namespaces
    (scenario daemon with the guest ids), the daemon as `guix-daemon` without capabilities,
    publish and gc on its store, and the unit's `systemd-analyze security` exposure."""
    machine = machines("rootless", rootless=True)
    machine.start()
    busybox = harness.BUSYBOX if harness.find_busybox() else None
    _run(lambda: daemon_socket.run(machine, busybox=busybox, rootless=True), "scenario rootless")
    pid = machine.succeed("systemctl show -P MainPID guix-daemon.service").strip()
    assert machine.succeed(f"ps -o user= -p {pid}").strip() == "guix-daemon"
    assert machine.succeed(f"grep CapEff /proc/{pid}/status").split()[1] == "0" * 16
    assert machine.succeed("stat -c %U /gnu/store").strip() == "guix-daemon"
    machine.fail("touch /gnu/store/e2e-rootless-evil")
    machine.succeed(
        "python3 -c 'import urllib.request; "
        'urllib.request.urlopen("http://127.0.0.1:8181/nix-cache-info").read()\''
    )
    machine.succeed("systemctl start guix-gc.service")
    assert machine.succeed("systemctl show -P Result guix-gc.service").strip() == "success"
    exposure = machine.succeed("systemd-analyze security --no-pager guix-daemon.service | tail -1")
    print(f"e2e rootless guix-daemon.service: {exposure.strip()}", flush=True)
    level = float(exposure.split(":")[1].split()[0])
    TIMINGS["rootless exposure"] = level
    assert level <= 5.0
