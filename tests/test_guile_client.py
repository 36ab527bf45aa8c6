"""The real Guile client, `(guix store)` from upstream's source, against our daemon.

Upstream's source cannot be fetched in CI, so this runs only where a developer prepared it:
`GUIX_GUILE_RUN` names a script that runs a Guile program with upstream's modules on the load
path (see README.md, "Checking with the real Guix client").  The Scheme side is ours:
tests/guile/store-ops.scm prints `ok NAME` / `FAIL NAME: ...` per check.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Daemon

RUN = os.environ.get("GUIX_GUILE_RUN")
SCRIPT = Path(__file__).parent / "guile" / "store-ops.scm"

pytestmark = pytest.mark.skipif(
    not RUN, reason="GUIX_GUILE_RUN does not name a runner for the upstream Guile client"
)


def test_guile_store_operations(daemon: Daemon) -> None:
    env = dict(daemon.env, GUIX_DAEMON_SOCKET=daemon.socket)
    result = subprocess.run(
        [RUN, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )  # type: ignore[list-item]
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "FAIL" not in report
    assert report.count("\nok ") >= 30, report
