"""Interoperability with upstream Guix (the 2022 tree), both ways, with every compression:
upstream's `guix publish` serving our daemon, and our publish serving upstream's daemon and its
`guix substitute`.  Runs only with GUIX_UPSTREAM_GUIX (upstream's `guix`) and, for upstream's
daemon, GUIX_UPSTREAM_DAEMON (a guix-daemon that finds `guix substitute`, e.g. under
pre-inst-env); needs root and unshare(1) for two stores at one path."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.pki import keys
from tests.substitutes.helpers import (
    Node,
    free_port,
    need_unshare,
    spawn,
    start_node,
    start_publish,
    stop_node,
    stop_proc,
    wait_port,
    wipe_store,
)

# `-C 0` is no compression (`-C none` is an unsupported type to upstream: gzip with a warning).
COMPRESSIONS = ["none", "gzip", "lzip", "zstd"]


def _flag(comp: str) -> str:
    return "0" if comp == "none" else comp


def _upstream(var: str, what: str) -> str:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"set {var} to {what}")
    return value


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Node A: our daemon in a private mount namespace (its store bind-mounted over the shared
    path), holding a directory item with a big file and a text item referring to it."""
    need_unshare()
    base = tmp_path_factory.mktemp("interop")
    shared, real = base / "store", base / "a-store"
    a = start_node(base / "a", shared, real)
    try:
        keys.generate_key_files(str(a.conf))
        tree = base / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "big").write_bytes(os.urandom(300_000) + b"z" * 700_000)
        (tree / "sub" / "x").write_bytes(b"x")
        os.symlink("sub/x", tree / "link")
        with a.client() as c:
            dep = c.add_to_store("dep", str(tree))
            top = c.add_text_to_store("top", "uses " + dep, [dep])
            infos = {p: c.query_path_info(p) for p in (dep, top)}
        yield {"a": a, "shared": shared, "real": real, "dep": dep, "top": top, "infos": infos,
               "base": base}  # fmt: skip
    finally:
        stop_node(a)


def _consumer(source: dict[str, object], name: str, url: str, daemon: list[str]) -> Node:
    """Node B on the shared path, trusting A's key, substituting from `url`."""
    a, shared, base = source["a"], source["shared"], source["base"]
    assert isinstance(a, Node) and isinstance(shared, Path) and isinstance(base, Path)
    wipe_store(shared)
    root = base / name
    (root / "etc").mkdir(parents=True, exist_ok=True)
    keys.Acl([keys.load_key(a.conf / "signing-key.pub")]).save(str(root / "etc" / "acl"))
    kw = {"daemon": daemon} if daemon else {}
    return start_node(root, shared, None, f"--substitute-urls={url}", **kw)  # type: ignore[arg-type]


def _check_substituted(source: dict[str, object], b: Node) -> float:
    dep, top, infos = str(source["dep"]), str(source["top"]), source["infos"]
    assert isinstance(infos, dict)
    start = time.monotonic()
    with b.client() as c:
        c.ensure_path(top)
        took = time.monotonic() - start
        for p in (dep, top):
            got = c.query_path_info(p)
            assert (got.nar_hash, got.nar_size) == (infos[p].nar_hash, infos[p].nar_size), p
            assert sorted(got.references) == sorted(infos[p].references), p
    big = Path(dep) / "big"
    assert big.stat().st_size == 1_000_000 and os.readlink(Path(dep) / "link") == "sub/x"
    return took


@pytest.mark.parametrize("comp", COMPRESSIONS)
def test_our_daemon_substitutes_from_upstream_publish(source: dict[str, object], comp: str) -> None:
    """Upstream `guix publish -C METHOD` (over our daemon A) → our daemon B.  With `-C none`
    upstream sends NARs made on the fly with no length, no chunking and a kept-alive connection:
    B must stop at the end of the NAR rather than wait for EOF (30 s timeout)."""
    guix = _upstream("GUIX_UPSTREAM_GUIX", "an upstream `guix` command")
    a = source["a"]
    assert isinstance(a, Node)
    port = free_port()
    a.env["GUIX_DAEMON_SOCKET"] = a.socket
    name = f"upublish-{comp}"
    argv = [guix, "publish", "--listen=127.0.0.1", f"--port={port}", f"--compression={_flag(comp)}"]
    pub = spawn(a, name, argv, source["real"])  # type: ignore[arg-type]
    try:
        wait_port(port, pub, a.root / f"{name}.log")
        b = _consumer(source, f"b-{comp}", f"http://127.0.0.1:{port}", [])
        try:
            took = _check_substituted(source, b)
        finally:
            stop_node(b)
        assert took < 15, f"substitution took {took:.1f}s"
        assert "Traceback" not in b.log(), b.log()
    finally:
        stop_proc(pub)


@pytest.mark.parametrize("comp", COMPRESSIONS)
def test_upstream_daemon_substitutes_from_our_publish(source: dict[str, object], comp: str) -> None:
    """Our `guix publish -C METHOD` (over our daemon A) → upstream's daemon B (which runs
    upstream's `guix substitute`): no traceback in our log, one request per NAR."""
    daemon = _upstream("GUIX_UPSTREAM_DAEMON", "upstream's guix-daemon (finding `guix substitute`)")
    a = source["a"]
    assert isinstance(a, Node)
    name = f"publish-{comp}"
    pub, url = start_publish(a, source["real"], "-C", _flag(comp), name=name)  # type: ignore[arg-type]
    try:
        b = _consumer(source, f"ub-{comp}", url, [daemon])
        b.env.pop("GUIX_DAEMON_SOCKET", None)
        try:
            took = _check_substituted(source, b)
        finally:
            stop_node(b)
        assert took < 15, f"substitution took {took:.1f}s"
    finally:
        stop_proc(pub)
    log = a.log(name)
    assert "Traceback" not in log, log
    for item in (source["dep"], source["top"]):
        base = os.path.basename(str(item))
        assert log.count(f"GET /nar/{comp}/{base}\n" if comp != "none" else f"/{base}\n") >= 1
        nar_gets = [ln for ln in log.splitlines() if ln.startswith("GET /nar/")
                    and ln.endswith("/" + base)]  # fmt: skip
        assert len(nar_gets) == 1, log
