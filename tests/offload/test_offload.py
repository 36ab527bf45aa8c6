"""Offloaded builds end to end: our daemon, Debian's sshd and ssh, remote daemons with their own
stores (see helpers.py), derivations built with busybox."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient, DaemonError
from tests.build.conftest import Builds, add_busybox
from tests.offload.helpers import Cluster, make_cluster, set_options, stop_cluster
from tests.substitutes.helpers import start_node, stop_node


@pytest.fixture
def cluster2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = Path(tmp_path_factory.mktemp("offload", numbered=True))
    c = make_cluster(base, 2)
    try:
        yield c
    finally:
        stop_cluster(c)


def _valid_on(c: Cluster, index: int, path: str) -> bool:
    with c.machines[index].client() as remote:
        return remote.is_valid_path(path)


def test_offloaded_build_is_the_same_as_a_local_build(cluster2: Cluster) -> None:
    c = cluster2
    m0, m1 = c.machines
    c.write_machines(c.machine_entry(m0), c.machine_entry(m1, systems='(list "aarch64-linux")'))
    b = c.connect()
    drv, outs = b.derivation(
        "hello", "echo hello > $out; $busybox/bin/busybox mkdir -p $dev/bin; echo $out > $dev/ref",
        outputs=("out", "dev"), env={"busybox": b.busybox},
    )  # fmt: skip
    b.client.build_paths([drv])
    assert c.offloaded_to(drv) == [m0.name]
    log = "".join(c.logs)
    assert "sending " in log and f"retrieving 2 store items from '{m0.name}'" in log
    with c.machines[0].client() as remote:
        for name, path in outs.items():
            here = b.client.query_path_info(path)
            there = remote.query_path_info(path)
            # The remote built it as a local build; ours was checked and registered from it.
            assert (here.nar_hash, sorted(here.references)) == (
                there.nar_hash,
                sorted(there.references),
            ), name
            assert here.deriver == drv
    assert Path(outs["out"]).read_text() == "hello\n"
    assert b.client.query_references(outs["dev"]) == [outs["out"]]
    # The remote got the inputs (busybox, the .drv) through signed exports.
    assert _valid_on(c, 0, b.busybox) and _valid_on(c, 0, drv)
    assert not _valid_on(c, 1, drv)
    assert not b.client.verify_store(check_contents=True)


def test_machines_without_the_system_features_or_load_never_build(cluster2: Cluster) -> None:
    c = cluster2
    m0, m1 = c.machines
    m1.set_load(100.0)  # normalised to 1.0 > the default threshold 0.6
    c.write_machines(
        c.machine_entry(m0, systems='(list "aarch64-linux" "x86_64-linux")',
                        features='(list "kvm")'),
        c.machine_entry(m1),
    )  # fmt: skip
    b = c.connect()
    plain, _ = b.derivation("plain", "echo plain > $out")
    needs_big, _ = b.derivation("big", "echo big > $out", env={"requiredSystemFeatures": "big"})
    needs_kvm, _ = b.derivation("kvm", "echo kvm > $out", env={"requiredSystemFeatures": "kvm"})
    b.client.build_paths([plain, needs_big, needs_kvm])
    log = "".join(c.logs)
    assert f"normalized load on machine '{m1.name}' is 1.00" in log, log
    assert c.offloaded_to(needs_kvm) == [m0.name]
    # No machine has "big": built here.  m1 is overloaded and m0 was chosen or busy.
    assert c.offloaded_to(needs_big) == []
    assert m1.name not in c.offloaded_to(plain)
    assert not _valid_on(c, 1, needs_kvm) and not _valid_on(c, 1, plain)
    assert not _valid_on(c, 0, needs_big)


def test_host_key_mismatch_is_refused(cluster2: Cluster) -> None:
    c = cluster2
    m0, m1 = c.machines
    c.write_machines(c.machine_entry(m0, **{"host-key": f'"{m1.host_key}"'}))
    b = c.connect()
    drv, outs = b.derivation("hostkey", "echo here > $out")
    b.client.build_paths([drv])
    log = "".join(c.logs)
    assert f"server at '{m0.name}' returned a host key other than" in log
    assert c.offloaded_to(drv) == []
    assert not _valid_on(c, 0, drv)
    assert Path(outs["out"]).read_text() == "here\n"


def test_client_and_daemon_switches(cluster2: Cluster) -> None:
    c = cluster2
    m0 = c.machines[0]
    c.write_machines(c.machine_entry(m0))
    b = c.connect(use_build_hook=False)
    drv, _ = b.derivation("nohook", "echo x > $out")
    b.client.build_paths([drv])
    assert c.offloaded_to(drv) == []
    assert not _valid_on(c, 0, drv)
    # guix-daemon --no-offload: the same machines file is ignored.
    node = start_node(c.base / "nooff", c.base / "nooff" / "store", None, "--no-offload")
    try:
        (node.conf / "machines.scm").write_text((c.local.conf / "machines.scm").read_text())
        logs: list[str] = []
        with DaemonClient(node.socket, log=logs.append) as client:
            set_options(client, use_build_hook=True)
            fake = types.SimpleNamespace(store_dir=str(node.store))
            other = Builds(fake, client, add_busybox(client, c.base / "w2"), logs)  # type: ignore[arg-type]
            drv, outs = other.derivation("nooffload", "echo y > $out")
            client.build_paths([drv])
            assert "offloading" not in "".join(logs) and "normalized load" not in "".join(logs)
            assert Path(outs["out"]).read_text() == "y\n"
    finally:
        stop_node(node)


@pytest.mark.parametrize("what", ["machine", "daemon"])
def test_remote_dying_mid_build_falls_back(cluster2: Cluster, what: str) -> None:
    c = cluster2
    m0, m1 = c.machines
    c.write_machines(c.machine_entry(m0, speed="10."), c.machine_entry(m1))
    b = c.connect()
    drv, outs = b.derivation(
        "slow", "echo slow-build-begins; $busybox/bin/busybox sleep 3; echo done > $out",
        env={"busybox": b.busybox},
    )  # fmt: skip
    errors: list[BaseException] = []

    def build() -> None:
        try:
            b.client.build_paths([drv])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=build)
    t.start()
    deadline = time.monotonic() + 30
    while "slow-build-begins" not in "".join(c.logs):
        assert time.monotonic() < deadline, "".join(c.logs)
        time.sleep(0.05)
    assert c.offloaded_to(drv) == [m0.name]  # the fastest machine
    if what == "machine":
        m0.kill()  # sshd, its sessions and the daemon
    else:
        m0.kill_daemon()  # the daemon, its workers and the builder; sshd stays
    t.join(60)
    assert not t.is_alive() and not errors, errors
    log = "".join(c.logs)
    assert f"offloaded build of `{drv}' on '{m0.name}' failed; trying elsewhere" in log
    assert c.offloaded_to(drv) == [m0.name, m1.name]
    assert Path(outs["out"]).read_text() == "done\n"
    assert not b.client.verify_store(check_contents=True)
    with c.machines[1].client() as remote:
        assert remote.query_path_info(outs["out"]).nar_hash == (
            b.client.query_path_info(outs["out"]).nar_hash
        )


def test_remote_build_failure_is_reported(cluster2: Cluster) -> None:
    c = cluster2
    c.write_machines(c.machine_entry(c.machines[0]))
    b = c.connect()
    drv, outs = b.derivation("fails", "echo oops; exit 3")
    with pytest.raises(DaemonError) as info:
        b.client.build_paths([drv])
    assert info.value.status == 100
    log = "".join(c.logs)
    assert f"derivation '{drv}' offloaded to '{c.machines[0].name}' failed: " in log
    assert "oops" in log
    assert not os.path.lexists(outs["out"])


def test_parallel_builds_split_between_machines_and_here(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = Path(tmp_path_factory.mktemp("chain", numbered=True))
    c = make_cluster(base, 2, "--max-jobs=1")
    try:
        m0, m1 = c.machines
        c.write_machines(c.machine_entry(m0), c.machine_entry(m1))
        b = c.connect()
        leaves = []
        for i in range(6):
            drv, outs = b.derivation(
                f"leaf{i}", f"$busybox/bin/busybox sleep 1; echo {i} > $out",
                env={"busybox": b.busybox},
            )  # fmt: skip
            leaves.append((drv, outs["out"]))
        top, top_outs = b.derivation(
            "top",
            "cat " + " ".join(f"${{in{i}}}" for i in range(6)) + " > $out",
            inputs={d: ("out",) for d, _ in leaves},
            env={"busybox": b.busybox, **{f"in{i}": o for i, (_, o) in enumerate(leaves)}},
        )
        b.client.build_paths([top])
        where = {d: c.offloaded_to(d) for d, _ in leaves}
        assert all(len(v) <= 1 for v in where.values())
        counts = {m.name: sum(v == [m.name] for v in where.values()) for m in c.machines}
        here = sum(v == [] for v in where.values())
        assert counts[m0.name] >= 1 and counts[m1.name] >= 1 and here >= 1, where
        assert Path(top_outs["out"]).read_text() == "".join(f"{i}\n" for i in range(6))
    finally:
        stop_cluster(c)


def test_max_jobs_zero_offloads_or_fails(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = Path(tmp_path_factory.mktemp("zero", numbered=True))
    c = make_cluster(base, 1, "--max-jobs=0")
    try:
        m0 = c.machines[0]
        c.write_machines(c.machine_entry(m0))
        b = c.connect()
        drv, _ = b.derivation("zero", "echo z > $out")
        b.client.build_paths([drv])
        assert c.offloaded_to(drv) == [m0.name]
        arm, _ = b.derivation("arm", "echo a > $out", system="aarch64-linux")
        with pytest.raises(DaemonError) as info:
            b.client.build_paths([arm])
        assert "unable to start any build; either increase `--max-jobs' or enable " in str(
            info.value
        )
    finally:
        stop_cluster(c)


def _offload_cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(c.local.env, GUIX_DAEMON_SOCKET=c.local.socket)
    return subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "offload", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_offload_test_and_status_commands(cluster2: Cluster) -> None:
    c = cluster2
    m0, m1 = c.machines
    m1.set_load(float(os.cpu_count() or 1) * 4)
    c.write_machines(c.machine_entry(m0), c.machine_entry(m1))
    machines = str(c.local.conf / "machines.scm")
    r = _offload_cli(c, "test", machines)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"guix offload: testing 2 build machines defined in '{machines}'..."
    for m in (m0, m1):
        assert any(
            line.startswith(f"guix offload: Guix is usable on '{m.name}' (test returned \"")
            for line in lines
        )
        assert any(
            re.fullmatch(rf"guix offload: '{m.name}' successfully imported '.*-export-test'", line)
            for line in lines
        )
        assert any(
            re.fullmatch(rf"guix offload: successfully imported '.*-import-test' from '{m.name}'",
                         line)
            for line in lines
        )  # fmt: skip
    r = _offload_cli(c, "status", machines, r"\.3$")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(
        f"guix offload: getting status of 1 build machines defined in '{machines}'..."
    )
    out = r.stdout.splitlines()
    assert out[0] == m1.name and out[1].startswith("  kernel: Linux ")
    assert out[2].startswith("  architecture: ") and out[3].startswith("  host name: ")
    assert out[4] == "  normalized load: 1.00"
    assert re.fullmatch(r"  free disk space: \d+\.\d\d MiB", out[5])
    assert re.fullmatch(r"  time difference: -?\d+ s", out[6])
    # A wrong host key fails the test with upstream's error shape.
    c.write_machines(c.machine_entry(m0, **{"host-key": f'"{m1.host_key}"'}))
    r = _offload_cli(c, "test", machines)
    assert r.returncode == 1
    assert f"guix offload: error: server at '{m0.name}' returned a host key other than" in r.stderr
    r = _offload_cli(c, "test", machines, "x", "y")
    assert (r.returncode, r.stderr) == (1, "guix offload: error: wrong number of arguments\n")


def test_scheme_code_in_machines_file_is_reported_and_ignored(cluster2: Cluster) -> None:
    c = cluster2
    (c.local.conf / "machines.scm").write_text(
        '(define host "127.0.0.2")\n(list (build-machine (name host)))\n'
    )
    b = c.connect()
    drv, outs = b.derivation("badconf", "echo local > $out")
    b.client.build_paths([drv])
    log = "".join(c.logs)
    machines = c.local.conf / "machines.scm"
    assert f"guix offload: error: {machines}:1:0: `(define ...)' is Scheme code" in log
    assert c.offloaded_to(drv) == [] and Path(outs["out"]).read_text() == "local\n"


#: An upstream guix-daemon command (the C++ daemon; it must find `guix authenticate` for signed
#: exports, e.g. a wrapper running it under upstream's pre-inst-env).
UPSTREAM_DAEMON = os.environ.get("GUIX_UPSTREAM_DAEMON", "")


@pytest.mark.skipif(
    not (UPSTREAM_DAEMON and os.access(UPSTREAM_DAEMON, os.X_OK)),
    reason="GUIX_UPSTREAM_DAEMON does not name an upstream guix-daemon command",
)
def test_offload_to_an_upstream_daemon(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The remote side is upstream's C++ daemon: same worker protocol, same signed exports."""
    base = Path(tmp_path_factory.mktemp("offload-upstream", numbered=True))
    c = make_cluster(base, 1, remote_daemon=[UPSTREAM_DAEMON])
    try:
        (m0,) = c.machines
        # The remote really is the command given (its process is not ours).
        assert (
            not os.path.samefile(f"/proc/{m0.node.procs[0].pid}/exe", sys.executable)
            or UPSTREAM_DAEMON in Path(f"/proc/{m0.node.procs[0].pid}/cmdline").read_text()
        )
        c.write_machines(c.machine_entry(m0))
        b = c.connect()
        drv, outs = b.derivation("upstream-remote", "echo built remotely > $out")
        b.client.build_paths([drv])
        assert c.offloaded_to(drv) == [m0.name], "".join(c.logs)
        assert Path(outs["out"]).read_text() == "built remotely\n"
        with m0.client() as remote:
            here, there = b.client.query_path_info(outs["out"]), remote.query_path_info(outs["out"])
            assert here.nar_hash == there.nar_hash
        assert not b.client.verify_store(check_contents=True)
    finally:
        stop_cluster(c)
