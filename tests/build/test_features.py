"""Derivation attributes and daemon options: exportReferencesGraph, --chroot-directory,
allowed/disallowed references, --impersonate-linux-2.6 and build-max-log-size
(spec/build-env.md §2, §6, §7, §8, §9.2)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonError
from tests.build.conftest import Builds, requires_root

pytestmark = requires_root


def test_export_references_graph(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    bb = b.busybox
    dep, dep_outs = b.derivation("gdep", f"mkdir $out; ln -s {bb}/bin/busybox $out/bb")
    dep_out = dep_outs["out"]
    drv, outs = b.derivation(
        "graph",
        "mkdir $out; cp g1 $out/g1; cp g2 $out/g2",
        inputs={dep: ("out",)},
        env={"exportReferencesGraph": f"g1 {dep_out} g2 {bb}/bin/sh"},
    )
    b.client.build_paths([drv])
    # makeValidityRegistration without hashes and derivers, paths sorted.
    expected = "".join(
        f"{p}\n\n{len(refs)}\n" + "".join(r + "\n" for r in refs)
        for p, refs in sorted({bb: [], dep_out: [bb]}.items())
    )
    assert Path(outs["out"], "g1").read_text() == expected
    assert Path(outs["out"], "g2").read_text() == f"{bb}\n\n0\n"  # a path inside an item


def test_export_references_graph_bad_spec(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    drv, _ = b.derivation("oddgraph", "mkdir $out", env={"exportReferencesGraph": "lonely"})
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 100
    assert "odd number of tokens in `exportReferencesGraph': `lonely'\n" in b.logs
    drv2, _ = b.derivation("outside", "mkdir $out", env={"exportReferencesGraph": "g /etc/passwd"})
    with pytest.raises(DaemonError):
        b.client.build_paths([drv2])
    assert "path `/etc/passwd' is not in the store\n" in b.logs


def test_chroot_directory(make_builds: Callable[..., Builds], base_dir: Path) -> None:
    extra = base_dir / "extra"
    extra.mkdir()
    (extra / "file").write_text("from the host\n")
    extra.chmod(0o755)
    (extra / "file").chmod(0o644)
    other = base_dir / "other"
    other.mkdir(mode=0o755)
    (other / "f2").write_text("renamed\n")
    (other / "f2").chmod(0o644)
    b = make_builds(f"--chroot-directory={extra}", f"--chroot-directory=/inside={other}")
    drv, outs = b.derivation(
        "extra", f"mkdir $out; cat {extra}/file > $out/a; cat /inside/f2 > $out/b"
    )
    b.client.build_paths([drv])
    assert Path(outs["out"], "a").read_text() == "from the host\n"
    assert Path(outs["out"], "b").read_text() == "renamed\n"
    # Without the option the directory is not in the chroot.
    b2 = make_builds()
    drv2, _ = b2.derivation("noextra", f"cat {extra}/file && mkdir $out")
    with pytest.raises(DaemonError):
        b2.client.build_paths([drv2])


@pytest.mark.parametrize(
    ("attr", "value", "ok"),
    [
        ("allowedReferences", "", False),
        ("allowedReferences", "BB", True),
        ("allowedReferences", "out", False),
        ("disallowedReferences", "BB", False),
        ("disallowedReferences", "out", True),
        ("allowedRequisites", "BB", True),
        ("disallowedRequisites", "BB", False),
    ],
)
def test_reference_constraints(
    make_builds: Callable[..., Builds], attr: str, value: str, ok: bool
) -> None:
    b = make_builds()
    bb = b.busybox
    value = value.replace("BB", bb)
    drv, outs = b.derivation(
        "refs", f"mkdir $out; echo {bb} > $out/uses-busybox", env={attr: value}
    )
    if ok:
        b.client.build_paths([drv])
        assert b.client.query_references(outs["out"]) == [bb]
        return
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 1
    assert f"output (`{outs['out']}') is not allowed to refer to path `{bb}'\n" in b.logs
    assert not b.client.is_valid_path(outs["out"])


def test_impersonate_linux_26(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--impersonate-linux-2.6")
    drv, outs = b.derivation("uname26", "mkdir $out; uname -r > $out/r")
    b.client.build_paths([drv])
    assert Path(outs["out"], "r").read_text().startswith("2.6.")
    b2 = make_builds()
    drv2, outs2 = b2.derivation("uname", "mkdir $out; uname -r > $out/r")
    b2.client.build_paths([drv2])
    assert not Path(outs2["out"], "r").read_text().startswith("2.6.")


def test_max_log_size(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    b.client.set_options(use_substitutes=False, overrides=[("build-max-log-size", "10000")])
    drv, _ = b.derivation("chatty", "while true; do echo 0123456789abcdef; done; mkdir $out")
    start = time.monotonic()
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert time.monotonic() - start < 10
    assert exc.value.status == 101  # handled as a timeout, as upstream
    assert f"building of `{drv}' killed after writing more than 10000 bytes of log output\n" in (
        b.logs
    )
    forwarded = sum(len(m) for m in b.logs if m.startswith("0123"))
    assert forwarded <= 10000
    # Below the limit nothing happens.
    drv2, outs2 = b.derivation("quiet", "echo short; mkdir $out")
    b.client.build_paths([drv2])
    assert b.client.is_valid_path(outs2["out"])
