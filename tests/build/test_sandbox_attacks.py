"""Attacks of an ordinary local user on the build sandbox (issue 12, classes 1, 2, 5 and 7).

Each test makes a builder really try the attack (busybox, or `helpers/attack.c` compiled
statically here for the system calls busybox has no applet for) and asserts that it fails *and*
leaves nothing behind: no setuid or writable file handed over, no key shared between builds, no
store item whose bytes change after registration, no build user, chroot or lock kept after a
build went wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guixsvc.daemon.build import seccomp
from guixsvc.protocol.client import DaemonClient, DaemonError
from tests.build.conftest import GROUP, MODES, Builds, requires_root

pytestmark = requires_root

HELPER_SOURCE = Path(__file__).parent / "helpers" / "attack.c"


@pytest.fixture(scope="module")
def attack_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The static attack helper (gcc and libc6-dev's static libc)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc missing (Debian packages gcc, libc6-dev)")
    out = tmp_path_factory.mktemp("attack") / "attack"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(HELPER_SOURCE)], check=True)
    return str(out)


def add_attack(b: Builds, binary: str) -> str:
    """Put the helper in the store as `<item>/bin/attack`."""
    tree = b.daemon.root / "attack-tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(binary, tree / "bin" / "attack")
    path = b.client.add_to_store("attack", str(tree))
    shutil.rmtree(tree)
    return path


def _results(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _unsafe_entries(top: str, owner: int | None = 0) -> list[str]:
    """Every entry of `top` that is setuid/setgid, group/world-writable or has another owner."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            st = os.lstat(name)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWGRP | stat.S_IWOTH):
                bad.append(f"{name} {mode:o}")
            if owner is not None and st.st_uid != owner:
                bad.append(f"{name} uid {st.st_uid}")
    return bad


def _run_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
        capture_output=True,
        text=True,
    )


def _no_build_leftovers(b: Builds) -> None:
    store = b.daemon.store_dir
    junk = [n for n in os.listdir(store) if n.endswith((".chroot", ".pivot")) or ".tmp-" in n]
    assert junk == []
    tmp = b.daemon.root / "tmp"
    assert [n for n in os.listdir(tmp) if n.startswith("guix-build-")] == []
    ps = subprocess.run(["ps", "-eo", "user:32,args"], capture_output=True, text=True).stdout
    # Zombies hold nothing (where PID 1 does not reap, those of stopped daemons stay); rootless,
    # nothing of the daemon's user but the daemon's own processes ("guix-daemon …" titles).
    lines = [line for line in ps.splitlines() if not line.endswith("<defunct>")]
    if b.owner:
        lines = [line for line in lines if not line.split(None, 1)[-1].startswith("guix-daemon")]
    assert GROUP not in "\n".join(lines), ps


# ------------------------------------------------------------------------------------------------
# Class 2: setuid/setgid files, xattrs, and failed outputs handed over as they are


EXPECT_REFUSED = {
    "open_suid": "EPERM", "open_sgid": "EPERM", "openat_suid": "EPERM", "creat_suid": "EPERM",
    "mknod_suid": "EPERM", "mknodat_sgid": "EPERM", "chmod_suid": "EPERM",
    "chmod_sgid": "EPERM", "fchmod_suid": "EPERM", "fchmodat_sgid": "EPERM",
    "fchmodat2_suid": "EPERM", "chmod_dir_sgid": "EPERM",
    "setxattr_user": "EOPNOTSUPP", "setxattr_cap": "EOPNOTSUPP", "lsetxattr_acl": "EOPNOTSUPP",
    "fsetxattr_user": "EOPNOTSUPP",
}  # fmt: skip


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_builder_cannot_make_setid_files_or_xattrs(
    make_builds: Callable[..., Builds], attack_binary: str
) -> None:
    b = make_builds()
    tool = add_attack(b, attack_binary)
    bb = b.busybox + "/bin/busybox"
    drv, outs = b.derivation(
        "setid",
        f"{bb} mkdir $out; {tool}/bin/attack setid $out > $out/results 2>&1; "
        f"{bb} cp {bb} $out/sh; {bb} chmod u+s $out/sh; echo busybox-chmod=$? >> $out/results; "
        f"{bb} chmod 0777 $out/sh; echo plain-chmod=$? >> $out/results; "
        # The same through the i386 system call interface (int $0x80): other numbers.
        f"echo i386-suid=$({tool}/bin/attack chmod32 $out/sh 4755) >> $out/results; "
        f"echo i386-plain=$({tool}/bin/attack chmod32 $out/sh 0755) >> $out/results",
        sources=(tool,),
    )
    try:
        b.client.build_paths([drv])
    except DaemonError:
        print("".join(b.logs))
        raise
    res = _results(Path(outs["out"], "results").read_text())
    for name, err in EXPECT_REFUSED.items():
        assert res[name] == err, (name, res)
    # What is not about set-id bits still works.
    assert res["open_plain"] == "ok" and res["chmod_plain"] == "ok"
    assert res["plain_mode"] == "777"
    assert res["busybox-chmod"] != "0" and res["plain-chmod"] == "0"
    if res["i386-plain"] != "chmod32=ENOSYS":  # a kernel without IA32 emulation
        assert (res["i386-suid"], res["i386-plain"]) == ("chmod32=EPERM", "chmod32=ok"), res
    assert _unsafe_entries(outs["out"], b.owner) == []


