"""Scenario 2: socket-activated guix publish, and substitutes between two machines."""

from __future__ import annotations

from typing import Any

from tests.e2e.scenarios._lib import ScenarioSkipped, has_subcommand


def run(server: Any, client: Any, *, python: str = "python3") -> list[str]:
    if not has_subcommand(server, "publish"):
        raise ScenarioSkipped("`guixsvc publish` does not exist yet (issue 4)")
    raise ScenarioSkipped("not written yet")
