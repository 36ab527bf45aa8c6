"""What the scenario scripts share, independent of the driver that runs them.

Scenarios only use the NixOS test-driver API on `machine` objects plus plain shell and python3
inside the machines, so they run unchanged in our nspawn harness and under nixos-tests.  Things
that need code inside the machine (a store client) are small Python programs run with the
machine's python3 that has guixsvc installed.  A feature another part of the project has not
landed yet makes the scenario raise `ScenarioSkipped` with the reason.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from typing import Any


class ScenarioSkipped(Exception):
    """The scenario (or a step of it) needs something that does not exist yet."""


NOT_IMPLEMENTED = "not implemented yet"


def py(machine: Any, code: str, *, python: str = "python3", check: bool = True) -> Any:
    """Run `code` with the machine's python3; it prints one JSON value, which is returned."""
    command = f"{python} -c {shlex.quote(textwrap.dedent(code))}"
    if check:
        out = machine.succeed(command)
    else:
        _status, out = machine.execute(command)
    lines = [line for line in out.splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def has_subcommand(machine: Any, name: str) -> bool:
    """Whether `guixsvc NAME` exists in the machine's installation."""
    status, _ = machine.execute(f"guixsvc {name} --help >/dev/null 2>&1")
    return status == 0


def unit_property(machine: Any, unit: str, prop: str) -> str:
    return machine.succeed(f"systemctl show -P {prop} {shlex.quote(unit)}").strip()


def is_active(machine: Any, unit: str) -> bool:
    status, _ = machine.execute(f"systemctl is-active --quiet {shlex.quote(unit)}")
    return status == 0


# A client program that prints {"ok": ..., "error": ...} instead of a traceback, so scenarios
# can tell "not implemented yet" from a real failure.
CLIENT_PRELUDE = """
import json, sys
from guixsvc.protocol.client import DaemonClient, DaemonError
def report(**kw):
    print(json.dumps(kw)); sys.exit(0)
"""
