"""Fixtures for build tests: build users, a daemon with the chroot on, a busybox builder.

Builds need root (namespaces, chroot, build users), so every test here skips otherwise.  Build
users are a throw-away group with three members created with groupadd/useradd and removed at the
end of the session (names unique to the session).  The builder is Debian's static busybox
(package busybox-static) put in the test store as a directory item `bin/busybox` +
`bin/sh -> busybox`, so the chroot holds nothing but the closure of the inputs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonClient
from guixsvc.store.derivation import (
    Derivation,
    DerivationOutput,
    expected_output_paths,
    parse_derivation,
    unparse_derivation,
)
from guixsvc.store.paths import StoreDir
from guixsvc.store.safefs import remove_tree
from tests.conftest import Daemon, stop_daemon, store_env

#: Unique per test session: sessions running at the same time (several engineers, CI jobs)
#: must not delete each other's build users while their builds run.
GROUP = f"guixsvc-bld-{secrets.token_hex(3)}"
USERS = [f"{GROUP}-{i}" for i in range(1, 4)]
BUSYBOX = "/bin/busybox"


def _is_static(path: str) -> bool:
    try:
        out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return True  # cannot tell; the build tests will show it
    return "statically linked" in out or "static-pie" in out


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="builds need root (namespaces)")


def _admin(*cmd: str, check: bool = True) -> None:
    """Run a shadow-utils command, retrying while another process (a concurrent test session
    adding its own users) holds the lock of /etc/passwd or /etc/group."""
    for _ in range(100):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0 or "lock" not in r.stderr.lower():
            break
        time.sleep(0.1)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


@pytest.fixture(scope="session")
def build_users() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("creating build users needs root")
    if not shutil.which("groupadd") or not shutil.which("useradd"):
        pytest.skip("groupadd/useradd missing (Debian package passwd)")
    for user in USERS:
        _admin("userdel", user, check=False)
    _admin("groupdel", GROUP, check=False)
    _admin("groupadd", "--system", GROUP)
    for user in USERS:
        _admin("useradd", "--system", "--no-create-home", "-g", GROUP, "-G", GROUP,
               "-d", "/var/empty", "-s", "/usr/sbin/nologin", user)  # fmt: skip
    try:
        yield GROUP
    finally:
        for user in USERS:
            _admin("userdel", user, check=False)
        _admin("groupdel", GROUP, check=False)


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A world-traversable root (build users must reach the store without a chroot)."""
    d = Path(tempfile.mkdtemp(prefix="guixsvc-build-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        # Iterative and descriptor-relative: failed outputs may be deeper than PATH_MAX.
        remove_tree(str(d))


def start_build_daemon(root: Path, *extra: str) -> Daemon:
    """Our guix-daemon with the chroot on (tests/conftest.start_daemon always disables it)."""
    env = store_env(root)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o755)
    env["TMPDIR"] = str(root / "tmp")
    sock = str(root / "daemon.sock")
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "guixsvc.daemon.cli", f"--listen={sock}", *extra],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return _wait_started(root, sock, env, proc)


def _wait_started(root: Path, sock: str, env: dict[str, str], proc: subprocess.Popen) -> Daemon:
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("daemon did not start:\n" + (root / "daemon.log").read_text())
        time.sleep(0.02)
    # The socket file appears at bind(), slightly before listen(): wait until it accepts.
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            probe.close()
    # It listens before the store is initialised (as upstream): a handshake waits for that.
    DaemonClient(sock).close()
    return Daemon(root, sock, env, proc)


@dataclass
class Builds:
    """Helpers to make derivations against one daemon."""

    daemon: Daemon
    client: DaemonClient
    busybox: str  # the store directory holding bin/busybox and bin/sh
    logs: list[str]
    #: Where the store's files really are, when the daemon sees them elsewhere (a store
    #: bind-mounted in its own mount namespace).
    real_store: str | None = None
    #: Who owns the store's items: root, or the rootless daemon's user.
    owner: int = 0

    @property
    def store(self) -> StoreDir:
        return StoreDir(self.daemon.store_dir)

    @property
    def sh(self) -> str:
        return self.busybox + "/bin/sh"

    def derivation(
        self,
        name: str,
        script: str,
        *,
        outputs: tuple[str, ...] = ("out",),
        inputs: dict[str, tuple[str, ...]] | None = None,
        sources: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        fixed: tuple[str, str] | None = None,  # (hash algo as in the drv, base16 hash)
        builder: str | None = None,
        args: list[str] | None = None,
        system: str = "x86_64-linux",
    ) -> tuple[str, dict[str, str]]:
        """Add a derivation; returns (drv path, {output name: path})."""
        inputs = inputs or {}
        srcs = {self.busybox, *sources} if builder is None else set(sources)
        drv = Derivation(
            outputs={
                o: DerivationOutput("", *(fixed if fixed and o == "out" else ("", "")))
                for o in outputs
            },
            input_drvs={k: frozenset(v) for k, v in inputs.items()},
            input_srcs=frozenset(srcs),
            platform=system,
            builder=builder if builder is not None else self.sh,
            args=args if args is not None else ["-c", script],
            env={**dict.fromkeys(outputs, ""), **(env or {})},
        )
        cache: dict[str, bytes] = {}

        def read_drv(path: str) -> Derivation:
            if self.real_store is not None:
                path = self.real_store + path[len(self.daemon.store_dir) :]
            return _read_drv(path)

        expected = expected_output_paths(self.store, name, drv, read_drv, cache)
        for o, sp in expected.items():
            drv.outputs[o].path = self.store.display(sp)
            drv.env[o] = self.store.display(sp)
        text = unparse_derivation(drv).decode()
        path = self.client.add_text_to_store(name + ".drv", text, sorted({*srcs, *inputs}))
        return path, {o: d.path for o, d in drv.outputs.items()}


