"""Runs a tests/e2e/scenarios script under the NixOS test driver (exec'd by the testScript).

The scenarios are written against the driver's `Machine` API and import
`tests.e2e.scenarios._lib`, so the testScript puts a store copy of that package on `sys.path`.
A scenario that raises `ScenarioSkipped` (a feature not landed yet) is logged, not failed, as
in the nspawn harness; skipped steps it returns are logged too.
"""

import importlib
import sys


def run_scenario(tree, name, *machines, **options):
    if tree not in sys.path:
        sys.path.insert(0, tree)
    lib = importlib.import_module("tests.e2e.scenarios._lib")
    scenario = importlib.import_module(f"tests.e2e.scenarios.{name}")
    for m in machines:
        # The nspawn harness keeps the last command's stderr there; the driver sends it to the log.
        if not hasattr(m, "last_stderr"):
            m.last_stderr = "(stderr is in the machine's log above)"
    with subtest(f"scenario {name}"):  # noqa: F821 - the driver's global
        try:
            skipped = scenario.run(*machines, **options) or []
        except lib.ScenarioSkipped as reason:
            print(f"scenario {name} skipped: {reason}")
            return
        for step in skipped:
            print(f"scenario {name}: step skipped: {step}")
