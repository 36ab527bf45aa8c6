"""Upstream's own `read-narinfo` / `valid-narinfo?` (the 2022 Guile code) accept narinfos
from `guixsvc publish` and reject tampered ones.  Runs only when GUIX_GUILE_RUN points at a
script that runs Guile with the upstream Guix modules on its load path (e.g.
/work/guile-client/run.sh)."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from guixsvc.pki import keys
from tests.publish.test_publish import node  # noqa: F401 - the fixture
from tests.substitutes.helpers import Node

SCRIPT = Path(__file__).resolve().parents[1] / "guile" / "narinfo-check.scm"


def test_upstream_guile_accepts_our_narinfos(node: dict[str, object], tmp_path: Path) -> None:  # noqa: F811
    run = os.environ.get("GUIX_GUILE_RUN")
    if not run:
        pytest.skip("set GUIX_GUILE_RUN to a Guile+Guix runner (e.g. /work/guile-client/run.sh)")
    n = node["n"]
    assert isinstance(n, Node)
    acl = keys.Acl([keys.load_key(n.conf / "signing-key.pub")])
    acl.save(str(tmp_path / "acl"))
    keys.Acl().save(str(tmp_path / "empty-acl"))
    good, bad = [], []
    for k in ("top", "dep", "flat"):
        item = os.path.basename(str(node[k]))
        with urllib.request.urlopen(f"{node['url']}/{item[:32]}.narinfo") as r:
            body = r.read()
        (tmp_path / f"{k}.narinfo").write_bytes(body)
        good.append(str(tmp_path / f"{k}.narinfo"))
        tampered = body.replace(b"NarSize: ", b"NarSize: 9", 1)
        (tmp_path / f"{k}-bad.narinfo").write_bytes(tampered)
        bad.append(str(tmp_path / f"{k}-bad.narinfo"))
    env = dict(os.environ, NIX_STORE_DIR=str(n.store), RUN_NO_AUTO_COMPILE="1")

    def check(acl_file: str, expect: str, files: list[str]) -> str:
        r = subprocess.run([run, str(SCRIPT), acl_file, str(node["url"]), expect, *files],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count("ok ") == len(files), r.stdout
        return r.stdout

    out = check(str(tmp_path / "acl"), "valid", good)
    assert f"{node['url']}/nar/zstd/" in out or f"{node['url']}/nar/gzip/" in out
    check(str(tmp_path / "acl"), "invalid", bad)
    check(str(tmp_path / "empty-acl"), "invalid", good)
