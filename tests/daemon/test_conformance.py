"""Behaviour pinned to upstream's daemon, found by running upstream's test suite against ours.

Each test names the upstream test (tests/store.scm, tests/derivations.scm, tests/guix-daemon.sh of
the 2022 tree) or source (nix/libstore/build.cc, nix/nix-daemon/nix-daemon.cc,
guix/scripts/substitute.scm) whose behaviour it pins.  Substitutes come, as in upstream's suite,
from a `file://` directory of hand-written narinfos with unauthenticated substitutes allowed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.store import base32, nar
from tests.conftest import Daemon, stop_daemon, store_env, wait_for_socket

HASH = "0" * 31 + "1"


def start(root: Path, *flags: str) -> Daemon:
    env = store_env(root)
    env["GUIX_ALLOW_UNAUTHENTICATED_SUBSTITUTES"] = "yes"
    sock = str(root / "daemon.sock")
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "guixsvc.daemon.cli", f"--listen={sock}", "--disable-chroot",
         *flags],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_socket(sock, proc, root / "daemon.log")
    return Daemon(root, sock, env, proc)


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Daemon]:
    daemon = start(tmp_path)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


def cache_dir(d: Daemon) -> Path:
    path = d.root / "substitutes"
    path.mkdir(exist_ok=True)
    return path


def write_narinfo(
    d: Daemon,
    item: str,
    *,
    url: str = "example.nar",
    nar_hash: str | None,
    nar_size: int = 1234,
    deriver: str | None = None,
) -> None:
    """A narinfo like upstream's `derivation-narinfo` (guix/tests.scm): NarSize 1234."""
    lines = [f"StorePath: {item}", f"URL: {url}", "Compression: none", f"NarSize: {nar_size}"]
    if nar_hash is not None:
        lines.append(f"NarHash: sha256:{nar_hash}")
    lines += ["References: ", "System: x86_64-linux"]
    if deriver is not None:
        lines.append(f"Deriver: {deriver}")
    name = os.path.basename(item)[:32] + ".narinfo"
    (cache_dir(d) / name).write_text("\n".join(lines) + "\n")


def client(d: Daemon, log: list[str] | None = None) -> DaemonClient:
    c = DaemonClient(d.socket, log=log.append if log is not None else None)
    url = cache_dir(d).as_uri()
    c.set_options(overrides=[("substitute-urls", url)])
    return c


CONTENTS = b"hello, world"
NAR = nar.dump_regular(CONTENTS)


def nar_hash32(data: bytes = NAR) -> str:
    import hashlib

    return base32.encode(hashlib.sha256(data).digest())


# --- substitutes -------------------------------------------------------------------------------


def test_nar_size_is_not_checked_and_the_narinfo_size_is_registered(d: Daemon) -> None:
    """tests/store.scm "substitute" & co: the fixtures say NarSize 1234 whatever the NAR; the
    daemon registers what `guix substitute` reported (`success HASH SIZE`): the narinfo's size
    ("substitute and large size" expects 2^31 + 100 back from query-path-info)."""
    item = f"{d.store_dir}/{HASH}-substitute-me"
    (cache_dir(d) / "example.nar").write_bytes(NAR)
    write_narinfo(d, item, nar_hash=nar_hash32(), nar_size=2**31 + 100)
    with client(d) as c:
        assert c.has_substitutes(item)
        c.build_paths([item])
        assert c.is_valid_path(item)
        assert Path(item).read_bytes() == CONTENTS
        assert c.query_path_info(item).nar_size == 2**31 + 100


def test_substitutable_path_info_with_a_size_beyond_63_bits(d: Daemon) -> None:
    """tests/store.scm "substitute query and large size" (<https://issues.guix.gnu.org/51983>)
    and "substitute query": the size comes back whole, with the deriver."""
    from guixsvc.protocol.ops import Op
    from guixsvc.protocol.wire import encode_strings

    item = f"{d.store_dir}/{HASH}-bad-size"
    deriver = f"{HASH[:-1]}2-bad-size.drv"
    write_narinfo(d, item, url="http://example.org", nar_hash=nar_hash32(),
                  nar_size=2**63 + 100)  # fmt: skip
    narinfo = cache_dir(d) / f"{HASH}.narinfo"
    narinfo.write_text(narinfo.read_text() + f"Deriver: {deriver}\n")
    with client(d) as c:
        c.call(Op.QUERY_SUBSTITUTABLE_PATH_INFOS, encode_strings([item]))
        assert c.read_int() == 1
        assert c.read_string() == item
        assert c.read_string() == f"{d.store_dir}/{deriver}"
        assert c.read_strings() == []
        c.read_int()  # download size
        assert c.read_int() == 2**63 + 100


