"""Scenario 1: socket activation of guix-daemon, a sandboxed build, restart under a live session.

* After boot nothing of ours runs but the sockets (and the read-only store mount): the daemon
  service is inactive and the store is read-only for everyone else.
* The first client connection starts guix-daemon (Type=notify, so `active` means READY=1).
* A derivation built by the daemon (busybox's sh from the store as its builder) runs as a member
  of `guixbuild` (skipped while BuildPaths answers "not implemented yet"); with the rootless
  daemon (`rootless`), as upstream's guest uid 30001 / gid 30000 in a user namespace.
* The build ran in the sandbox: its own UTS namespace (host name "localhost") and a chroot.
* `systemctl restart guix-daemon` while a client holds an idle session: the session survives and
  keeps working (KillMode=process), the old daemon's idle workers are gone, and new clients reach
  the new daemon through the same socket.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from tests.e2e.scenarios._lib import (
    CLIENT_PRELUDE,
    NOT_IMPLEMENTED,
    is_active,
    py,
    unit_property,
)

SOCKET = "/var/guix/daemon-socket/socket"

# A background client: one session, used before and after the daemon restarts.
IDLE_CLIENT = r"""
import json, os, sys, time
from guixsvc.protocol.client import DaemonClient
d = sys.argv[1]
c = DaemonClient()
before = c.add_text_to_store("e2e-before-restart", "before\n")
open(d + "/ready.tmp", "w").write(json.dumps({"before": before, "pid": os.getpid()}))
os.rename(d + "/ready.tmp", d + "/ready")
for _ in range(600):
    if os.path.exists(d + "/go"):
        break
    time.sleep(0.1)
try:
    after = c.add_text_to_store("e2e-after-restart", "after\n")
    result = {"before_valid": c.is_valid_path(before), "after": after,
              "after_valid": c.is_valid_path(after)}
except Exception as exc:
    result = {"error": repr(exc)}
open(d + "/result.tmp", "w").write(json.dumps(result))
os.rename(d + "/result.tmp", d + "/result")
"""

BUILD = (
    CLIENT_PRELUDE
    + r"""
from guixsvc.store.derivation import (Derivation, DerivationOutput, expected_output_paths,
                                      unparse_derivation)
from guixsvc.store.paths import StoreDir
import os, shutil, tempfile
# busybox picks its applet from argv[0], which the daemon sets to the builder's base name: put it
# in the store as a directory with a `bin/sh' link so that argv[0] is "sh".
tree = tempfile.mkdtemp()
os.mkdir(tree + "/bin")
shutil.copy(sys.argv[1], tree + "/bin/busybox")
os.symlink("busybox", tree + "/bin/sh")
c = DaemonClient()
bb = c.add_to_store("busybox", tree, recursive=True)
shutil.rmtree(tree)
script = (
    "echo built > $out; $busybox id -u >> $out; $busybox id -G >> $out;"
    " $busybox hostname >> $out;"
    " echo $(test -e /etc/shadow && echo host-root || echo chroot) >> $out"
)
drv = Derivation(
    outputs={"out": DerivationOutput("")},
    input_srcs=frozenset([bb]),
    platform="x86_64-linux",
    builder=bb + "/bin/sh",
    args=["-c", script],
    env={"out": "", "busybox": bb + "/bin/busybox", "PATH": "/no-path"},
)
out = expected_output_paths(StoreDir("/gnu/store"), "e2e-build", drv, None, {})["out"]
out_path = "/gnu/store/" + out.base_name
drv.outputs["out"] = DerivationOutput(out_path)
drv.env["out"] = out_path
drv_path = c.add_text_to_store("e2e-build.drv", unparse_derivation(drv), [bb])
try:
    c.build_paths([drv_path])
except DaemonError as exc:
    report(ok=False, error=exc.message)
report(ok=True, out=out_path, content=open(out_path).read())
"""
)


def _group_ids(machine: Any, group: str) -> tuple[int, list[int]]:
    entry = machine.succeed(f"getent group {group}").strip().split(":")
    members = [m for m in entry[3].split(",") if m]
    uids = [int(machine.succeed(f"id -u {m}").strip()) for m in members]
    return int(entry[2]), uids


def _service_processes(machine: Any) -> set[str]:
    """PIDs in the unit's control group, from /proc (the cgroup file system's layout differs
    between the unified and the hybrid hierarchy)."""
    group = unit_property(machine, "guix-daemon.service", "ControlGroup")
    out = machine.succeed(f"grep -lx -- '[0-9]*:[^:]*:{group}' /proc/[0-9]*/cgroup || true")
    return {line.split("/")[2] for line in out.split()}


def run(
    machine: Any, *, busybox: str | None = None, python: str = "python3", rootless: bool = False
) -> list[str]:
    """Returns the steps that were skipped (with reasons); raises on failures."""
    skipped: list[str] = []
    machine.wait_for_unit("guix-daemon.socket")
    machine.wait_for_unit("gnu-store.mount")
    # Nothing but the socket at boot.
    assert not is_active(machine, "guix-daemon.service"), "guix-daemon started at boot"
    machine.succeed(f"test -S {SOCKET}")
    mode = machine.succeed(f"stat -c %a {SOCKET}").strip()
    assert mode == "666", f"daemon socket mode {mode}"
    machine.fail("touch /gnu/store/e2e-should-be-read-only")

    # The first connection starts the daemon.
    first = py(
        machine,
        CLIENT_PRELUDE
        + """