@pytest.mark.parametrize("keep_failed", [False, True])
def test_failed_output_is_not_handed_over_unsafe(
    make_builds: Callable[..., Builds], keep_failed: bool
) -> None:
    """A failing build leaves a world-writable `$out` with a would-be setuid shell: what the
    daemon moves into the store (and the kept build tree) is neither writable by others nor
    set-id nor owned by the build user, so a local user who runs the shell stays who they are."""
    b = make_builds()
    b.client.set_options(keep_failed=keep_failed, use_substitutes=False)
    bb = b.busybox + "/bin/busybox"
    script = f"""
{bb} mkdir -p $out/sub $NIX_BUILD_TOP/kept
{bb} cp {bb} $out/sh
{bb} cp {bb} $NIX_BUILD_TOP/kept/sh
{bb} chmod 4755 $out/sh $NIX_BUILD_TOP/kept/sh
{bb} chmod 2777 $out/sub
{bb} mkdir -m 2777 $out/sgid-dir
{bb} chmod 0777 $out $out/sh $NIX_BUILD_TOP/kept $NIX_BUILD_TOP/kept/sh $NIX_BUILD_TOP
echo hello > $out/sub/file
{bb} chmod 0666 $out/sub/file
{bb} ln -s /etc/shadow $out/shadow-link
exit 1
"""
    drv, outs = b.derivation("fails", script)
    shadow = os.stat("/etc/shadow")
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    out = outs["out"]
    assert os.path.isdir(out), "upstream keeps a failed output in the store"
    assert not b.client.is_valid_path(out)
    assert _unsafe_entries(out) == []
    assert os.readlink(out + "/shadow-link") == "/etc/shadow"
    after = os.stat("/etc/shadow")
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        shadow.st_mode,
        shadow.st_uid,
        shadow.st_gid,
    )
    # An ordinary user runs the shell: no uid change, and cannot write into the output.
    ran = _run_as_nobody(out + "/sh", "-c", "id -u; echo x > " + out + "/sub/file")
    assert ran.stdout.split()[0] == str(65534), ran
    assert ran.returncode != 0 and Path(out, "sub", "file").read_text() == "hello\n"
    kept = b.daemon.root / "tmp" / "guix-build-fails.drv-0"
    if keep_failed:
        assert _unsafe_entries(str(kept)) == []
        assert (kept / "top" / "kept" / "sh").exists()
    else:
        assert not kept.exists()
    assert not Path(out + ".chroot").exists()
    assert not Path(b.daemon.store_dir, os.path.basename(drv) + ".chroot").exists()


def test_secure_tree_never_follows_links(tmp_path: Path) -> None:
    """The sanitiser changes the tree, never what a symlink in it points to."""
    from guixsvc.daemon.build.outputs import secure_tree

    victim = tmp_path / "victim"
    victim.write_text("x")
    victim.chmod(0o4777)
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_text("y")
    (tree / "d" / "f").chmod(0o6777)
    (tree / "d").chmod(0o3777)
    (tree / "link").symlink_to(victim)
    (tree / "dirlink").symlink_to(tmp_path)
    secure_tree(str(tree), (0, 0))
    assert stat.S_IMODE(victim.stat().st_mode) == 0o4777
    assert stat.S_IMODE((tree / "d" / "f").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "d").stat().st_mode) == 0o1755
    assert _unsafe_entries(str(tree)) == []


