"""Upstream's own CLI (the 2022 `guix gc`, `guix archive`, `guix build FILE.drv`, `guix size`,
`guix processes`) against our daemon and against upstream's, on identically prepared stores at
the same store path: same stdout, same exit codes, same stderr once what differs by design is
set aside (upstream's daemon relays `guix substitute`'s progress lines; we never print a negative
hard-linking saving; free space).  Needs GUIX_UPSTREAM_GUIX and GUIX_UPSTREAM_DAEMON."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.build.conftest import Builds, add_busybox
from tests.substitutes.helpers import start_node, stop_node, wipe_store

NOPE = "0" * 32 + "-nope"


def _run_all(guix: str, base: Path, kind: str, daemon: list[str]) -> dict[str, tuple]:
    shared, root = base / "store", base / kind
    wipe_store(shared)
    old = os.environ.get("GUIX_DAEMON_SOCKET")
    # Upstream's daemon runs `$GUIX gc --list-busy`, which connects to the daemon first.
    os.environ["GUIX_DAEMON_SOCKET"] = str(root / "daemon.sock")
    try:
        n = start_node(root, shared, None, daemon=daemon)
    finally:
        if old is None:
            os.environ.pop("GUIX_DAEMON_SOCKET", None)
        else:
            os.environ["GUIX_DAEMON_SOCKET"] = old
    out: dict[str, tuple] = {}
    try:
        env = dict(n.env, GUIX_DAEMON_SOCKET=n.socket, XDG_CACHE_HOME=str(root / "cache"))

        def run(name: str, *args: str, stdin: bytes = b"") -> bytes:
            r = subprocess.run([guix, *args], env=env, input=stdin, capture_output=True,
                               timeout=300)  # fmt: skip
            out[name] = (r.returncode, r.stdout, r.stderr)
            return r.stdout

        work = root / "work"
        (work / "tree" / "sub").mkdir(parents=True)
        (work / "tree" / "f").write_text("hello\n")
        (work / "tree" / "sub" / "x").write_text("x")
        with n.client() as c:
            bb = add_busybox(c, work)
            dep = c.add_to_store("dep", str(work / "tree"))
            top = c.add_text_to_store("top", "uses " + dep, [dep])
            dead = c.add_text_to_store("dead", "dead")
            node = type("D", (), {"store_dir": str(shared)})()
            b = Builds(node, c, bb, [])  # type: ignore[arg-type]
            drv, outs = b.derivation("hello", "echo hi > $out; echo built", sources=(dep,))
        (root / "state" / "gcroots").mkdir(parents=True, exist_ok=True)
        os.symlink(top, root / "state" / "gcroots" / "top-root")
        run("build", "build", "--no-substitutes", drv)
        run("build-again", "build", drv)
        run("build-missing", "build", "--no-substitutes", f"{shared}/{NOPE}.drv")
        for name, *args in (
            ("list-roots", "--list-roots"), ("list-live", "--list-live"),
            ("list-dead", "--list-dead"), ("R", "-R", top), ("requisites", "--requisites", drv),
            ("referrers", "--referrers", dep), ("derivers", "--derivers", outs["out"]),
            ("references", "--references", drv), ("verify", "--verify"),
            ("verify-contents", "--verify=contents"), ("verify-repair", "--verify=repair"),
            ("verify-bad", "--verify=foo"), ("optimize", "--optimize"),
            ("list-failures", "--list-failures"), ("clear-failures", "--clear-failures", dead),
            ("d-live", "-d", top), ("d-dead", "-d", dead), ("d-missing", "-d", f"{shared}/{NOPE}"),
            ("D", "-D", outs["out"]), ("C1", "-C", "1"), ("vacuum", "--vacuum-database"),
            ("list-dead2", "--list-dead"), ("C", ),
        ):  # fmt: skip
            run(name, "gc", *args)
        run("genkey", "archive", "--generate-key")
        nar = run("export", "archive", "--export", "-r", top)
        out["export"] = (out["export"][0], len(nar), out["export"][2])  # signed: key differs
        missing = f"{top}\n{dep}\n{shared}/{NOPE}\n".encode()
        run("missing", "archive", "--missing", stdin=missing)
        run("authorize", "archive", "--authorize",
            stdin=(root / "etc" / "signing-key.pub").read_bytes())  # fmt: skip
        run("import", "archive", "--import", stdin=nar)
        run("size", "size", top)
        run("size-missing", "size", f"{shared}/{NOPE}")
        code = ("import sys, time; from guixsvc.protocol.client import DaemonClient; "
                "c = DaemonClient(sys.argv[1]); c.add_text_to_store('held', 'x'); "
                "print(flush=True); time.sleep(60)")  # fmt: skip
        holder = subprocess.Popen([sys.executable, "-c", code, n.socket], stdout=subprocess.PIPE,
                                  env=env)  # fmt: skip
        try:
            assert holder.stdout is not None
            holder.stdout.readline()
            listing = run("processes", "processes").decode()
        finally:
            holder.kill()
            holder.wait()
        # Every guix-daemon on the host is listed: keep the session of our holder.
        mine = [s for s in listing.split("\n\n") if f"ClientPID: {holder.pid}\n" in s + "\n"]
        assert len(mine) == 1, listing
        out["processes"] = (out["processes"][0], re.sub(r"PID: \d+", "PID: N", mine[0]), b"")
        norm = {bb: "BB", dep: "DEP", top: "TOP", dead: "DEAD", drv: "DRV",
                outs["out"]: "OUT", str(root): "ROOT", str(shared): "STORE"}  # fmt: skip
        return {k: _normalise(v, norm) for k, v in out.items()}
    finally:
        stop_node(n)


def _normalise(result: tuple, names: dict[str, str]) -> tuple:
    def text(value: object) -> object:
        if not isinstance(value, (bytes, str)):
            return value
        s = value.decode(errors="replace") if isinstance(value, bytes) else value
        for k, v in sorted(names.items(), key=lambda kv: -len(kv[0])):
            s = s.replace(k, v)
        lines = [
            ln for ln in s.split("\n")
            if not ln.startswith((";;;", "substitute:", "\x1b[K", "guix substitute: warning:"))
        ]  # fmt: skip
        return "\n".join(lines).replace("saves -0.00 MiB", "saves 0.00 MiB")

    return tuple(text(v) for v in result)


def test_upstream_cli_same_against_both_daemons(tmp_path: Path) -> None:
    guix = os.environ.get("GUIX_UPSTREAM_GUIX")
    daemon = os.environ.get("GUIX_UPSTREAM_DAEMON")
    if not guix or not daemon:
        pytest.skip("set GUIX_UPSTREAM_GUIX and GUIX_UPSTREAM_DAEMON (upstream's guix, daemon)")
    up = _run_all(guix, tmp_path, "up", [daemon])
    ours = _run_all(guix, tmp_path, "ours", [sys.executable, "-m", "guixsvc.daemon.cli"])
    assert up.keys() == ours.keys()
    differ = {k: (up[k], ours[k]) for k in up if up[k] != ours[k]}
    assert differ == {}
    assert up["build"][0] == 0 and up["build-missing"][0] == 1 and up["list-live"][1]
