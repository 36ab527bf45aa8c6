"""Repair mode (BuildPaths mode 1) and multiplexed build output.

Repair rebuilds outputs that are registered but corrupt or missing and swaps the new tree in
(`replaceValidPath`), updating the registered hash and size; it also repairs the output
closure through the derivations that produced it (spec/build-env.md §11, upstream
`DerivationGoal::repairClosure`).  The NAR hashes are checked against nix-hash when installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonError
from guixsvc.protocol.ops import BuildMode
from tests.build.conftest import Builds, requires_root
from tests.daemon.test_store_ops import oracle_nar_hash

pytestmark = requires_root


def _corrupt(path: str) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x20]))


def _leftovers(store: str) -> list[str]:
    return [e for e in os.listdir(store) if ".old-" in e or e.endswith((".tmp", ".chroot"))]


def _registered_matches(b: Builds, path: str) -> None:
    info = b.client.query_path_info(path)
    assert info.nar_hash == oracle_nar_hash(path)
    with os.popen(f"nix-store --dump {path} 2>/dev/null | wc -c") as p:
        dumped = p.read().strip()
    if dumped and dumped != "0":
        assert info.nar_size == int(dumped)


def test_repair_corrupt_and_missing_output(make_builds: Callable[..., Builds]) -> None:
    b = make_builds(verbosity=1)
    drv, outs = b.derivation("rep", "echo built >&2; mkdir $out; echo hello > $out/f")
    b.client.build_paths([drv])
    out = outs["out"]
    good = oracle_nar_hash(out)
    _corrupt(out + "/f")
    # Normal mode does not look at contents.
    b.client.build_paths([drv])
    assert Path(out, "f").read_text() == "Hello\n"
    b.logs.clear()
    b.client.build_paths([drv], BuildMode.REPAIR)
    assert Path(out, "f").read_text() == "hello\n"
    assert oracle_nar_hash(out) == good
    _registered_matches(b, out)
    assert f"path `{out}' is corrupted or missing!\n" in b.logs
    assert f"repairing path(s) `{out}'\n" in b.logs
    assert os.stat(out + "/f").st_mode & 0o777 == 0o444
    assert _leftovers(b.daemon.store_dir) == []
    # A good output is not rebuilt.
    b.logs.clear()
    b.client.build_paths([drv], BuildMode.REPAIR)
    assert not any("repairing path(s)" in m for m in b.logs)
    # A missing output is rebuilt too.
    os.chmod(out, 0o755)
    os.unlink(out + "/f")
    os.rmdir(out)
    b.client.build_paths([drv], BuildMode.REPAIR)
    assert Path(out, "f").read_text() == "hello\n"


def test_repair_updates_registered_hash(make_builds: Callable[..., Builds]) -> None:
    """A non-deterministic builder: the repaired item's new hash and size are registered."""
    b = make_builds()
    drv, outs = b.derivation("nd", "mkdir $out; cat /proc/sys/kernel/random/uuid > $out/r")
    b.client.build_paths([drv])
    out = outs["out"]
    before = b.client.query_path_info(out)
    _corrupt(out + "/r")
    b.client.build_paths([drv], BuildMode.REPAIR)
    after = b.client.query_path_info(out)
    assert after.nar_hash != before.nar_hash
    _registered_matches(b, out)
    assert after.deriver == drv and after.references == before.references


def test_repair_output_closure(make_builds: Callable[..., Builds]) -> None:
    b = make_builds(verbosity=1)
    lib, lib_out = b.derivation("lib", "mkdir $out; echo lib > $out/l")
    app, app_out = b.derivation(
        "app", f"mkdir $out; echo {lib_out['out']} > $out/ref", inputs={lib: ("out",)}
    )
    b.client.build_paths([app])
    assert b.client.query_references(app_out["out"]) == [lib_out["out"]]
    _corrupt(lib_out["out"] + "/l")
    b.logs.clear()
    b.client.build_paths([app], BuildMode.REPAIR)
    assert Path(lib_out["out"], "l").read_text() == "lib\n"
    assert (
        f"found corrupted or missing path `{lib_out['out']}' in the output closure of `{app}'\n"
        in b.logs
    )
    assert f"repairing path(s) `{lib_out['out']}'\n" in b.logs
    assert not any(f"repairing path(s) `{app_out['out']}'" in m for m in b.logs)


