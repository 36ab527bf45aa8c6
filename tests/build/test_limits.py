"""Timeouts, rounds and check mode, keep-failed, cached failures, log options."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guixsvc.daemon.build.logs import log_file_name, read_log
from guixsvc.protocol.client import DaemonError
from guixsvc.protocol.ops import BuildMode, GCAction
from tests.build.conftest import Builds, requires_root

pytestmark = requires_root


def _no_process(pattern: str) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return pattern not in ps


def test_timeout(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--timeout=2")
    drv, _ = b.derivation("slow", "while true; do echo tick; sleep 0.3; done; sleep 1001")
    start = time.monotonic()
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 101
    assert time.monotonic() - start < 8
    assert f"building of `{drv}' timed out after 2 seconds\n" in b.logs
    assert _no_process("sleep 1001")


def test_silent_timeout(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    b.client.set_options(use_substitutes=False, overrides=[("build-max-silent-time", "1")])
    drv, _ = b.derivation("silent", "echo start; sleep 1002 & sleep 1003")
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 101
    assert f"building of `{drv}' timed out after 1 seconds of silence\n" in b.logs
    assert _no_process("sleep 1002") and _no_process("sleep 1003")


NONDET = "mkdir $out; cat /proc/sys/kernel/random/uuid > $out/r"


def test_rounds_detect_nondeterminism(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--rounds=2", verbosity=1)
    drv, outs = b.derivation("nondet", NONDET)
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 1
    p = outs["out"]
    assert f"output ‘{p}’ of ‘{drv}’ differs from previous round\n" in b.logs
    assert any("(round 2/2)" in m for m in b.logs)
    assert not b.client.is_valid_path(p)
    det, douts = b.derivation("det", "mkdir $out; echo same > $out/r")
    b.client.build_paths([det])
    assert b.client.is_valid_path(douts["out"])


def test_rounds_keep_failed_keeps_check_output(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--rounds=2", keep_failed=True)
    drv, outs = b.derivation("nondet", NONDET)
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    p = outs["out"]
    assert os.path.isdir(p + "-check")
    assert f"output ‘{p}’ of ‘{drv}’ differs from ‘{p}-check’ from previous round\n" in b.logs


def test_check_mode(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    det, _ = b.derivation("det", "mkdir $out; echo same > $out/r")
    with pytest.raises(DaemonError, match="not valid, so checking is not possible"):
        b.client.build_paths([det], BuildMode.CHECK)
    b.client.build_paths([det])
    b.client.build_paths([det], BuildMode.CHECK)
    drv, outs = b.derivation("nondet", NONDET)
    b.client.build_paths([drv])
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv], BuildMode.CHECK)
    assert str(exc.value) == (
        f"derivation `{drv}' may not be deterministic: output `{outs['out']}' differs"
    )
    assert b.client.is_valid_path(outs["out"])


def test_check_mode_builds_inputs_normally(make_builds: Callable[..., Builds]) -> None:
    """Only the derivations the client names are checked; their inputs are built in normal
    mode (upstream tests/store.scm "build-things, check mode"), so an input whose own inputs
    are gone (as after substituting it) does not stop the check."""
    b = make_builds()
    c_drv, c_outs = b.derivation("c-src", "mkdir $out; echo c > $out/c")
    b_drv, b_outs = b.derivation(
        "b-mid", "mkdir $out; echo b > $out/b", inputs={c_drv: ("out",)}
    )  # B's output does not refer to C's
    a_drv, a_outs = b.derivation(
        "a-top", f"mkdir $out; cat {b_outs['out']}/b > $out/a", inputs={b_drv: ("out",)}
    )
    b.client.build_paths([a_drv])
    b.client.collect_garbage(GCAction.DELETE_SPECIFIC, [c_outs["out"]])
    assert not b.client.is_valid_path(c_outs["out"])
    b.logs.clear()
    b.client.build_paths([a_drv], BuildMode.CHECK)
    assert b.client.is_valid_path(a_outs["out"])
    # The input was not rebuilt, let alone checked: C stays gone.
    assert not b.client.is_valid_path(c_outs["out"])


def test_check_mode_without_chroot_rewrites_hashes(make_builds: Callable[..., Builds]) -> None:
    """Without a chroot the valid output cannot be built over: the builder gets another name
    for it and the result is rewritten back before the comparison (upstream's hash rewriting;
    tests/store.scm "build-succeeded trace in check mode" under --disable-chroot)."""
    b = make_builds("--disable-chroot", users=False)
    det, outs = b.derivation("self-ref", "mkdir $out; echo $out > $out/me")
    b.client.build_paths([det])
    out = outs["out"]
    before = b.client.query_path_info(out)
    b.logs.clear()
    b.client.build_paths([det], BuildMode.CHECK)
    assert f"@ build-succeeded {det} -\n" in b.logs
    assert any(line.startswith("warning: rewriting hashes in `") for line in b.logs), b.logs
    # The valid output was neither touched nor re-registered differently.
    assert Path(out, "me").read_text() == out + "\n"
    assert b.client.query_path_info(out) == before
    drv, nd_outs = b.derivation("nondet-nochroot", NONDET)
    b.client.build_paths([drv])
    with pytest.raises(DaemonError, match="may not be deterministic"):
        b.client.build_paths([drv], BuildMode.CHECK)
    assert b.client.is_valid_path(nd_outs["out"])
    # No redirected output is left behind.
    leftovers = [n for n in os.listdir(b.daemon.store_dir) if n.endswith("-self-ref")]
    assert leftovers == [os.path.basename(out)]


def test_keep_failed(make_builds: Callable[..., Builds]) -> None:
    b = make_builds(keep_failed=True)
    drv, _ = b.derivation("kept", "echo data > file; exit 1")
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    top = str(b.daemon.root / "tmp" / "guix-build-kept.drv-0")
    assert f"note: keeping build directory `{top}'\n" in b.logs
    # A root client: the tree stays at <top>/top.
    with open(top + "/top/file") as f:
        assert f.read() == "data\n"


def test_cache_failures(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--cache-failures")
    drv, outs = b.derivation("cached", "exit 1")
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    assert b.client.query_failed_paths() == [outs["out"]]
    b.logs.clear()
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 100
    assert f"builder for `{outs['out']}' failed previously (cached)\n" in b.logs
    b.client.clear_failed_paths([outs["out"]])
    assert b.client.query_failed_paths() == []


@pytest.mark.parametrize("compression", ["bzip2", "none"])
def test_log_compression(make_builds: Callable[..., Builds], compression: str) -> None:
    b = make_builds(f"--log-compression={compression}")
    drv, _ = b.derivation("logged", "echo one; echo two >&2; mkdir $out")
    b.client.build_paths([drv])
    path = log_file_name(b.daemon.env["GUIX_LOG_DIRECTORY"], drv, compression)
    assert read_log(path) == b"one\ntwo\n"


def test_lose_logs(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--lose-logs")
    drv, _ = b.derivation("nolog", "echo one; mkdir $out")
    b.client.build_paths([drv])
    assert not os.path.exists(os.path.join(b.daemon.env["GUIX_LOG_DIRECTORY"], "drvs"))


def test_cores_exported(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--cores=3")
    drv, outs = b.derivation("cores", "echo $NIX_BUILD_CORES > $out")
    b.client.build_paths([drv])
    with open(outs["out"]) as f:
        assert f.read() == "3\n"


def test_client_hanging_up_interrupts_its_build(make_builds: Callable[..., Builds]) -> None:
    """A client that goes away mid-build takes its builds with it (upstream's SIGPOLL
    handling): the builder is killed, nothing is registered, the locks are free again."""
    b = make_builds()
    marker = f"guixsvc-hangup-{os.getpid()}"
    drv, outs = b.derivation("hangup", f"echo {marker}; exec $busybox/bin/busybox sleep 300",
                             env={"busybox": b.busybox})  # fmt: skip
    thread = threading.Thread(target=_build_quietly, args=(b, drv))
    thread.start()
    deadline = time.monotonic() + 30
    while not _sleepers(b.busybox) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sleepers(b.busybox), "the builder never started"
    b.client.sock.shutdown(socket.SHUT_RDWR)
    thread.join(30)
    deadline = time.monotonic() + 30
    while _sleepers(b.busybox) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _sleepers(b.busybox), "the builder outlived its client"
    assert not os.path.exists(outs["out"])
    with b.daemon.client() as c:
        assert not c.is_valid_path(outs["out"])
        # The daemon goes on building for others.
        c.set_options(use_substitutes=False)
        quick, quick_outs = dataclasses.replace(b, client=c).derivation(
            "after-hangup", "echo done > $out"
        )
        c.build_paths([quick])
        assert c.is_valid_path(quick_outs["out"])


def _build_quietly(b: Builds, drv: str) -> None:
    with contextlib.suppress(Exception):
        b.client.build_paths([drv])


def _sleepers(busybox: str) -> list[int]:
    """Pids of running `busybox sleep 300` processes of this busybox."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[:3] == [f"{busybox}/bin/busybox".encode(), b"sleep", b"300"]:
                    found.append(int(pid))
    return found
