"""Escapes tried from inside a build: each must fail (spec/build-env.md §3, §6)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.build.conftest import MODES, Builds, requires_root

pytestmark = requires_root


@pytest.fixture
def tcp_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback TCP server on the host that records every connection it gets."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            seen.append(b"connected")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        stop.set()
        t.join()
        srv.close()


def _results(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.split("=", 1) for line in f.read().splitlines())


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_escapes_fail(
    make_builds: Callable[..., Builds], tcp_listener: tuple[int, list[bytes]]
) -> None:
    port, seen = tcp_listener
    b = make_builds()
    secret = b.client.add_text_to_store("secret", "top secret\n", [])
    marker = subprocess.Popen(["sleep", "4242"])
    bb = b.busybox + "/bin/busybox"
    script = f"""
r() {{ if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }}
{{
echo tcp=$(r {bb} nc -w 2 127.0.0.1 {port} </dev/null)
echo secret=$(r {bb} cat {secret})
echo shadow=$(r {bb} cat /etc/shadow)
echo write_root=$(r {bb} touch /evil)
echo write_input=$(r {bb} touch {b.busybox}/evil)
echo write_store=$(r {bb} touch $NIX_STORE/evil)
echo nprocs=$({bb} ls /proc | {bb} grep -c '^[0-9]')
echo procs=$({bb} cat /proc/[0-9]*/cmdline 2>/dev/null | {bb} tr '\\0' ' ' \\
  | {bb} grep -c 'sleep.424[2]')
echo uid=$({bb} id -u)
echo caps=$({bb} grep CapEff /proc/self/status | {bb} tr -d '\\t ')
echo setuid=$(r {bb} su -c true)
echo pid=$$
echo hostname=$({bb} hostname)
}} > $out
({bb} setsid {bb} sleep 4343 &)
"""
    try:
        drv, outs = b.derivation("escape", script)
        b.client.build_paths([drv])
    finally:
        marker.kill()
        marker.wait()
    res = _results(outs["out"])
    assert res["tcp"] == "no" and not seen
    assert res["secret"] == "no"
    assert res["shadow"] == "no"
    assert res["write_root"] == "no"
    assert res["write_input"] == "no"
    assert not os.path.exists(b.busybox + "/evil")
    assert not os.path.exists(os.path.join(b.daemon.store_dir, "evil"))
    assert res["procs"] == "0"
    assert int(res["nprocs"]) < 10, res
    assert res["uid"] != "0"
    assert res["caps"] == "CapEff:0000000000000000"
    assert res["setuid"] == "no"
    assert res["pid"] == "1"
    assert res["hostname"] == "localhost"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 4343" not in ps


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_fixed_output_may_use_network(
    make_builds: Callable[..., Builds], tcp_listener: tuple[int, list[bytes]]
) -> None:
    """The counterpart: a fixed-output build reaches the network, the host's loopback included
    (upstream's default), through slirp4netns from a network namespace of its own."""
    import hashlib

    port, seen = tcp_listener
    b = make_builds()
    bb = b.busybox + "/bin/busybox"
    drv, _ = b.derivation(
        "net",
        f"{bb} nc -w 2 127.0.0.1 {port} </dev/null; echo done > $out",
        fixed=("sha256", hashlib.sha256(b"done\n").hexdigest()),
    )
    b.client.build_paths([drv])
    assert seen


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_inputs_stay_read_only(make_builds: Callable[..., Builds]) -> None:
    """Rootless, the builder's uid outside is the store owner's: an input, a file input and
    the chroot must still be out of its reach, by chmod, by a hard link's inode, and by a
    remount from a nested user namespace (inherited mounts are locked read-only)."""
    b = make_builds()
    bb = b.busybox + "/bin/busybox"
    file_input = b.client.add_text_to_store("plain", "original\n", [])
    script = f"""
r() {{ if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }}
{{
echo chmod_input=$(r {bb} chmod u+w {b.busybox}/bin)
echo write_file_input=$(r {bb} sh -c '{bb} chmod u+w {file_input}; echo evil > {file_input}')
echo rm_file_input=$(r {bb} rm -f {file_input})
echo write_etc=$(r {bb} sh -c 'echo x > /etc/passwd')
echo remount=$(r {bb} unshare -r -m {bb} sh -c \\
  '{bb} mount -o remount,bind,rw {b.busybox} && {bb} touch {b.busybox}/evil')
echo write_tmp=$(r {bb} touch /tmp/ok)
}} > $out
"""
    drv, outs = b.derivation("ro", script, sources=(file_input,))
    b.client.build_paths([drv])
    res = _results(outs["out"])
    assert res == {"chmod_input": "no", "write_file_input": "no", "rm_file_input": "no",
                   "write_etc": "no", "remount": "no", "write_tmp": "yes"}, res  # fmt: skip
    with open(file_input) as f:
        assert f.read() == "original\n"
    assert not os.path.exists(b.busybox + "/evil")
    assert os.stat(b.busybox + "/bin").st_mode & 0o222 == 0
