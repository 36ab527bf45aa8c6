"""Scenario 3: guix-gc.timer fires guix-gc.service, which collects dead items only."""

from __future__ import annotations

from typing import Any

from tests.e2e.scenarios._lib import ScenarioSkipped, has_subcommand


def run(machine: Any, *, python: str = "python3") -> list[str]:
    if not has_subcommand(machine, "gc"):
        raise ScenarioSkipped("`guixsvc gc` does not exist yet (issue 5)")
    raise ScenarioSkipped("not written yet")
