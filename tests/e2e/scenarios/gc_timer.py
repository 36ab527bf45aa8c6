"""Scenario 3: guix-gc.timer fires guix-gc.service, which collects dead items only.

* guix-gc.timer is active after boot, and guix-gc.service with the shipped arguments succeeds
  in its sandbox even as the first thing on a fresh machine (before the daemon ever ran).
* With the calendar shortened by a runtime drop-in (`OnCalendar=*:*:0/5`, no randomised delay),
  the timer starts the service by itself; the service succeeds, a dead item is gone, and an item
  rooted in /var/guix/gcroots stays together with what it refers to.  The drop-in also asks
  `guix gc -F` for more free space than the disk has, so the collection cannot stop early
  because enough space is free (the shipped `-F 10G` collects nothing on a roomy disk).

Drop-ins go to /run/systemd/system, which is writable under NixOS too, and are named so that
they sort after NixOS's own `overrides.conf`.  They are removed at the end.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from tests.e2e.scenarios._lib import (
    CLIENT_PRELUDE,
    ScenarioSkipped,
    has_subcommand,
    py,
    unit_property,
)

DROPIN = "zz-e2e-gc.conf"
TIMER_DROPIN = """[Timer]
OnCalendar=
OnCalendar=*:*:0/5
AccuracySec=1s
RandomizedDelaySec=0
"""

MAKE_ITEMS = (
    CLIENT_PRELUDE
    + r"""
import os
c = DaemonClient()
dead = c.add_text_to_store("e2e-gc-dead", "nobody refers to me\n")
dep = c.add_text_to_store("e2e-gc-dep", "referred to by a root\n")
live = c.add_text_to_store("e2e-gc-live", "root refers to " + dep + "\n", [dep])
# Rooted while this session's temporary roots still protect it (a timer may fire any time).
os.makedirs("/var/guix/gcroots", exist_ok=True)
link = "/var/guix/gcroots/e2e-gc-live"
if os.path.lexists(link):
    os.unlink(link)
os.symlink(live, link)
report(dead=dead, dep=dep, live=live)
"""
)

VALID = (
    CLIENT_PRELUDE
    + r"""
c = DaemonClient()
report(valid=c.query_valid_paths(sys.argv[1:]))
"""
)


def _gc_exec_path(machine: Any) -> str:
    """The program guix-gc.service runs (`path=` of its ExecStart)."""
    exec_start = unit_property(machine, "guix-gc.service", "ExecStart")
    for field in exec_start.replace(";", " ").split():
        if field.startswith("path="):
            return field.removeprefix("path=")
    raise AssertionError(f"cannot read guix-gc.service's ExecStart: {exec_start}")


def _last_trigger(machine: Any) -> str:
    """When the timer last fired, in µs.  The wall-clock value, which a restart of the timer
    keeps (Persistent=true), unlike the monotonic one it resets."""
    return machine.succeed(
        "systemctl show --timestamp=us+utc -P LastTriggerUSec guix-gc.timer"
    ).strip()


def _wait_for_run(machine: Any, previous: str, timeout: int) -> None:
    """Until guix-gc.service ran once more than at `previous` (its InvocationID) and finished."""
    machine.wait_until_succeeds(
        f'test "$(systemctl show -P InvocationID guix-gc.service)" != {shlex.quote(previous)}'
        " && systemctl show -P ActiveState guix-gc.service | grep -qxE 'inactive|failed'",
        timeout=timeout,
    )


def _assert_success(machine: Any) -> None:
    result = unit_property(machine, "guix-gc.service", "Result")
    if result != "success":
        journal = machine.succeed("journalctl --no-pager -n 30 -u guix-gc.service")
        raise AssertionError(f"guix-gc.service ended with {result}:\n{journal}")


def run(machine: Any, *, python: str = "python3") -> list[str]:
    """Returns the steps that were skipped (with reasons); raises on failures."""
    if not has_subcommand(machine, "gc"):
        raise ScenarioSkipped("`guixsvc gc` is not installed")
    machine.wait_for_unit("guix-gc.timer")

    # The shipped service, started by hand: it works in its sandbox on a fresh machine.
    machine.succeed("systemctl start guix-gc.service")
    _assert_success(machine)

    items = py(machine, MAKE_ITEMS, python=python)

    program = _gc_exec_path(machine)
    service_dropin = f"[Service]\nExecStart=\nExecStart={program} gc -d 1m -F 1PiB\n"
    previous = unit_property(machine, "guix-gc.service", "InvocationID")
    triggered_before = _last_trigger(machine)
    for unit, text in (("guix-gc.timer", TIMER_DROPIN), ("guix-gc.service", service_dropin)):
        machine.succeed(
            f"mkdir -p /run/systemd/system/{unit}.d",
            f"printf %s {shlex.quote(text)} > /run/systemd/system/{unit}.d/{DROPIN}",
        )
    machine.succeed("systemctl daemon-reload", "systemctl restart guix-gc.timer")
    try:
        assert "*:*:0/5" in machine.succeed("systemctl cat guix-gc.timer")
        _wait_for_run(machine, previous, timeout=60)
        _assert_success(machine)
        triggered = _last_trigger(machine)
        assert triggered not in ("", "n/a", triggered_before), (
            f"the timer did not start the service (last trigger {triggered!r}): "
            + machine.succeed("journalctl --no-pager -u guix-gc.timer -u guix-gc.service")
        )

        quoted = " ".join(shlex.quote(items[k]) for k in ("dead", "dep", "live"))
        out = machine.succeed(f"{python} -c {shlex.quote(VALID)} {quoted}")
        valid = json.loads(out.strip().splitlines()[-1])["valid"]
        assert items["dead"] not in valid, f"dead item {items['dead']} survived"
        machine.succeed(f"test ! -e {items['dead']}")
        for key in ("live", "dep"):
            assert items[key] in valid, f"{key} item {items[key]} was collected"
            machine.succeed(f"test -e {items[key]}")
    finally:
        machine.succeed(
            f"rm -f /run/systemd/system/guix-gc.timer.d/{DROPIN}"
            f" /run/systemd/system/guix-gc.service.d/{DROPIN}",
            "systemctl daemon-reload",
            "systemctl restart guix-gc.timer",
        )
    return []
