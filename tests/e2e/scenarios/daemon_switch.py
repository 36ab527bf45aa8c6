"""Scenario 4: a new daemon flag takes effect the way `nixos-rebuild switch` applies it.

NixOS's module marks guix-daemon.service `X-StopIfChanged=false`, so switch-to-configuration
restarts the changed service after activation instead of stopping it (and, being
socket-activated, its socket) first.  Under NixOS the caller passes `switch` (running the new
configuration's `switch-to-configuration`); elsewhere the scenario does what that amounts to: a
drop-in with the new command line, `daemon-reload`, `systemctl restart guix-daemon.service`.

* guix-daemon.socket is never stopped: it keeps its activation time, and clients connecting
  every 50 ms during the switch are all served.
* An idle session opened before the switch keeps working after it.
* A build running during the switch goes on and completes (KillMode=process).
* The new daemon runs with the new flag.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any

from tests.e2e.scenarios._lib import CLIENT_PRELUDE, NOT_IMPLEMENTED, py, unit_property
from tests.e2e.scenarios.daemon_socket import BUILD, IDLE_CLIENT

WORK = "/run/e2e-switch"
DROP_IN = "/run/systemd/system/guix-daemon.service.d/90-e2e-switch.conf"

# The same build as daemon_socket's, held in its builder for a while.
SLOW_BUILD = BUILD.replace("echo built > $out;", "$busybox sleep 15; echo built > $out;", 1)
assert SLOW_BUILD != BUILD

# Connects every 50 ms until WORK/stop exists; prints how many connections worked and failed.
PROBE = r"""
import json, os, sys, time
from guixsvc.protocol.client import DaemonClient
ok, errors = 0, []
end = time.time() + 300
while time.time() < end and not os.path.exists(sys.argv[1] + "/stop"):
    try:
        c = DaemonClient()
        c.add_text_to_store("e2e-switch-probe", "probe\n")
        c.close()
        ok += 1
    except Exception as exc:
        errors.append(repr(exc))
    time.sleep(0.05)
print(json.dumps({"ok": ok, "errors": errors}))
"""


def switch_by_hand(machine: Any, flag: str) -> None:
    """What switch-to-configuration does to a changed X-StopIfChanged=false service."""
    lines = machine.succeed("systemctl cat guix-daemon.service").splitlines()
    exec_start = [line for line in lines if line.startswith("ExecStart=") and line != "ExecStart="]
    assert exec_start, "guix-daemon.service has no ExecStart="
    machine.succeed(
        f"mkdir -p {shlex.quote(DROP_IN.rsplit('/', 1)[0])}",
        f"printf '[Service]\\nExecStart=\\n%s\\n' {shlex.quote(exec_start[-1] + ' ' + flag)}"
        f" > {DROP_IN}",
        "systemctl daemon-reload",
        "systemctl restart guix-daemon.service",
    )


def run(
    machine: Any,
    *,
    switch: Callable[[], object] | None = None,
    flag: str = "--max-jobs=2",
    busybox: str | None = None,
    python: str = "python3",
) -> list[str]:
    """Returns the steps that were skipped (with reasons); raises on failures."""
    skipped: list[str] = []
    machine.wait_for_unit("guix-daemon.socket")
    started = py(
        machine,
        CLIENT_PRELUDE + "c = DaemonClient()\nreport(valid=c.is_valid_path('/gnu/store/x'))\n",
        python=python,
    )
    assert started == {"valid": False}, started
    machine.wait_for_unit("guix-daemon.service")
    socket_since = unit_property(machine, "guix-daemon.socket", "ActiveEnterTimestampMonotonic")
    old_pid = unit_property(machine, "guix-daemon.service", "MainPID")
    machine.succeed(f"rm -rf {WORK} && mkdir -p {WORK}/idle")

    # An idle session, used again after the switch.
    machine.succeed(
        f"{python} -c {shlex.quote(IDLE_CLIENT)} {WORK}/idle > {WORK}/idle/log 2>&1 < /dev/null &"
    )
    machine.wait_for_file(f"{WORK}/idle/ready", timeout=60)

    # A build still running when the daemon restarts.
    building = False
    if busybox is None:
        skipped.append("build across the switch: no static busybox to use as a builder")
    else:
        machine.succeed(
            f"{python} -c {shlex.quote(SLOW_BUILD)} {shlex.quote(busybox)}"
            f" > {WORK}/build 2>&1 < /dev/null &"
        )
        # The builder's `busybox sleep` (only its command line has the expanded file name).
        status, _ = machine.execute(
            'timeout 60 sh -c \'until pgrep -f "[b]in/busybox sleep 15" >/dev/null;'
            " do sleep 0.2; done'"
        )
        building = status == 0

    machine.succeed(f"{python} -c {shlex.quote(PROBE)} {WORK} > {WORK}/probe 2>&1 < /dev/null &")
    machine.succeed("sleep 1")
    if switch is None:
        switch_by_hand(machine, flag)
    else:
        switch()
    machine.succeed("sleep 1", f"touch {WORK}/stop")
    machine.wait_until_succeeds(f"grep -q '\"ok\"' {WORK}/probe", timeout=60)
    probe = json.loads(machine.succeed(f"tail -n 1 {WORK}/probe"))
    assert probe["ok"] > 0 and probe["errors"] == [], f"clients refused during the switch: {probe}"

    # The socket was never stopped; the daemon was restarted with the new flag.
    after = unit_property(machine, "guix-daemon.socket", "ActiveEnterTimestampMonotonic")
    assert after == socket_since, "guix-daemon.socket was restarted by the switch"
    machine.wait_for_unit("guix-daemon.service")
    new_pid = unit_property(machine, "guix-daemon.service", "MainPID")
    assert new_pid != old_pid, "guix-daemon was not restarted"
    command_line = machine.succeed(f"tr '\\0' ' ' < /proc/{new_pid}/cmdline")
    assert flag in command_line.split(), f"{flag} not in effect: {command_line}"

    # The idle session still works.
    machine.succeed(f"touch {WORK}/idle/go")
    machine.wait_for_file(f"{WORK}/idle/result", timeout=60)
    idle = json.loads(machine.succeed(f"cat {WORK}/idle/result"))
    assert idle.get("before_valid") and idle.get("after_valid"), (
        f"idle session broken by the switch: {idle} " + machine.succeed(f"cat {WORK}/idle/log")
    )

    # The build went on and finished.
    if busybox is not None:
        machine.wait_until_succeeds(f"grep -q '\"ok\"' {WORK}/build", timeout=180)
        build = json.loads(machine.succeed(f"tail -n 1 {WORK}/build"))
        if not build["ok"] and NOT_IMPLEMENTED in build.get("error", ""):
            skipped.append(f"build across the switch: {build['error']}")
        else:
            assert building, "the slow build never started"
            assert build["ok"] and build["content"].startswith("built"), build

    if switch is None:
        machine.succeed(f"rm -f {DROP_IN}", "systemctl daemon-reload")
    return skipped