def test_has_substitutes_without_nar_hash(d: Daemon) -> None:
    """tests/guix-daemon.sh (line 58): a narinfo without NarHash still makes the item
    substitutable; fetching it then fails and leaves nothing behind."""
    item = f"{d.store_dir}/{HASH}-no-hash"
    (cache_dir(d) / "example.nar").write_bytes(NAR)
    write_narinfo(d, item, url="/nowhere/example.nar", nar_hash=None)
    with client(d) as c:
        assert c.has_substitutes(item)
        assert c.query_substitutable_paths([item]) == [item]
        with pytest.raises(DaemonError, match="cannot be created"):
            c.ensure_path(item)
        assert not c.is_valid_path(item)
    assert not os.path.exists(item)


@pytest.mark.parametrize("kind", ["full file name", "not a store item"])
def test_an_odd_deriver_does_not_hide_the_substitute(d: Daemon, kind: str) -> None:
    """tests/guix-daemon.sh (line 58) writes `Deriver: $drv`, a full file name; upstream still
    substitutes (the deriver is information only).  A well-formed full name is kept."""
    item = f"{d.store_dir}/{HASH}-odd-deriver"
    drv = f"{d.store_dir}/{'1' * 32}-odd-deriver.drv"
    (cache_dir(d) / "example.nar").write_bytes(NAR)
    deriver = drv if kind == "full file name" else "../not/a/store item"
    write_narinfo(d, item, nar_hash=nar_hash32(), deriver=deriver)
    with client(d) as c:
        assert c.has_substitutes(item)
        c.ensure_path(item)
        info = c.query_path_info(item)
        assert info is not None
        assert info.deriver == (drv if kind == "full file name" else None)


def test_traces_of_a_hash_mismatch(d: Daemon) -> None:
    """tests/store.scm "substitute, corrupt output hash, build trace": `@ hash-mismatch ITEM
    sha256 EXPECTED ACTUAL` then `@ substituter-failed ITEM ...` (build.cc, `finished`)."""
    item = f"{d.store_dir}/{HASH}-corrupt-substitute"
    (cache_dir(d) / "example.nar").write_bytes(NAR)
    zeros = base32.encode(bytes(32))
    write_narinfo(d, item, nar_hash=zeros)
    log: list[str] = []
    with client(d, log) as c:
        with pytest.raises(DaemonError) as err:
            c.build_paths([item])
        assert err.value.status != 0
        assert not c.is_valid_path(item)
    text = "".join(log)
    assert f"@ substituter-started {item} substitute\n" in text
    assert f"@ hash-mismatch {item} sha256 {zeros} {nar_hash32()}\n" in text
    assert f"@ substituter-failed {item} " in text
    assert f"hash mismatch for substituted item `{item}'" in text


def test_traces_of_a_substitution(d: Daemon) -> None:
    item = f"{d.store_dir}/{HASH}-traced"
    (cache_dir(d) / "example.nar").write_bytes(NAR)
    write_narinfo(d, item, nar_hash=nar_hash32())
    log: list[str] = []
    with client(d, log) as c:
        c.build_paths([item])
    text = "".join(log)
    assert f"@ substituter-started {item} substitute\n" in text
    assert f"@ substituter-succeeded {item}\n" in text
    assert text.index("substituter-started") < text.index("substituter-succeeded")


def test_build_things_of_an_output_path_without_substitute(d: Daemon) -> None:
    """tests/store.scm "build-things with output path": no substitute for the item is not a
    failure (`ecNoSubstituters`), nothing is built."""
    item = f"{d.store_dir}/{HASH}-nowhere"
    with client(d) as c:
        c.build_paths([item])
        assert not c.is_valid_path(item)
        c.set_options(use_substitutes=False)
        c.build_paths([item])
        assert not c.is_valid_path(item)