# ------------------------------------------------------------------------------------------------
# Class 5: keyrings


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_builds_get_a_fresh_keyring(make_builds: Callable[..., Builds], attack_binary: str) -> None:
    """A build sees none of the daemon's keys, and keys one build plants (session, user and
    user-session keyrings of its build user) are gone for the next build as that user."""
    daemon_key = f"guixsvc-daemon-secret-{os.getpid()}"
    planted = f"guixsvc-planted-{os.getpid()}"
    # Added before the daemon starts, so the daemon inherits the keyring holding it.
    key_id = _add_session_key(daemon_key)
    try:
        daemon_ring = seccomp.keyctl(0, seccomp.KEY_SPEC_SESSION_KEYRING, 0)
        b = make_builds()
        tool = add_attack(b, attack_binary)
        results = []
        for i in range(2):
            drv, outs = b.derivation(
                f"keys{i}", f"{tool}/bin/attack keys {daemon_key} {planted} > $out", sources=(tool,)
            )
            b.client.build_paths([drv])
            results.append(_results(Path(outs["out"]).read_text()))
    finally:
        with contextlib.suppress(OSError):
            seccomp.keyctl(21, key_id)  # KEYCTL_INVALIDATE
    first, second = results
    for res in results:
        assert res["find_daemon_key"] == "ENOKEY", res
        assert int(res["session"]) != daemon_ring
        assert res["find_planted_session"] == "ENOKEY", res
    assert first["plant_session"] == "ok" and first["plant_user"] == "ok", first
    assert second["find_planted_user"] == "ENOKEY", second
    assert second["find_planted_user_session"] == "ENOKEY", second
    assert first["session"] != second["session"]


