"""`guixsvc migrate-store`: a store and database made by the root daemon are handed over to the
rootless daemon's user, used by a rootless daemon, and given back (upstream's `guix-ownership`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from guixsvc.migrate import Directories, migrate
from tests.build.conftest import start_rootless_daemon
from tests.conftest import start_daemon, stop_daemon, store_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing ownership needs root")


def _owners(top: Path, skip: Callable[[Path], bool] = lambda p: False) -> set[tuple[int, int]]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            if not skip(Path(name)):
                st = os.lstat(name)
                found.add((st.st_uid, st.st_gid))
    return found


def test_migrate_both_ways(base_dir: Path, daemon_user: tuple[int, int]) -> None:
    import pwd

    user = pwd.getpwuid(daemon_user[0]).pw_name
    root = base_dir / "m"
    root.mkdir()
    daemon = start_daemon(root)
    outside = base_dir / "outside"
    outside.write_text("root's\n")
    try:
        with daemon.client() as c:
            item = c.add_text_to_store("made-by-root", "hello\n")
        # A per-user profile keeps its owner; a symbolic link is changed, never followed.
        per_user = Path(daemon.state_dir, "profiles", "per-user", "alice")
        per_user.mkdir(parents=True)
        os.chown(per_user, 65534, 65534)
        os.symlink(outside, Path(daemon.state_dir, "gcroots", "evil"))
    finally:
        stop_daemon(daemon)
    env = store_env(root)
    dirs = Directories(env["NIX_STORE_DIR"], env["GUIX_STATE_DIRECTORY"],
                       env["GUIX_CONFIGURATION_DIRECTORY"], env["GUIX_LOG_DIRECTORY"])  # fmt: skip
    lines: list[str] = []
    assert migrate(dirs, user, lines.append) > 0
    assert lines[0] == "Changing to unprivileged guix-daemon."
    assert lines[1].startswith(f"Changing file ownership for {dirs.store_dir} ")
    profiles = Path(dirs.state_dir, "profiles")
    for top in (dirs.store_dir, dirs.state_dir, dirs.conf_dir, dirs.log_dir):
        assert _owners(Path(top), lambda p: profiles in (p, *p.parents)) == {daemon_user}, top
    assert os.stat(per_user).st_uid == 65534
    assert os.stat(outside).st_uid == 0
    # Idempotent: a second run changes nothing.
    lines.clear()
    assert migrate(dirs, user, lines.append) == 0 and lines[-1] == "nothing to change"
    # The rootless daemon takes the store over: the old items are there, new ones can be added.
    rootless = start_rootless_daemon(root, daemon_user)
    try:
        with rootless.client() as c:
            assert c.is_valid_path(item)
            new = c.add_text_to_store("made-rootless", "hi\n")
        assert os.stat(new).st_uid == daemon_user[0]
    finally:
        stop_daemon(rootless)
    # And back to root, through the command.
    result = subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "migrate-store", "--to-root"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Changing to privileged guix-daemon." in result.stdout
    for top in (dirs.store_dir, dirs.state_dir, dirs.conf_dir, dirs.log_dir):
        assert _owners(Path(top), lambda p: profiles in (p, *p.parents)) == {(0, 0)}, top
    daemon = start_daemon(root)
    try:
        with daemon.client() as c:
            assert c.is_valid_path(item) and c.is_valid_path(new)
    finally:
        stop_daemon(daemon)


def test_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "migrate-store"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "--to-user" in result.stderr


def test_with_writable_store_refuses_root_and_drops_privileges(
    base_dir: Path, daemon_user: tuple[int, int]
) -> None:
    from guixsvc.migrate import with_writable_store

    assert with_writable_store(["root", "root", "true"]) == 1
    assert with_writable_store([]) == 1
    # In a child: the command runs as the user, no supplementary groups, no capabilities.
    out = base_dir / "ids"
    out.write_text("")
    os.chown(out, *daemon_user)
    env = {**os.environ, "NIX_STORE_DIR": str(base_dir)}
    script = f"id -u > {out}; id -G >> {out}; grep CapEff /proc/self/status >> {out}"
    subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "with-writable-store", str(daemon_user[0]),
         str(daemon_user[1]), "/bin/sh", "-c", script],
        env=env, check=True, cwd="/",
    )  # fmt: skip
    uid, groups, caps = out.read_text().splitlines()
    assert (int(uid), groups) == (daemon_user[0], str(daemon_user[1]))
    assert caps.split()[1] == "0" * 16