def test_built_in_builders(d: Daemon) -> None:
    """tests/derivations.scm "built-in-builders": only what is implemented is advertised
    (newer clients pick `builtin:git-download` because it is advertised)."""
    with client(d) as c:
        assert c.builtin_builders() == ["download"]


class _UnframedServer:
    """Serves one NAR like upstream's `guix publish -C 0`: no Content-Length, no chunking, and
    the connection kept open afterwards.  With `trickle`, the body comes a byte every
    `trickle` seconds; with `stall`, only its first `stall` bytes ever come."""

    def __init__(self, body: bytes, *, trickle: float = 0, stall: int | None = None) -> None:
        self.body = body
        self.trickle = trickle
        self.stall = stall
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-nix-archive\r\n"
                    b"Connection: keep-alive\r\n\r\n"
                )
                body = self.body if self.stall is None else self.body[: self.stall]
                if not self.trickle:
                    conn.sendall(body)
                    continue
                for i in range(len(body)):
                    conn.sendall(body[i : i + 1])
                    threading.Event().wait(self.trickle)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_uncompressed_nar_without_length_ends_with_the_nar(d: Daemon) -> None:
    """Upstream's client stops at the end of the NAR structure; reading until EOF would wait
    for the kept-alive connection to time out and fail."""
    server = _UnframedServer(NAR)
    try:
        item = f"{d.store_dir}/{HASH}-unframed"
        url = f"http://127.0.0.1:{server.port}/nar/{HASH}-unframed"
        write_narinfo(d, item, url=url, nar_hash=nar_hash32())
        with client(d) as c:
            c.sock.settimeout(25)
            c.ensure_path(item)
            assert Path(item).read_bytes() == CONTENTS
    finally:
        server.close()


@pytest.mark.parametrize(
    ("flag", "server", "message"),
    [
        ("--max-silent-time=1", {"stall": 40}, "timed out after 1 seconds of silence"),
        ("--timeout=2", {"trickle": 0.2}, "timed out after 2 seconds"),
    ],
)
def test_download_timeouts(tmp_path: Path, flag: str, server: dict, message: str) -> None:
    """build.cc applies --max-silent-time and --timeout to `guix substitute` as to a builder:
    `substitution of `P' timed out after N seconds [of silence]`, `@ substituter-failed P
    timeout`, and the item is not substituted."""
    import time

    d = start(tmp_path, flag)
    srv = _UnframedServer(NAR, **server)
    try:
        item = f"{d.store_dir}/{HASH}-slow"
        url = f"http://127.0.0.1:{srv.port}/nar/{HASH}-slow"
        write_narinfo(d, item, url=url, nar_hash=nar_hash32())
        log: list[str] = []
        with client(d, log) as c:
            c.sock.settimeout(25)
            started = time.monotonic()
            with pytest.raises(DaemonError):
                c.build_paths([item])
            assert time.monotonic() - started < 20
            assert not c.is_valid_path(item)
        text = "".join(log)
        assert f"substitution of `{item}' {message}" in text
        assert f"@ substituter-failed {item} timeout\n" in text
    finally:
        srv.close()
        stop_daemon(d)


# --- store file names --------------------------------------------------------------------------


def test_names_without_a_nix_base32_hash_part(d: Daemon) -> None:
    """tests/store.scm "valid-path? false" and (guix nar)'s `temporary-store-file`: upstream
    checks only that a path is directly in the store; the session goes on after errors on
    such names (QueryPathInfo, QueryValidDerivers, AddTempRoot)."""
    bogus = f"{d.store_dir}/{'e' * 32}-foobar"
    temp = f"{d.store_dir}/guix-Ab3dE9"
    with client(d) as c:
        assert not c.is_valid_path(bogus)
        assert c.query_valid_derivers(bogus) == []
        with pytest.raises(DaemonError, match="is not valid"):
            c.query_path_info(bogus)
        c.add_temp_root(temp)
        c.add_temp_root(bogus)
        roots = (Path(d.state_dir) / "temproots").iterdir()
        held = b"".join(r.read_bytes() for r in roots).split(b"\0")
        assert temp.encode() in held and bogus.encode() in held
        assert c.query_valid_paths([bogus, temp]) == []
        with pytest.raises(DaemonError, match="not in the store"):
            c.is_valid_path("foo")
        with pytest.raises(DaemonError, match="is not valid"):
            c.query_path_info(temp)
        # Still the same session, still working.
        p = c.add_text_to_store("after-errors", b"yes")
        assert c.is_valid_path(p)