def _add_session_key(description: str) -> int:
    """Add a key to this process's session keyring (created if it has none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = {"x86_64": 248, "aarch64": 217}[os.uname().machine]  # add_key
    key = libc.syscall(
        ctypes.c_long(nr), b"user", description.encode(), b"secret", ctypes.c_long(6),
        ctypes.c_long(seccomp.KEY_SPEC_SESSION_KEYRING),
    )  # fmt: skip
    if key < 0:
        pytest.skip(f"cannot add a key: {os.strerror(ctypes.get_errno())}")
    return int(key)


# ------------------------------------------------------------------------------------------------
# Class 1: a fixed-output output rewritten after registration


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, list[int]]]:
    """A host process side listening on an abstract Unix socket, collecting received fds."""
    name = f"guixsvc-test-{os.getpid()}-{time.monotonic_ns()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + name)
    srv.listen()
    srv.settimeout(0.2)
    fds: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    _, got, _, _ = socket.recv_fds(conn, 1, 4)
                except OSError:
                    continue
                fds.extend(got)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield name, fds
    finally:
        stop.set()
        t.join()
        srv.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_fixed_output_cannot_hand_out_its_output(
    make_builds: Callable[..., Builds],
    attack_binary: str,
    abstract_listener: tuple[str, list[int]],
) -> None:
    """The builder opens `$out` read-write and offers the descriptor on an abstract socket of
    the host: the socket is out of reach (own network namespace)."""
    name, fds = abstract_listener
    b = make_builds()
    tool = add_attack(b, attack_binary)
    drv, outs = b.derivation(
        "handout",
        f"{tool}/bin/attack sendfd $out good {name}",
        sources=(tool,),
        fixed=("sha256", hashlib.sha256(b"good").hexdigest()),
    )
    b.client.build_paths([drv])
    log = "".join(b.logs)
    assert fds == [], log
    assert Path(outs["out"]).read_bytes() == b"good"


class _Listener:
    """A TCP server of the host counting the connections it accepts."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _external_address() -> str | None:
    """An address of this host that is not loopback (for the route out through slirp)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_fixed_output_network(make_builds: Callable[..., Builds], isolate: bool) -> None:
    """A fixed-output build has a network namespace of its own (only `lo` and slirp4netns's
    `tap0`): it reaches the outside, and the host's loopback only as upstream allows it (yes by
    default, through 127.0.0.1 and slirp's 10.0.2.2; no with --isolate-host-loopback)."""
    external = _external_address()
    loopback = _Listener("127.0.0.1")
    anywhere = _Listener("0.0.0.0")
    try:
        b = make_builds(*(["--isolate-host-loopback"] if isolate else []), verbosity=1)
        bb = b.busybox + "/bin/busybox"
        script = f"""
r() {{ if "$@" </dev/null >/dev/null 2>&1; then echo yes; else echo no; fi; }}
echo lo=$(r {bb} nc -w 3 127.0.0.1 {loopback.port})
echo gw=$(r {bb} nc -w 3 10.0.2.2 {loopback.port})
echo ext=$(r {bb} nc -w 3 {external or "192.0.2.254"} {anywhere.port})
echo ifaces=$({bb} tail -n +3 /proc/net/dev | {bb} cut -d: -f1 | {bb} tr -d ' ' | {bb} sort \
  | {bb} tr '\n' ,)
echo resolv=$({bb} cat /etc/resolv.conf)
echo done > $out
"""
        drv, _ = b.derivation(
            "net" + ("-isolated" if isolate else ""),
            script,
            fixed=("sha256", hashlib.sha256(b"done\n").hexdigest()),
        )
        b.client.build_paths([drv])
    finally:
        loopback.close()
        anywhere.close()
    res = _results("".join(b.logs))
    assert res["ifaces"] == "lo,tap0,", res
    assert res["resolv"] == "nameserver 10.0.2.3"
    if isolate:
        assert (res["lo"], res["gw"], loopback.connections) == ("no", "no", 0), res
    else:
        assert (res["lo"], res["gw"]) == ("yes", "yes") and loopback.connections == 2, res
    if external is not None:
        assert res["ext"] == "yes" and anywhere.connections == 1, res
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "slirp4netns" not in ps


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_fixed_output_registered_bytes_are_a_fresh_copy(
    make_builds: Callable[..., Builds],
) -> None:
    """Even a descriptor of the builder's `$out` obtained by someone (here: this root test,
    standing for any leak) cannot change the registered item: the daemon registers a copy."""
    b = make_builds()
    bb = b.busybox + "/bin/busybox"
    drv, outs = b.derivation(
        "copied",
        f"echo -n good > $out; while [ ! -e /tmp/go ]; do {bb} sleep 0.05; done",
        fixed=("sha256", hashlib.sha256(b"good").hexdigest()),
    )
    out = outs["out"]
    chroot = Path(b.daemon.store_dir, os.path.basename(drv) + ".chroot")
    held: list[int] = []
    errors: list[BaseException] = []

    def grab() -> None:
        try:
            deadline = time.monotonic() + 20
            inside = Path(str(chroot) + out)
            while time.monotonic() < deadline:
                if inside.exists() and inside.read_bytes() == b"good":
                    held.append(os.open(inside, os.O_RDWR))
                    (chroot / "tmp" / "go").write_text("")
                    return
                time.sleep(0.02)
            raise TimeoutError("the builder's output never appeared")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=grab)
    t.start()
    try:
        b.client.build_paths([drv])
    finally:
        t.join()
    assert not errors, errors
    fd = held[0]
    try:
        os.pwrite(fd, b"EVIL", 0)
        assert Path(out).read_bytes() == b"good"
        assert os.fstat(fd).st_ino != os.stat(out).st_ino
        st = os.stat(out)
        assert st.st_uid == b.owner and stat.S_IMODE(st.st_mode) == 0o444
    finally:
        os.close(fd)
    assert b.client.query_path_info(out).nar_hash


# ------------------------------------------------------------------------------------------------
# Class 7: build users, chroots and locks survive no failure


