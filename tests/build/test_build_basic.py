"""Plain chroot builds: outputs, registration, references, chains, multiple outputs, logs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable

import pytest

from guixsvc.daemon.build.logs import log_file_name, read_log
from guixsvc.protocol.client import DaemonError
from tests.build.conftest import Builds, requires_root

pytestmark = requires_root


def test_plain_build_registers_output(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    drv, outs = b.derivation(
        "hello",
        "echo building; mkdir $out; echo hi > $out/greeting; "
        "echo $HOME $PATH $NIX_BUILD_TOP $TMPDIR $PWD $NIX_STORE > $out/env; "
        "ln -s "
        + b.busybox
        + "/bin/busybox $out/bb; id -u > $out/uid; cat /etc/passwd > $out/passwd",
    )
    b.client.build_paths([drv])
    out = outs["out"]
    assert b.client.is_valid_path(out)
    with open(out + "/greeting") as f:
        assert f.read() == "hi\n"
    with open(out + "/env") as f:
        env = f.read().split()
    top = "/tmp/guix-build-hello.drv-0"
    assert env == ["/homeless-shelter", "/path-not-set", top, top, top, b.daemon.store_dir]
    with open(out + "/uid") as f:
        uid = int(f.read())
    assert uid != 0
    info = b.client.query_path_info(out)
    assert info.deriver == drv
    assert b.client.query_references(out) == [b.busybox]
    # NAR hash agrees with an independent dumper (nix-hash when installed).
    from tests.daemon.test_store_ops import oracle_nar_hash

    assert info.nar_hash == oracle_nar_hash(out)
    st = os.lstat(out + "/greeting")
    assert st.st_mtime == 1 and st.st_uid == 0 and (st.st_mode & 0o777) == 0o444
    # The log is stored, gzip-compressed, and the output was forwarded.
    log = log_file_name(b.daemon.env["GUIX_LOG_DIRECTORY"], drv, "gzip")
    assert read_log(log) == b"building\n"
    assert "building\n" in "".join(b.logs)
    # Nothing is left behind.
    assert not os.path.exists(drv + ".chroot")
    assert os.listdir(b.daemon.root / "tmp") == []
    # Building again is a no-op.
    b.client.build_paths([drv])


def test_chain_and_multiple_outputs(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    a, a_out = b.derivation(
        "a", "mkdir $out $lib; echo A > $out/a; echo $out > $lib/where", outputs=("out", "lib")
    )
    c, c_out = b.derivation(
        "c",
        "mkdir $out; cat " + a_out["lib"] + "/where > $out/x",
        inputs={a: ("lib",)},
    )
    d, d_out = b.derivation(
        "d", "mkdir $out; cat " + c_out["out"] + "/x > $out/y", inputs={c: ("out",)}
    )
    b.client.build_paths([d])
    with open(d_out["out"] + "/y") as f:
        assert f.read() == a_out["out"] + "\n"
    # c refers to a:out through its content, d to a:out as well; a:lib refers to a:out.
    assert b.client.query_references(c_out["out"]) == [a_out["out"]]
    assert b.client.query_references(a_out["lib"]) == [a_out["out"]]
    assert b.client.query_references(d_out["out"]) == [a_out["out"]]
    with sqlite3.connect(b.daemon.db_path) as db:
        rows = db.execute(
            "select v.path from ValidPaths v join ValidPaths d on v.deriver = d.path "
            "where d.path = ?",
            (a,),
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(a_out.values())


def test_failing_build_status_and_message(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    drv, outs = b.derivation("fails", "echo oops; exit 3")
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 100
    assert str(exc.value) == f"build of `{drv}' failed"
    assert f"builder for `{drv}' failed with exit code 3\n" in b.logs
    assert not b.client.is_valid_path(outs["out"])


def test_dependency_failure(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    bad, _ = b.derivation("bad", "exit 1")
    top, _ = b.derivation("top", "mkdir $out", inputs={bad: ("out",)})
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([top])
    assert exc.value.status == 100
    assert f"cannot build derivation `{top}': 1 dependencies couldn't be built\n" in b.logs


def _running_at_once(logs: list[str]) -> int:
    """The most builds running at the same time, from the `@ build-…` traces."""
    running = most = 0
    for line in "".join(logs).splitlines():
        if line.startswith("@ build-started "):
            running += 1
            most = max(most, running)
        elif line.startswith(("@ build-succeeded ", "@ build-failed ")):
            running -= 1
    return most


def test_parallel_jobs(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--max-jobs=2")
    drvs = [b.derivation(f"p{i}", f"sleep 1; mkdir $out; echo {i} > $out/i")[0] for i in range(4)]
    b.client.build_paths(drvs)
    assert _running_at_once(b.logs) == 2  # two at a time, never more
    b1 = make_builds("--max-jobs=1")
    drvs = [b1.derivation(f"q{i}", "sleep 0.3; mkdir $out")[0] for i in range(3)]
    b1.client.build_paths(drvs)
    assert _running_at_once(b1.logs) == 1


def test_max_jobs_zero(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--max-jobs=0")
    drv, _ = b.derivation("nojobs", "mkdir $out")
    with pytest.raises(DaemonError, match="unable to start any build"):
        b.client.build_paths([drv])


def test_wrong_system(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    drv, _ = b.derivation("other", "mkdir $out", system="aarch64-darwin")
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    assert any(
        f"a `aarch64-darwin' is required to build `{drv}', but I am a `x86_64-linux'" in m
        for m in b.logs
    )


def test_no_leftover_processes(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    drv, _ = b.derivation("bg", "(sleep 1000 &) ; mkdir $out")
    b.client.build_paths([drv])
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 1000" not in ps


def test_disable_chroot_without_build_users(make_builds: Callable[..., Builds]) -> None:
    b = make_builds("--disable-chroot", users=False)
    drv, outs = b.derivation(
        "nochroot", "mkdir $out; echo $NIX_BUILD_TOP > $out/top; id -u > $out/uid"
    )
    b.client.build_paths([drv])
    with open(outs["out"] + "/top") as f:
        top = f.read().strip()
    assert top == str(b.daemon.root / "tmp" / "guix-build-nochroot.drv-0")
    with open(outs["out"] + "/uid") as f:
        assert f.read() == "0\n"  # the daemon's own uid, as upstream without build users


def test_two_sessions_build_once(make_builds: Callable[..., Builds]) -> None:
    """Output locks: a second session waits, then finds the output valid (built once)."""
    import threading

    b = make_builds()
    drv, outs = b.derivation(
        "once",
        "echo run >&2; sleep 1; mkdir $out; cat /proc/sys/kernel/random/uuid > $out/id",
    )
    other = b.daemon.client()
    other.set_options(verbosity=0, use_substitutes=False)
    errors: list[BaseException] = []

    def build(client: object) -> None:
        try:
            client.build_paths([drv])  # type: ignore[attr-defined]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=build, args=(c,)) for c in (b.client, other)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(30)
    other.close()
    assert not errors
    assert b.client.is_valid_path(outs["out"])
    log = log_file_name(b.daemon.env["GUIX_LOG_DIRECTORY"], drv, "gzip")
    assert read_log(log) == b"run\n"  # a second build would have rewritten the log