@pytest.mark.parametrize("name", ["..", ".", ".links", "a/b"])
def test_dot_names_and_subdirectories_are_refused(d: Daemon, name: str) -> None:
    """Beyond upstream: `.`, `..`, dot files and sub-directories are never store items."""
    with client(d) as c, pytest.raises(DaemonError, match="not in the store"):
        c.is_valid_path(f"{d.store_dir}/{name}")


# --- start-up ----------------------------------------------------------------------------------


def test_listens_before_the_store_is_ready_but_serves_only_after(tmp_path: Path) -> None:
    """Upstream's socket exists a few milliseconds after start (its test suite connects at
    once); ours is bound before the rest of the daemon loads.  Nobody is served before the store
    is initialised: here the big lock is held, so initialisation waits, and a client that
    connected meanwhile gets its handshake answered only once the lock is released."""
    import fcntl
    import time

    from guixsvc.protocol.ops import WORKER_MAGIC_1, WORKER_MAGIC_2
    from guixsvc.protocol.wire import encode_int

    env = store_env(tmp_path)
    db_dir = Path(env["GUIX_DATABASE_DIRECTORY"])
    db_dir.mkdir(parents=True)
    lock = os.open(db_dir / "big-lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(lock, fcntl.LOCK_EX)
    sock = str(tmp_path / "daemon.sock")
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "guixsvc.daemon.cli", f"--listen={sock}", "--disable-chroot"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    daemon = Daemon(tmp_path, sock, env, proc)
    try:
        early = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 20
        while True:  # connectable while the store is locked
            try:
                early.connect(sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
        early.sendall(encode_int(WORKER_MAGIC_1))
        early.settimeout(1.0)
        with pytest.raises(TimeoutError):
            early.recv(8)  # no worker yet: the store is not initialised
        assert not (db_dir / "db.sqlite").exists()
        os.close(lock)  # releases the lock: the store is initialised, workers start
        early.settimeout(20)
        assert int.from_bytes(early.recv(8), "little") == WORKER_MAGIC_2
        early.close()
        with DaemonClient(sock) as c:
            p = c.add_text_to_store("after-start", b"ok")
            assert c.is_valid_path(p)
    finally:
        with contextlib.suppress(OSError):
            os.close(lock)
        stop_daemon(daemon)


def test_stopped_while_starting_workers_prints_no_traceback(tmp_path: Path) -> None:
    """SIGTERM right after the socket appears (workers being forked, the store being opened)."""
    import signal
    import time

    for i in range(12):
        root = tmp_path / str(i)
        root.mkdir()
        env = store_env(root)
        sock = str(root / "daemon.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "guixsvc.daemon.cli", f"--listen={sock}", "--disable-chroot"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        while not os.path.exists(sock) and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(0.003 * i)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert b"Traceback" not in out, out.decode(errors="replace")


# --- guix processes ----------------------------------------------------------------------------


def test_sessions_are_named_as_upstream_names_them(d: Daemon) -> None:
    """guix/scripts/processes.scm: a session is a process whose command line is
    `guix-daemon CLIENT-PID …` (nix-daemon.cc writes the client pid over argv[1]); the main
    process and idle workers are `guix-daemon …` with no pid.  `guixsvc processes` prints
    upstream's recutils records for a real client holding a session (and a lock)."""
    from guixsvc.processes import daemon_sessions

    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from guixsvc.protocol.client import DaemonClient\n"
            "c = DaemonClient(sys.argv[1])\n"
            "c.is_valid_path(sys.argv[2])\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        ), d.socket, f"{d.store_dir}/{HASH}-x"],
        env=d.env, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"
        sessions = [s for s in daemon_sessions(d.store_dir) if s.client.pid == holder.pid]
        assert len(sessions) == 1
        session = sessions[0].process
        assert session.command[:2] == ["guix-daemon", str(holder.pid)]
        assert Path(f"/proc/{session.pid}/comm").read_text() == "guix-daemon\n"
        assert session.parent == d.process.pid
        main_cmd = Path(f"/proc/{d.process.pid}/cmdline").read_bytes().split(b"\0")
        assert main_cmd[0] == b"guix-daemon" and not main_cmd[1].isdigit()
        # Idle workers do not look like sessions.
        ours = [s for s in daemon_sessions(d.store_dir) if s.process.parent == d.process.pid]
        assert [s.process.pid for s in ours] == [session.pid]

        out = subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "processes"],
            env=d.env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        record = next(r for r in out.split("\n\n") if f"ClientPID: {holder.pid}\n" in r + "\n")
        lines = record.splitlines()
        assert lines[0] == f"SessionPID: {session.pid}"
        assert lines[1] == f"ClientPID: {holder.pid}"
        assert lines[2].startswith(f"ClientCommand: {sys.executable} -c ")
        norm = subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "processes", "--format=normalized"],
            env=d.env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert norm.startswith("%rec: Session\n")
        assert f"PID: {session.pid}\nClientPID: {holder.pid}\n" in norm
    finally:
        holder.kill()
        holder.wait()
    # The session ended: the worker is idle again and no longer a session.
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cmd = Path(f"/proc/{session.pid}/cmdline").read_bytes().split(b"\0")
        if not cmd[1].isdigit():
            break
        time.sleep(0.05)
    assert cmd[0] == b"guix-daemon" and not cmd[1].isdigit()


def test_processes_command_line() -> None:
    run = [sys.executable, "-m", "guixsvc.cli", "processes"]
    bad = subprocess.run([*run, "--format=xml"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr == "guix processes: error: xml: unsupported output format\n"
    formats = subprocess.run([*run, "--list-formats"], capture_output=True, text=True)
    assert formats.stdout == "The available formats are:\n\n  - recutils\n  - normalized\n"
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True)
    assert helped.stdout.startswith("Usage: guix processes\n")


# --- builtin:download run by an unprivileged daemon -----------------------------------------


NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def unprivileged() -> Iterator[Daemon]:
    """Our daemon run by `nobody` on a store it owns (builtins run as the daemon's user)."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs root (to become nobody) and /usr/bin/python3")
    if not all(os.stat(p).st_mode & 0o005 == 0o005 for p in [REPO, *REPO.parents]):
        pytest.skip("source tree not readable by nobody")
    base = Path(tempfile.mkdtemp(prefix="guixsvc-builtin-"))
    root = base / "n"
    root.mkdir()
    env = store_env(root)
    for path in (base, root, root / "etc"):
        os.chown(path, NOBODY, NOBODY)
    sock = str(root / "daemon.sock")
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-m", "guixsvc.daemon.cli", f"--listen={sock}", "--no-substitutes"],
        env={**env, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT, cwd="/",
        user=NOBODY, group=NOBODY, extra_groups=[],
    )  # fmt: skip
    daemon = Daemon(root, sock, env, proc)
    try:
        wait_for_socket(sock, proc, root / "daemon.log")
        yield daemon
    finally:
        stop_daemon(daemon)
        shutil.rmtree(base, ignore_errors=True)


def add_download_drv(
    c: DaemonClient, d: Daemon, name: str, url: str, data: bytes | None
) -> tuple[str, str]:
    """A `builtin:download` derivation of URL (fixed-output when DATA is given)."""
    import hashlib

    from guixsvc.store.derivation import (
        Derivation,
        DerivationOutput,
        expected_output_paths,
        unparse_derivation,
    )
    from guixsvc.store.paths import StoreDir

    fixed = ("sha256", hashlib.sha256(data).hexdigest()) if data is not None else ("", "")
    drv = Derivation(
        outputs={"out": DerivationOutput("", *fixed)},
        input_drvs={},
        input_srcs=frozenset(),
        platform="x86_64-linux",
        builder="builtin:download",
        args=[],
        env={"out": "", "url": f'"{url}"', "preferLocalBuild": "1"},
    )
    sd = StoreDir(d.store_dir)
    out = sd.display(expected_output_paths(sd, name, drv, lambda p: None, {})["out"])  # type: ignore[arg-type,return-value]
    drv.outputs["out"].path = drv.env["out"] = out
    return c.add_text_to_store(f"{name}.drv", unparse_derivation(drv), []), out


def test_builtin_download_refuses_non_fixed_output(unprivileged: Daemon) -> None:
    """tests/derivations.scm "'download' built-in builder, not fixed-output": the daemon's own
    `file://` store item is not downloaded."""
    d = unprivileged
    log: list[str] = []
    with DaemonClient(d.socket, log=log.append) as c:
        source = c.add_text_to_store("hello", b"hi!")
        drv, out = add_download_drv(c, d, "world", f"file://{source}", None)
        with pytest.raises(DaemonError, match="failed"):
            c.build_paths([drv])
        assert not c.is_valid_path(out)
    assert f"{drv} is not a fixed-output derivation" in "".join(log)
    assert not os.path.exists(out)


def test_builtin_download_skips_file_urls(unprivileged: Daemon) -> None:
    """`url-fetch` tries only http, https and ftp: a `file://` URL is skipped, even for a
    fixed-output derivation whose hash matches the file."""
    d = unprivileged
    secret = d.root / "readable-by-the-daemon"
    secret.write_bytes(b"the daemon's own file\n")
    os.chown(secret, NOBODY, NOBODY)
    log: list[str] = []
    with DaemonClient(d.socket, log=log.append) as c:
        drv, out = add_download_drv(c, d, "file", f"file://{secret}", secret.read_bytes())
        with pytest.raises(DaemonError, match="failed"):
            c.build_paths([drv])
        assert not c.is_valid_path(out)
    assert f'skipping URI with unsupported scheme: "file://{secret}"' in "".join(log)


def test_builtin_download_check_mode_leaves_the_output_alone(unprivileged: Daemon) -> None:
    """tests/derivations.scm "'download' built-in builder, check mode": the check downloads
    next to the valid output (upstream's hash rewriting), which stays as it was."""
    import http.server

    from guixsvc.protocol.ops import BuildMode

    payload = b"text to download\n" * 50

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = unprivileged
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/file"
        log: list[str] = []
        with DaemonClient(d.socket, log=log.append) as c:
            drv, out = add_download_drv(c, d, "world", url, payload)
            c.build_paths([drv])
            before = os.lstat(out)
            assert Path(out).read_bytes() == payload and before.st_mode & 0o222 == 0
            c.build_paths([drv], BuildMode.CHECK)
            after = os.lstat(out)
            assert (after.st_ino, after.st_mtime, after.st_mode) == (
                before.st_ino, before.st_mtime, before.st_mode,
            )  # fmt: skip
            assert Path(out).read_bytes() == payload
        leftovers = [n for n in os.listdir(d.store_dir) if n.endswith("-world")]
        assert leftovers == [os.path.basename(out)]
    finally:
        server.shutdown()
        server.server_close()


def test_building_a_derivation_registered_under_a_lax_name(d: Daemon) -> None:
    """tests/store-database.scm registers `<store>/eeee…-fake` items with the client's own
    `register-items`; the daemon then treats them as any other item, derivations included."""
    from guixsvc.store.db import StoreDatabase, ValidPathInfo
    from guixsvc.store.derivation import Derivation, DerivationOutput, unparse_derivation

    out = f"{d.store_dir}/{'e' * 32}-lax"
    drv_path = f"{d.store_dir}/{'e' * 32}-lax.drv"
    drv = Derivation(
        outputs={"out": DerivationOutput(out, "", "")},
        input_drvs={},
        input_srcs=frozenset(),
        platform="x86_64-linux",
        builder="/bin/sh",
        args=["-c", "echo built > $out"],
        env={"out": out},
    )
    Path(drv_path).write_bytes(unparse_derivation(drv))
    db = StoreDatabase.open(os.path.dirname(d.db_path), fsync=False)
    try:
        db.register_valid_paths([ValidPathInfo(drv_path, "sha256:" + "00" * 32, 1, frozenset())])
        db.add_derivation_outputs(drv_path, {"out": out})
    finally:
        db.close()
    with client(d) as c:
        c.set_options(use_substitutes=False)
        assert c.query_derivation_outputs(drv_path) == [out]
        c.build_paths([drv_path])
        assert c.is_valid_path(out)
        assert c.query_path_info(out).deriver == drv_path
    assert Path(out).read_text() == "built\n"