@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_unexpected_failures_release_everything(
    make_builds: Callable[..., Builds], attack_binary: str
) -> None:
    """Builds that fail in unusual ways (a FIFO or a socket in a fixed or recursive output, a
    failed output deeper than PATH_MAX, a builder that leaves a daemonised process) release their
    build user each time: with three build users, the fourth build of the same session still
    gets one, and nothing of theirs stays in the store or in the process table."""
    b = make_builds()
    tool = add_attack(b, attack_binary)
    bb = b.busybox + "/bin/busybox"
    fifo_nar = ("r:sha256", hashlib.sha256(b"whatever").hexdigest())
    cases = [
        ("fifo-fixed", f"{bb} mkdir $out; {bb} mkfifo $out/fifo", fifo_nar),
        ("fifo-flat", f"{bb} mkfifo $out", ("sha256", hashlib.sha256(b"").hexdigest())),
        ("socket-out", f"{bb} mkdir $out; {tool}/bin/attack mksock $out/sock", None),
        ("socket-fixed", f"{tool}/bin/attack mksock $out", fifo_nar),
        ("deep", f"{bb} mkdir $out; cd $out; i=0; while [ $i -lt 1100 ]; do "
         f"{bb} mkdir dddddddd; cd dddddddd; i=$((i+1)); done; {bb} mkfifo f; exit 1", None),
        ("daemon", f"({bb} setsid {bb} sleep 4343 &); echo x > $out; exit 1", None),
    ]  # fmt: skip
    for name, script, fixed in cases:
        drv, outs = b.derivation(name, script, fixed=fixed, sources=(tool,))
        with pytest.raises(DaemonError):
            b.client.build_paths([drv])
        assert not b.client.is_valid_path(outs["out"])
        if name not in ("daemon", "deep"):  # the failed builds' outputs are kept
            assert not os.path.lexists(outs["out"]), name
    _no_build_leftovers(b)
    drv, outs = b.derivation("after", "echo fine > $out")
    b.client.build_paths([drv])
    assert Path(outs["out"]).read_text() == "fine\n"
    _no_build_leftovers(b)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("make_builds", MODES, indirect=True)
def test_dead_worker_releases_everything(make_builds: Callable[..., Builds], fixed: bool) -> None:
    """The daemon worker running a build is killed (SIGKILL, nothing runs in it any more): its
    builder, the build's PID namespace and slirp4netns go with it, its build user is free, and
    a new session can use every build user at once."""
    b = make_builds("--max-jobs=3")
    bb = b.busybox + "/bin/busybox"
    marker = f"4747{int(fixed)}{os.getpid() % 1000}"
    drv, _ = b.derivation(
        "stuck" + ("-fixed" if fixed else ""),
        f"{bb} sleep {marker}; echo -n x > $out",
        fixed=("sha256", hashlib.sha256(b"x").hexdigest()) if fixed else None,
    )
    failures: list[BaseException] = []

    def build() -> None:
        try:
            b.client.build_paths([drv])
        except BaseException as exc:
            failures.append(exc)

    t = threading.Thread(target=build)
    t.start()
    deadline = time.monotonic() + 20
    while not (sleepers := _pids_of(f"sleep {marker}")):
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    # The builder is `sh -c …`, a child of the process the worker forked.
    builder = min(sleepers)
    assert Path(f"/proc/{builder}/cmdline").read_bytes().startswith(b"sh\0-c\0")
    worker = _ppid(_ppid(builder))
    assert _ppid(worker) == b.daemon.process.pid
    if fixed:
        assert _pids_of(f"slirp4netns.*{builder}")
    os.kill(worker, 9)
    t.join(20)
    assert failures, "the client saw its build succeed"
    deadline = time.monotonic() + 10
    while _pids_of(f"sleep {marker}") or _pids_of("slirp4netns"):
        assert time.monotonic() < deadline, "the build outlived its worker"
        time.sleep(0.05)
    client = b.daemon.client()
    b.client.close()
    b.client = client
    client.set_options(use_substitutes=False)
    drvs = [b.derivation(f"after{i}", f"{bb} sleep 1; echo {i} > $out")[0] for i in range(3)]
    client.build_paths(drvs)
    client.close()


def test_no_build_user_process_survives_without_pid_namespace(
    make_builds: Callable[..., Builds],
) -> None:
    """Without the chroot (and its PID namespace) a builder's daemonised process is killed
    before the build user is released."""
    b = make_builds("--disable-chroot")
    bb = b.busybox + "/bin/busybox"
    marker = f"4848{os.getpid() % 1000}"
    drv, outs = b.derivation(
        "daemonise", f"({bb} setsid {bb} sleep {marker} </dev/null >/dev/null 2>&1 &); echo > $out"
    )
    b.client.build_paths([drv])
    assert Path(outs["out"]).exists()
    assert _pids_of(f"sleep {marker}") == []


