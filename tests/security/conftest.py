"""Attack tests (issue 12): an ordinary local account attacks a daemon running as root.

The attacker is a throw-away account created with `useradd` for the test session (removed
afterwards) and a member of a throw-away build-users group, i.e. what a compromised build user
or a local user with the build group's rights can do in the group-writable store.  Attacker
actions run in a forked child that really drops to that uid/gid (setresgid/setresuid), so the
kernel's permission checks are the real ones.  Everything lives in a world-traversable
temporary directory (pytest's own is 0700), never in the host's /gnu/store or /var/guix.
"""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guixsvc.store.safefs import remove_tree
from tests.conftest import Daemon, start_daemon, stop_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attack tests need root")


@dataclass(frozen=True)
class Attacker:
    name: str
    uid: int
    gid: int  # the build-users group (the store is group-writable by it)
    group: str

    def run(self, fn: Callable[[], Any], *, timeout: float = 60) -> Any:
        """Run `fn` in a child process as this user; return its result or raise its error."""
        return as_user(self.uid, self.gid, fn, timeout=timeout)


def as_user(uid: int, gid: int, fn: Callable[[], Any], *, timeout: float = 60) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgroups([gid])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result: tuple[str, Any] = ("ok", fn())
        except BaseException as exc:
            result = ("error", f"{type(exc).__name__}: {exc}")
        try:
            data = pickle.dumps(result)
        except Exception as exc:
            data = pickle.dumps(("error", f"unpicklable result: {exc}"))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status == "error":
        raise AttackerError(value)
    return value


class AttackerError(Exception):
    """An exception raised in the attacker's process (its text)."""


@pytest.fixture(scope="session")
def attacker() -> Iterator[Attacker]:
    if os.geteuid() != 0:
        pytest.skip("attack tests need root")
    suffix = secrets.token_hex(3)
    group, name = f"gxsecb{suffix}", f"gxseca{suffix}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(
            ["useradd", "-M", "-N", "-g", group, "-d", "/nonexistent", "-s", "/bin/false", name],
            check=True,
        )
        try:
            import grp
            import pwd

            yield Attacker(name, pwd.getpwnam(name).pw_uid, grp.getgrnam(group).gr_gid, group)
        finally:
            subprocess.run(["userdel", name], check=False)
    finally:
        subprocess.run(["groupdel", group], check=False)


@pytest.fixture
def sec_root() -> Iterator[Path]:
    """A temporary directory other users can traverse (the attacker must reach the store)."""
    root = Path(tempfile.mkdtemp(prefix="guixsvc-sec-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        remove_tree(str(root))


@pytest.fixture
def outside(sec_root: Path) -> Path:
    """Root-owned files outside the store that the attacker would like the daemon to touch."""
    out = sec_root / "outside"
    (out / "dir" / "sub").mkdir(parents=True)
    (out / "victim").write_bytes(b"precious\n")
    (out / "dir" / "keep").write_bytes(b"keep\n")
    (out / "victim").chmod(0o600)
    (out / "dir").chmod(0o700)
    out.chmod(0o755)
    return out


def snapshot(tree: Path) -> dict[str, tuple[int, int, int, int, bytes | None]]:
    """Mode, owner, group, mtime and contents of everything below `tree` (and itself)."""
    result: dict[str, tuple[int, int, int, int, bytes | None]] = {}
    for path in [tree, *sorted(tree.rglob("*"))]:
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        result[str(path.relative_to(tree))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            data,
        )
    return result


@pytest.fixture
def root_daemon(sec_root: Path, attacker: Attacker) -> Iterator[Daemon]:
    """Our daemon as root with the attacker's group as build-users group."""
    d = start_daemon(sec_root, f"--build-users-group={attacker.group}")
    os.chmod(d.socket, 0o666)
    with d.client() as c:  # the store exists once a worker serves (the socket exists before)
        c.query_all_valid_paths()
    try:
        yield d
    finally:
        stop_daemon(d)


def store_junk(store_dir: str) -> list[str]:
    """Entries of the store that are neither valid-looking items nor the daemon's own."""
    return sorted(
        name
        for name in os.listdir(store_dir)
        if name != ".links" and (name.endswith((".lock", ".chroot")) or name.startswith("nix-"))
    )
