"""Substitutes before builds (upstream's goal order), `--fallback`, and repair by substitution.

Store A builds derivations and serves them with `guixsvc publish`; store B has the same store
directory (A runs in a private mount namespace, tests/substitutes/helpers.py).  Every builder
fails when a marker file exists, so with the marker present a successful BuildPaths in B proves
nothing was built there.  The outputs hold a random UUID: B's copy equals A's exactly when it
was substituted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from guixsvc.daemon.build.logs import log_file_name
from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.protocol.ops import BuildMode
from tests.build.conftest import BUSYBOX, Builds, _is_static, add_busybox, requires_root
from tests.substitutes.helpers import (
    Node,
    need_unshare,
    start_node,
    start_publish,
    stop_node,
    wipe_store,
)

pytestmark = requires_root


def _script(marker: Path, body: str) -> str:
    return f"if [ -e {marker} ]; then echo BUILDER-RAN; exit 1; fi; mkdir $out; {body}"


UUID = "cat /proc/sys/kernel/random/uuid > $out/u"


def _define(b: Builds, marker: Path) -> dict[str, tuple[str, str]]:
    """The derivations, identical in both stores: name -> (drv, out)."""
    dep, dep_out = b.derivation("sdep", _script(marker, UUID))
    top, top_out = b.derivation(
        "stop",
        _script(marker, f"{UUID}; echo {dep_out['out']} > $out/dep"),
        inputs={dep: ("out",)},
    )
    bad, bad_out = b.derivation("sbad", _script(marker, UUID))
    local, local_out = b.derivation("slocal", _script(marker, UUID), env={"allowSubstitutes": "0"})
    return {
        "dep": (dep, dep_out["out"]),
        "top": (top, top_out["out"]),
        "bad": (bad, bad_out["out"]),
        "local": (local, local_out["out"]),
    }


def _builds(
    node: Node, client: DaemonClient, logs: list[str], real_store: Path | None = None
) -> Builds:
    busybox = add_busybox(client, node.root)
    daemon = SimpleNamespace(store_dir=str(node.store))
    real = str(real_store) if real_store else None
    return Builds(daemon, client, busybox, logs, real)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    need_unshare()
    if not os.path.exists(BUSYBOX) or not _is_static(BUSYBOX):
        pytest.skip("needs a static /bin/busybox (Debian package busybox-static)")
    base = tmp_path_factory.mktemp("substbuild")
    base.chmod(0o755)
    shared, a_store = base / "store", base / "a-store"
    marker = base / "marker"
    a = start_node(base / "a", shared, a_store)
    try:
        subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "archive", "--generate-key"],
            env=a.env, capture_output=True, check=True,
        )  # fmt: skip
        with a.client() as c:
            c.set_options(use_substitutes=False)
            drvs = _define(_builds(a, c, [], a_store), marker)
            c.build_paths([d for d, _ in drvs.values()])
        # A's copy of `bad` is corrupted after the fact: its nar no longer has the hash
        # its narinfo announces.
        bad_file = a_store / os.path.basename(drvs["bad"][1]) / "u"
        bad_file.chmod(0o644)
        bad_file.write_text("tampered\n")
        _, url = start_publish(a, a_store)
        yield {
            "base": base, "shared": shared, "a_store": a_store, "marker": marker, "url": url,
            "drvs": drvs, "public": (a.conf / "signing-key.pub").read_bytes(),
        }  # fmt: skip
    finally:
        stop_node(a)


_counter = iter(range(100))


@pytest.fixture
def node_b(world: dict[str, object]) -> Iterator[tuple[Node, DaemonClient, list[str]]]:
    shared = world["shared"]
    assert isinstance(shared, Path)
    wipe_store(shared)
    b = start_node(world["base"] / f"b{next(_counter)}", shared, None,  # type: ignore[operator]
                   f"--substitute-urls={world['url']}")  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "archive", "--authorize"],
        input=world["public"], env=b.env, check=True,
    )  # fmt: skip
    with DaemonClient(b.socket) as setup:
        # Upstream quirk: once a connection turned substitutes off it cannot turn them on.
        setup.set_options(use_substitutes=False)
        drvs = _define(_builds(b, setup, []), world["marker"])  # type: ignore[arg-type]
        assert drvs == world["drvs"]
    logs: list[str] = []
    client = DaemonClient(b.socket, log=logs.append)
    try:
        client.set_options(use_substitutes=True, verbosity=1)
        yield b, client, logs
    finally:
        client.close()
        stop_node(b)
        marker = world["marker"]
        assert isinstance(marker, Path)
        marker.unlink(missing_ok=True)


def _a_copy(world: dict[str, object], out: str) -> str:
    return Path(str(world["a_store"]), os.path.basename(out), "u").read_text()


def test_outputs_substituted_before_building(
    world: dict[str, object], node_b: tuple[Node, DaemonClient, list[str]]
) -> None:
    b, client, logs = node_b
    drvs: dict[str, tuple[str, str]] = world["drvs"]  # type: ignore[assignment]
    Path(str(world["marker"])).write_text("")
    top, top_out = drvs["top"]
    dep, dep_out = drvs["dep"]
    client.build_paths([top])
    assert not any("BUILDER-RAN" in m for m in logs)
    assert Path(top_out, "u").read_text() == _a_copy(world, top_out)
    # The input derivation was not built either: its output came as a reference of top's.
    assert Path(dep_out, "u").read_text() == _a_copy(world, dep_out)
    assert f"fetching path `{top_out}'...\n" in logs
    log_dir = b.env["GUIX_LOG_DIRECTORY"]
    assert not os.path.exists(log_file_name(log_dir, top, "gzip"))
    assert not os.path.exists(log_file_name(log_dir, dep, "gzip"))
    assert client.query_path_info(top_out).deriver == top


def test_failed_substitute_and_fallback(
    world: dict[str, object], node_b: tuple[Node, DaemonClient, list[str]]
) -> None:
    _, client, logs = node_b
    drvs: dict[str, tuple[str, str]] = world["drvs"]  # type: ignore[assignment]
    bad, bad_out = drvs["bad"]
    with pytest.raises(DaemonError) as exc:
        client.build_paths([bad])
    assert str(exc.value) == (
        f"some substitutes for the outputs of derivation `{bad}' failed (usually happens due "
        "to networking issues); try `--fallback' to build derivation from source "
    )
    assert f"hash mismatch for substituted item `{bad_out}'\n" in logs
    assert not any("building path(s)" in m for m in logs)
    assert not client.is_valid_path(bad_out)
    client.set_options(use_substitutes=True, verbosity=1, fallback=True)
    client.build_paths([bad])
    assert client.is_valid_path(bad_out)
    assert f"building path(s) `{bad_out}'\n" in logs
    assert Path(bad_out, "u").read_text() not in ("tampered\n", _a_copy(world, bad_out))


def test_allow_substitutes_zero_builds(
    world: dict[str, object], node_b: tuple[Node, DaemonClient, list[str]]
) -> None:
    _, client, logs = node_b
    drvs: dict[str, tuple[str, str]] = world["drvs"]  # type: ignore[assignment]
    local, local_out = drvs["local"]
    client.build_paths([local])
    assert f"building path(s) `{local_out}'\n" in logs
    assert not any("fetching path" in m for m in logs)
    assert Path(local_out, "u").read_text() != _a_copy(world, local_out)


def test_repair_by_substitution(
    world: dict[str, object], node_b: tuple[Node, DaemonClient, list[str]]
) -> None:
    _, client, logs = node_b
    drvs: dict[str, tuple[str, str]] = world["drvs"]  # type: ignore[assignment]
    top, top_out = drvs["top"]
    _, dep_out = drvs["dep"]
    client.build_paths([top])
    Path(str(world["marker"])).write_text("")  # from now on a build would fail
    shared = str(world["shared"])
    # A non-derivation item given to BuildPaths in repair mode is substituted again.
    (Path(dep_out) / "u").chmod(0o644)
    (Path(dep_out) / "u").write_text("corrupt\n")
    client.build_paths([dep_out], BuildMode.REPAIR)
    assert Path(dep_out, "u").read_text() == _a_copy(world, dep_out)
    # A derivation's corrupt output is substituted, not rebuilt.
    (Path(top_out) / "u").chmod(0o644)
    (Path(top_out) / "u").write_text("corrupt\n")
    logs.clear()
    client.build_paths([top], BuildMode.REPAIR)
    assert Path(top_out, "u").read_text() == _a_copy(world, top_out)
    assert f"path `{top_out}' is corrupted or missing!\n" in logs
    assert not any("BUILDER-RAN" in m or "repairing path(s)" in m for m in logs)
    leftovers = [e for e in os.listdir(shared) if ".old-" in e or e.endswith(".tmp")]
    assert leftovers == []
    assert client.verify_store(check_contents=True) is False