def _build_as(uid: int, gid: int, socket_path: str, drv: str) -> str:
    """Connect as `uid` (an ordinary local account) with keep-failed and build `drv`; returns
    the error text (the build is expected to fail)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        text = "built"
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            client = DaemonClient(socket_path)
            client.set_options(keep_failed=True, use_substitutes=False)
            try:
                client.build_paths([drv])
            except DaemonError as exc:
                text = str(exc)
            client.close()
        except BaseException as exc:
            text = f"client error: {exc!r}"
        os.write(w, text.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def test_kept_tree_goes_to_the_client_made_safe(make_builds: Callable[..., Builds]) -> None:
    """An ordinary local user keeps a failed build's tree: it becomes theirs (upstream pivots
    it to the top), without set-id bits or group/world write permission, and nothing in it
    belongs to the build user any more."""
    b = make_builds()
    bb = b.busybox + "/bin/busybox"
    script = f"""
{bb} mkdir -p sub
{bb} cp {bb} sub/sh
{bb} chmod 0777 sub sub/sh .
{bb} mkdir -m 2777 sgid
{bb} ln -s /etc/shadow shadow
{bb} mkfifo fifo
exit 1
"""
    drv, _ = b.derivation("kept-for-user", script)
    text = _build_as(65534, 65534, b.daemon.socket, drv)
    assert "failed" in text, text
    kept = b.daemon.root / "tmp" / "guix-build-kept-for-user.drv-0"
    assert (kept / "sub" / "sh").exists(), sorted(os.listdir(b.daemon.root / "tmp"))
    assert _unsafe_entries(str(kept), owner=65534) == []
    assert os.readlink(kept / "shadow") == "/etc/shadow"
    assert os.stat("/etc/shadow").st_uid == 0


@pytest.mark.parametrize("how", ["exit", "timeout"])
def test_failed_output_built_in_place_is_made_safe(
    make_builds: Callable[..., Builds], how: str
) -> None:
    """Without the chroot the builder writes its outputs in the store itself: when it fails or
    times out, what it left there loses set-id bits and group/world write permission and
    belongs to the daemon, not to the build user."""
    b = make_builds("--disable-chroot", *(["--timeout=2"] if how == "timeout" else []))
    bb = b.busybox + "/bin/busybox"
    end = "exit 1" if how == "exit" else f"{bb} sleep 1004"
    script = f"""
{bb} mkdir -p $out/sub
{bb} cp {bb} $out/sh
{bb} chmod 0777 $out $out/sub $out/sh
{bb} mkdir -m 2777 $out/sgid
{end}
"""
    drv, outs = b.derivation("in-place-" + how, script)
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    out = outs["out"]
    assert os.path.isdir(out) and not b.client.is_valid_path(out)
    assert _unsafe_entries(out) == []
    assert _pids_of("sleep 1004") == []


def test_fixed_output_without_slirp4netns_has_no_network(
    make_builds: Callable[..., Builds], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Upstream: without slirp4netns the build goes on without network access, never in the
    host's network namespace."""
    listener = _Listener("127.0.0.1")
    monkeypatch.setenv("PATH", str(tmp_path))  # the daemon finds no slirp4netns
    try:
        b = make_builds(verbosity=1)
        bb = b.busybox + "/bin/busybox"
        drv, _ = b.derivation(
            "no-slirp",
            f"{bb} nc -w 2 127.0.0.1 {listener.port} </dev/null; "
            f"echo ifaces=$({bb} tail -n +3 /proc/net/dev | {bb} cut -d: -f1 | {bb} tr -d ' '); "
            "echo done > $out",
            fixed=("sha256", hashlib.sha256(b"done\n").hexdigest()),
        )
        b.client.build_paths([drv])
    finally:
        listener.close()
    log = "".join(b.logs)
    assert "`slirp4netns' can't be found in PATH, network access disabled\n" in log
    assert listener.connections == 0
    assert "ifaces=lo\n" in log