def test_repair_without_chroot_restores_on_failure(
    make_builds: Callable[..., Builds], base_dir: Path
) -> None:
    """Without a chroot the corrupt item is moved aside during the build; if the rebuild
    fails it is put back, still registered."""
    marker = base_dir / "fail-now"
    b = make_builds("--disable-chroot", users=False)
    drv, outs = b.derivation(
        "nochroot-rep", f"if [ -e {marker} ]; then exit 1; fi; mkdir $out; echo v > $out/f"
    )
    b.client.build_paths([drv])
    out = outs["out"]
    _corrupt(out + "/f")
    marker.write_text("")
    with pytest.raises(DaemonError):
        b.client.build_paths([drv], BuildMode.REPAIR)
    assert Path(out, "f").read_text() == "V\n"  # the corrupt item is back
    assert b.client.is_valid_path(out)
    marker.unlink()
    b.client.build_paths([drv], BuildMode.REPAIR)
    assert Path(out, "f").read_text() == "v\n"
    _registered_matches(b, out)
    assert _leftovers(b.daemon.store_dir) == []


def test_repair_is_privileged(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--disable-chroot", users=False)
    drv, _ = b.derivation("priv", "mkdir $out")
    # A connection from another uid is untrusted: fork one that drops privileges.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            client = b.daemon.client()
            try:
                client.build_paths([drv], BuildMode.REPAIR)
            except Exception as exc:
                code = 0 if "repairing is a privileged operation" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_multiplexed_build_output(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    b.client.set_options(use_substitutes=False, overrides=[("multiplexed-build-output", "true")])
    drv, _ = b.derivation("mux", "echo one; sleep 0.2; echo two-two; mkdir $out")
    b.client.build_paths([drv])
    started = [m for m in b.logs if m.startswith(f"@ build-started {drv} ")]
    assert len(started) == 1
    pid = started[0].split()[-1]
    frames = [m for m in b.logs if m.startswith("@ build-log ")]
    assert frames, b.logs
    payload = ""
    for m in frames:
        header, _, data = m.partition("\n")
        match = re.fullmatch(r"@ build-log (\d+) (\d+)", header)
        assert match, header
        assert match.group(1) == pid
        assert int(match.group(2)) == len(data.encode())
        payload += data
    assert payload == "one\ntwo-two\n"
    # Switched off again (overrides persist for the connection), there is no framing.
    b.client.set_options(use_substitutes=False, overrides=[("multiplexed-build-output", "false")])
    b.logs.clear()
    drv2, _ = b.derivation("plain", "echo three; mkdir $out")
    b.client.build_paths([drv2])
    assert "three\n" in b.logs
    assert not any(m.startswith("@ build-log") for m in b.logs)


def test_repair_path_helper(make_builds: Callable[..., Builds], build_users: str) -> None:
    """`worker.repair_path`, what `verify --repair` needs (upstream `repairPath`): no
    substitute, so the item's deriver is rebuilt in repair mode; no deriver, an error."""
    from guixsvc.daemon.build import worker
    from guixsvc.daemon.localstore import LocalStore
    from guixsvc.daemon.settings import Settings
    from guixsvc.protocol.store_api import StoreError
    from guixsvc.store.config import StoreConfig

    b = make_builds()
    drv, outs = b.derivation("vrep", "mkdir $out; echo v > $out/f")
    b.client.build_paths([drv])
    text = b.client.add_text_to_store("plain-text", "abc", [])
    out = outs["out"]
    _corrupt(out + "/f")
    _corrupt(text)
    settings = Settings()
    settings.set("build-users-group", build_users)
    settings.set("build-use-substitutes", "false")
    messages: list[str] = []
    store = LocalStore(
        StoreConfig.from_env(b.daemon.env),
        settings,
        lambda level, msg: messages.append(msg),
        trusted=True,
        remote=False,
    )
    try:
        worker.repair_path(store, out)
        with pytest.raises(StoreError, match=f"cannot repair path `{text}'"):
            worker.repair_path(store, text)
    finally:
        store.close()
    assert Path(out, "f").read_text() == "v\n"
    _registered_matches(b, out)
    assert f"repairing path(s) `{out}'" in messages


def test_verify_store_repairs_modified_and_vanished_outputs(
    make_builds: Callable[..., Builds],
) -> None:
    """VerifyStore with repair (`guix gc --verify=repair,contents`) rebuilds damaged items."""
    b = make_builds()
    drv, outs = b.derivation("vrep", "mkdir $out; echo fine > $out/f")
    drv2, outs2 = b.derivation("vgone", "mkdir $out; echo here > $out/g")
    b.client.build_paths([drv, drv2])
    out, gone = outs["out"], outs2["out"]
    _corrupt(out + "/f")
    os.chmod(gone, 0o755)
    os.unlink(gone + "/g")
    os.rmdir(gone)
    assert b.client.verify_store(check_contents=True, repair=True) is False  # nothing left
    assert Path(out, "f").read_text() == "fine\n"
    assert Path(gone, "g").read_text() == "here\n"
    _registered_matches(b, out)
    assert b.client.is_valid_path(gone)
