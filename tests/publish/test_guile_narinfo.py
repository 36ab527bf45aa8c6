"""Upstream's own `read-narinfo` / `valid-narinfo?` (the 2022 Guile code) accept narinfos
from `guixsvc publish` and reject tampered ones.  Runs only when GUIX_GUILE_RUN points at a
script that runs Guile with the upstream Guix modules on its load path (as
tests/test_guile_client.py expects)."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from guixsvc.pki import keys
from guixsvc.store import base32
from tests.publish.test_publish import node  # noqa: F401 - the fixture
from tests.substitutes.helpers import Node, start_publish, stop_proc

SCRIPT = Path(__file__).resolve().parents[1] / "guile" / "narinfo-check.scm"


def test_upstream_guile_accepts_our_narinfos(node: dict[str, object], tmp_path: Path) -> None:  # noqa: F811
    run = os.environ.get("GUIX_GUILE_RUN")
    if not run:
        pytest.skip("set GUIX_GUILE_RUN to a Guile+Guix runner (see tests/test_guile_client.py)")
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


def _substitute(guix: str, mode: str, commands: str, env: dict[str, str], reply: Path) -> str:
    """Run upstream `guix substitute MODE` with COMMANDS on stdin; its replies go to fd 4."""
    subprocess.run(
        ["sh", "-c", 'exec "$0" substitute "$1" 4>"$2"', guix, mode, str(reply)],
        input=commands, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return reply.read_text()


def test_upstream_guix_substitute_downloads_from_us(
    node: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The real `guix substitute` (the daemon's helper in upstream Guix) queries our server and
    downloads, checks and unpacks a store item from it; with an empty ACL it sees nothing."""
    guix = os.environ.get("GUIX_UPSTREAM_GUIX")
    if not guix:
        pytest.skip("set GUIX_UPSTREAM_GUIX to an upstream `guix` command (uninstalled is fine)")
    n = node["n"]
    assert isinstance(n, Node)
    dep, top = str(node["dep"]), str(node["top"])
    missing = os.path.dirname(dep) + "/" + "0" * 32 + "-missing"
    conf = tmp_path / "etc"
    conf.mkdir()
    keys.Acl([keys.load_key(n.conf / "signing-key.pub")]).save(str(conf / "acl"))
    env = dict(
        os.environ,
        NIX_STORE_DIR=os.path.dirname(dep),
        GUIX_STATE_DIRECTORY=str(tmp_path / "state"),
        GUIX_CONFIGURATION_DIRECTORY=str(conf),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        _NIX_OPTIONS=f"substitute-urls={node['url']}\n",
    )
    (tmp_path / "state").mkdir()
    have = _substitute(guix, "--query", f"have {dep} {top} {missing}\n", env, tmp_path / "r1")
    assert sorted(have.split()) == sorted([dep, top])
    info = _substitute(guix, "--query", f"info {top}\n", env, tmp_path / "r2")
    assert top in info.split() and dep in info.split()
    dest = tmp_path / "dest"
    result = _substitute(guix, "--substitute", f"substitute {dep} {dest}\n", env, tmp_path / "r3")
    infos = node["infos"]
    assert isinstance(infos, dict)
    expected = base32.encode(bytes.fromhex(infos[dep].nar_hash))
    assert result.split()[:2] == ["success", f"sha256:{expected}"]
    assert subprocess.run(["diff", "-r", dep, str(dest)], check=False).returncode == 0
    keys.Acl().save(str(conf / "acl"))
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache2")
    assert _substitute(guix, "--query", f"have {dep}\n", env, tmp_path / "r4").split() == []


@pytest.mark.parametrize("comp", ["none", "gzip", "lzip", "zstd"])
def test_upstream_guix_substitute_every_compression(
    node: dict[str, object],  # noqa: F811
    tmp_path: Path,
    comp: str,
) -> None:
    """Upstream `guix substitute` fetches two NARs in one run (its cached connection) from our
    publish with each compression: right bytes, no traceback in our log, one request per NAR
    (its chunked-input port leaves the final CRLF unread: a request sent next on the same
    connection would fail on its side and be sent again)."""
    guix = os.environ.get("GUIX_UPSTREAM_GUIX")
    if not guix:
        pytest.skip("set GUIX_UPSTREAM_GUIX to an upstream `guix` command (uninstalled is fine)")
    n = node["n"]
    assert isinstance(n, Node)
    name = f"publish-sub-{comp}"
    flag = "0" if comp == "none" else f"{comp}:3"
    proc, url = start_publish(n, None, "-C", flag, name=name)
    try:
        dep, top = str(node["dep"]), str(node["top"])
        conf = tmp_path / "etc"
        conf.mkdir()
        keys.Acl([keys.load_key(n.conf / "signing-key.pub")]).save(str(conf / "acl"))
        (tmp_path / "state").mkdir()
        env = dict(
            os.environ,
            NIX_STORE_DIR=os.path.dirname(dep),
            GUIX_STATE_DIRECTORY=str(tmp_path / "state"),
            GUIX_CONFIGURATION_DIRECTORY=str(conf),
            XDG_CACHE_HOME=str(tmp_path / "cache"),
            _NIX_OPTIONS=f"substitute-urls={url}\n",
        )
        _substitute(guix, "--query", f"info {dep} {top}\n", env, tmp_path / "q")  # as the daemon
        commands = f"substitute {dep} {tmp_path / 'dep'}\nsubstitute {top} {tmp_path / 'top'}\n"
        result = _substitute(guix, "--substitute", commands, env, tmp_path / "r")
        assert [ln.split()[0] for ln in result.splitlines()] == ["success", "success"], result
        assert subprocess.run(["diff", "-r", dep, str(tmp_path / "dep")]).returncode == 0
        assert (tmp_path / "top").read_text() == "uses " + dep
    finally:
        stop_proc(proc)
    log = n.log(name)
    assert "Traceback" not in log, log
    prefix = "GET /nar/" if comp == "none" else f"GET /nar/{comp}/"
    for item in (dep, top):
        assert log.splitlines().count(prefix + os.path.basename(item)) == 1, log