def _read_drv(path: str) -> Derivation:
    with open(path, "rb") as f:
        return parse_derivation(f.read())


def add_busybox(client: DaemonClient, work: Path) -> str:
    tree = work / "busybox-tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    path = client.add_to_store("busybox", str(tree))
    shutil.rmtree(tree)
    return path


#: The dedicated unprivileged user of the rootless daemon (upstream's `guix-daemon` user).
DAEMON_USER = f"{GROUP}-daemon"
REPO = Path(__file__).resolve().parents[2]
#: The rootless daemon runs the system Python on the source tree (its core needs only the
#: standard library; the test's interpreter may live where that user cannot read).
SYSTEM_PYTHON = "/usr/bin/python3"

#: Parametrise a test over both sandbox modes:
#: `@pytest.mark.parametrize("make_builds", MODES, indirect=True)`.
MODES = ["root", "rootless"]


@pytest.fixture(scope="session")
def daemon_user() -> Iterator[tuple[int, int]]:
    """A dedicated system user and group (as `guix-daemon` upstream) for the rootless daemon."""
    if os.geteuid() != 0:
        pytest.skip("creating the daemon's user needs root")
    if not shutil.which("useradd") or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("useradd or the system Python missing")
    if not all(os.stat(p).st_mode & 0o005 == 0o005 for p in [REPO, *REPO.parents]):
        pytest.skip("source tree not readable by other users")
    _admin("userdel", DAEMON_USER, check=False)
    _admin("groupdel", DAEMON_USER, check=False)
    _admin("useradd", "--system", "--no-create-home", "--user-group", "-d", "/var/empty",
           "-s", "/usr/sbin/nologin", DAEMON_USER)  # fmt: skip
    import pwd

    pw = pwd.getpwnam(DAEMON_USER)
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "from guixsvc.daemon.build import sandbox as s; "
         "raise SystemExit(not s.user_namespaces_available())"],
        env={"PYTHONPATH": str(REPO)}, cwd="/", user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
    )  # fmt: skip
    try:
        if probe.returncode != 0:
            pytest.skip("unprivileged user namespaces are not available")
        yield pw.pw_uid, pw.pw_gid
    finally:
        _admin("userdel", DAEMON_USER, check=False)
        _admin("groupdel", DAEMON_USER, check=False)


def start_rootless_daemon(root: Path, owner: tuple[int, int], *extra: str) -> Daemon:
    """Our guix-daemon as an unprivileged user owning its store and state directory, chroot on:
    builds in user namespaces (upstream's unprivileged mode)."""
    env = store_env(root)
    env["PYTHONPATH"] = str(REPO)
    (root / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(root / "tmp")
    for directory in (root, root / "etc", root / "tmp"):
        os.chown(directory, *owner)
    sock = str(root / "daemon.sock")
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-m", "guixsvc.daemon.cli", f"--listen={sock}", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/",
        user=owner[0], group=owner[1], extra_groups=[],
    )  # fmt: skip
    return _wait_started(root, sock, env, proc)


@pytest.fixture
def make_builds(
    base_dir: Path, build_users: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Builds]]:
    if not os.path.exists(BUSYBOX) or not _is_static(BUSYBOX):
        pytest.skip("needs a static /bin/busybox (Debian package busybox-static)")
    mode = getattr(request, "param", "root")
    owner: tuple[int, int] | None = None
    if mode == "rootless":
        owner = request.getfixturevalue("daemon_user")

    def make(*flags: str, users: bool = True, verbosity: int = 0, **options: object) -> Builds:
        root = base_dir / f"d{len(daemons)}"
        root.mkdir()
        if owner is not None:
            daemon = start_rootless_daemon(root, owner, *flags)
        else:
            extra = [f"--build-users-group={build_users}"] if users else []
            daemon = start_build_daemon(root, *extra, *flags)
        daemons.append(daemon)
        logs: list[str] = []
        client = daemon.client(log=logs.append)
        clients.append(client)
        options.setdefault("use_substitutes", False)
        client.set_options(verbosity=verbosity, **options)  # type: ignore[arg-type]
        return Builds(daemon, client, add_busybox(client, root), logs,
                      owner=owner[0] if owner else 0)  # fmt: skip

    daemons: list[Daemon] = []
    clients: list[DaemonClient] = []
    try:
        yield make
    finally:
        for client in clients:
            client.close()
        for daemon in daemons:
            stop_daemon(daemon)
            if daemon.process.returncode not in (0, -signal.SIGTERM):
                print(daemon.stderr())
