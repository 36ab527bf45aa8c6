"""Fixtures for the GC tests: a store made directly with the database and files (for the engine)
and helpers to run `guixsvc gc` against a daemon from tests/conftest.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guixsvc.daemon.collector import Collector, GCOutcome
from guixsvc.protocol.ops import GCAction
from guixsvc.store.db import StoreDatabase, ValidPathInfo
from guixsvc.store.paths import StoreDir
from tests.conftest import Daemon

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LocalStore:
    """A store populated through `StoreDatabase` (no daemon), for engine-level tests."""

    root: Path
    db: StoreDatabase
    counter: int = 0
    logs: list[tuple[int, str]] = field(default_factory=list)

    @property
    def store_dir(self) -> str:
        return str(self.root / "store")

    @property
    def state_dir(self) -> str:
        return str(self.root / "state")

    def add(
        self,
        name: str,
        refs: tuple[str, ...] = (),
        *,
        deriver: str | None = None,
        size: int = 16,
        directory: bool = False,
        register: bool = True,
    ) -> str:
        self.counter += 1
        digest = hashlib.sha256(f"{name}-{self.counter}".encode()).digest()
        path = StoreDir(self.store_dir).display(
            StoreDir(self.store_dir).make_store_path("text", digest, name)
        )
        data = os.urandom(size)
        if directory:
            os.mkdir(path)
            with open(f"{path}/file", "wb") as f:
                f.write(data)
        else:
            with open(path, "wb") as f:
                f.write(data)
        if register:
            info = ValidPathInfo(
                path=path,
                nar_hash="sha256:" + "00" * 32,
                nar_size=size,
                references=frozenset(refs),
                deriver=deriver,
            )
            self.db.register_valid_paths([info])
        return path

    def add_drv(self, name: str, outputs: dict[str, str] | None = None) -> str:
        drv = self.add(name + ".drv")
        if outputs:
            self.db.add_derivation_outputs(drv, outputs)
        return drv

    def root_link(self, path: str, name: str | None = None) -> str:
        link = f"{self.state_dir}/gcroots/{name or os.path.basename(path)}"
        os.symlink(path, link)
        return link

    def collector(self, **kwargs: object) -> Collector:
        kwargs.setdefault("busy", list)
        kwargs.setdefault("log", lambda level, text: self.logs.append((level, text)))
        return Collector(self.store_dir, self.state_dir, self.db, **kwargs)  # type: ignore[arg-type]

    def gc(self, action: GCAction, paths: tuple[str, ...] = (), max_freed: int = 2**64 - 1,
           **kwargs: object) -> GCOutcome:  # fmt: skip
        return self.collector(**kwargs).run(action, paths, max_freed)

    def entries(self) -> set[str]:
        return {f"{self.store_dir}/{n}" for n in os.listdir(self.store_dir)} - {
            f"{self.store_dir}/.links"
        }


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[LocalStore]:
    for d in ("store/.links", "state/gcroots", "state/profiles", "state/temproots", "state/db"):
        (tmp_path / d).mkdir(parents=True)
    db = StoreDatabase.open(str(tmp_path / "state" / "db"), fsync=False)
    try:
        yield LocalStore(tmp_path, db)
    finally:
        db.close()


def run_gc(daemon: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m guixsvc.cli gc ARGS` against `daemon`."""
    env = dict(daemon.env, GUIX_DAEMON_SOCKET=daemon.socket, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "gc", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        check=False,
    )