try:
    c = DaemonClient()
    p = c.add_text_to_store("e2e-first", "first client\\n")
except Exception as exc:
    report(error=repr(exc))
report(path=p, valid=c.is_valid_path(p))
""",
        python=python,
    )
    if "error" in first:
        journal = machine.succeed("journalctl --no-pager -u guix-daemon.service | tail -n 20")
        raise AssertionError(f"first client failed: {first['error']}\n{journal}")
    assert first["valid"], first
    machine.wait_for_unit("guix-daemon.service")
    # Sessions are logged to the journal with structured fields.
    machine.wait_until_succeeds(
        "journalctl --no-pager -o verbose -u guix-daemon.service | grep -q 'GUIX_CLIENT_UID=0'",
        timeout=30,
    )
    assert unit_property(machine, "guix-daemon.service", "Type") == "notify"
    assert machine.succeed(f"cat {first['path']}") == "first client\n"
    # The store stays read-only outside the daemon's mount namespace.
    machine.fail("touch /gnu/store/e2e-should-be-read-only")

    # A sandboxed build as a build user.
    if busybox is None:
        skipped.append("build: no static busybox to use as a builder")
    else:
        status, out = machine.execute(f"{python} -c {shlex.quote(BUILD)} {shlex.quote(busybox)}")
        lines = [line for line in out.splitlines() if line.strip()]
        if status != 0 or not lines:
            raise AssertionError(f"build client failed ({status}): {out}{machine.last_stderr}")
        result = json.loads(lines[-1])
        if not result["ok"] and NOT_IMPLEMENTED in result["error"]:
            skipped.append(f"build: {result['error']}")
        else:
            assert result["ok"], f"build failed: {result}"
            built, uid, groups, hostname, root = result["content"].splitlines()[:5]
            if rootless:
                gid, build_uids = 30000, [30001]  # upstream's guest ids, mapped to guix-daemon
            else:
                gid, build_uids = _group_ids(machine, "guixbuild")
            assert built == "built"
            # The sandbox: its own UTS namespace (upstream names it "localhost") and a chroot
            # (whose /etc has passwd and group files for the build, but no shadow file).
            assert hostname == "localhost", f"builder saw host name {hostname!r}"
            assert root == "chroot", "the builder saw the machine's root file system"
            assert int(uid) in build_uids, f"builder ran as uid {uid}, not a guixbuild member"
            assert str(gid) in groups.split(), f"builder groups {groups} lack guixbuild {gid}"

    # Restart while a session is idle: nothing is lost.
    machine.succeed("rm -rf /run/e2e-idle && mkdir -p /run/e2e-idle")
    machine.succeed(
        f"{python} -c {shlex.quote(IDLE_CLIENT)} /run/e2e-idle "
        "> /run/e2e-idle/log 2>&1 < /dev/null &"
    )
    machine.wait_for_file("/run/e2e-idle/ready", timeout=60)
    ready = json.loads(machine.succeed("cat /run/e2e-idle/ready"))
    old_main = unit_property(machine, "guix-daemon.service", "MainPID")
    old_procs = _service_processes(machine)
    assert old_main in old_procs, f"main PID {old_main} not among {sorted(old_procs)}"
    machine.succeed("systemctl restart guix-daemon.service")
    machine.wait_for_unit("guix-daemon.service")
    new_main = unit_property(machine, "guix-daemon.service", "MainPID")
    assert new_main != old_main, "guix-daemon was not restarted"
    # Of the old daemon only the idle session's worker is left: its idle pre-forked workers
    # went away with it, so no new client can reach old code.
    left = old_procs & _service_processes(machine)
    assert len(left) == 1 and old_main not in left, (
        f"old daemon processes left after the restart: {sorted(left)} (old main {old_main})"
    )
    # The idle session's client is still connected (its worker was left running).
    machine.succeed(f"kill -0 {ready['pid']}")
    # A new client gets the new daemon through the same socket.
    again = py(
        machine,
        CLIENT_PRELUDE
        + """
c = DaemonClient()
p = c.add_text_to_store("e2e-new-client", "new\\n")
report(path=p, valid=c.is_valid_path(p))
""",
        python=python,
    )
    assert again["valid"], again
    machine.succeed("touch /run/e2e-idle/go")
    machine.wait_for_file("/run/e2e-idle/result", timeout=60)
    result = json.loads(machine.succeed("cat /run/e2e-idle/result"))
    assert result.get("before_valid") and result.get("after_valid"), (
        f"idle session broken by the restart: {result} " + machine.succeed("cat /run/e2e-idle/log")
    )
    return skipped
