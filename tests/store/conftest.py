"""Shared fixtures for the store tests: an independent oracle, Debian's Nix, on a temp store."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NIX_TOOLS = ("nix-store", "nix-hash", "nix-instantiate")


@dataclass
class Nix:
    """Runs Debian's nix-* commands against a private store in a temporary directory."""

    root: Path
    env: dict[str, str]

    @property
    def store_dir(self) -> str:
        return str(self.root / "store")

    def run(self, *args: str, input: bytes | None = None) -> bytes:
        extra = ["--option", "build-users-group", ""] if args[0] != "nix-hash" else []
        proc = subprocess.run(
            [*args, *extra],
            env=self.env,
            input=input,
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"{args!r} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def text(self, *args: str) -> str:
        return self.run(*args).decode().strip()


def _nix_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(
        NIX_STORE_DIR=str(root / "store"),
        NIX_STATE_DIR=str(root / "state"),
        NIX_LOG_DIR=str(root / "log"),
        NIX_CONF_DIR=str(root / "conf"),
        NIX_REMOTE="",
        NIX_IGNORE_SYMLINK_STORE="1",
        HOME=str(root / "home"),
        XDG_CACHE_HOME=str(root / "cache"),
    )
    (root / "conf").mkdir(parents=True, exist_ok=True)
    (root / "conf" / "nix.conf").write_text(
        "build-users-group =\nsubstituters =\nsandbox = false\n"
    )
    return env


@pytest.fixture(scope="session")
def nix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nix]:
    """A Nix oracle with its own store directory (not /nix/store); skips if Nix is missing."""
    missing = [tool for tool in NIX_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Nix tools not installed: {', '.join(missing)} (apt-get install nix-bin)")
    # Resolve symlinks: Nix refuses a store below a symlinked directory.
    root = tmp_path_factory.mktemp("nix").resolve()
    yield Nix(root, _nix_env(root))
