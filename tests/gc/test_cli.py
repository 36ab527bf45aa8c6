"""`guixsvc gc`: option grammar, sizes and durations, generations, and runs against the daemon."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from guixsvc.cliargs import Unrecognized
from guixsvc.gc import profiles
from guixsvc.gc.cli import direct_store_path, parse_args
from guixsvc.quantities import UsageError, number_to_size, parse_duration, size_to_number
from guixsvc.store.db import StoreDatabase, ValidPathInfo
from tests.conftest import Daemon, start_daemon, stop_daemon
from tests.gc.conftest import run_gc

#: An upstream `guix` command (uninstalled is fine), as for tests/publish; the comparison skips
#: without it.
GUILE_GUIX = os.environ.get("GUIX_UPSTREAM_GUIX", "")


# --- sizes and durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024), ("5K", 5 * 1024), ("5k", 5 * 1024), ("5KiB", 5 * 1024),
        ("1.5G", 3 * 2**29), ("10GiB", 10 * 2**30), ("2T", 2 * 2**40), ("1Y", 2**80),
        ("5MB", 5_000_000), ("1kB", 1000), ("0.5", 0), ("1.5", 2), ("2.5", 2),
        ("3/2M", 3 * 2**19), ("1e3", 1000), (".5K", 512),
    ],
)  # fmt: skip
def test_size_to_number(text: str, expected: int) -> None:
    assert size_to_number(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("5g", "unknown unit: g"), ("5m", "unknown unit: m"), ("5B", "unknown unit: B"),
     ("abc", "invalid number: abc"), ("G", "invalid number: G"),
     ("1.2.3G", "invalid number: 1.2.3"), ("x5G", "invalid number: x5")],
)  # fmt: skip
def test_size_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        size_to_number(text)


@pytest.mark.parametrize(
    ("num", "text"),
    [(0, "0 bytes"), (1024, "1024 bytes"), (1025, "1 KiB"), (1536, "2 KiB"), (2560, "2 KiB"),
     (3 * 2**20 + 1, "3 MiB"), (123_456_789, "118 MiB"), (5 * 2**30 + 1, "5 GiB")],
)  # fmt: skip
def test_number_to_size(num: int, text: str) -> None:
    assert number_to_size(num) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("2h", 7200), ("1d", 86400), ("2w", 14 * 86400), ("1m", 30 * 86400),
     ("1y", None), ("3", None), ("1..3", None), ("-1d", None), ("1 d", None), ("d", None)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds


# --- option grammar (SRFI-37) --------------------------------------------------------------------


def test_options_short_optional_consumes_next_word() -> None:
    with pytest.raises(UsageError, match=re.escape('"-F" does not denote a duration')):
        parse_args(["-d", "-F", "10G"])
    opts = parse_args(["-d", "1m", "-F", "10G"])
    assert opts.action == "collect-garbage"
    assert opts.delete_generations and opts.generations_pattern == "1m"
    assert opts.free_space == 10 * 2**30
    assert parse_args(["-C5G"]).min_freed == 5 * 2**30
    assert parse_args(["-C", "5G"]).min_freed == 5 * 2**30
    opts = parse_args(["-d"])
    assert opts.delete_generations and opts.generations_pattern is None


def test_options_long_values_only_with_equals() -> None:
    with pytest.raises(UsageError, match=re.escape(
        "invalid argument: Missing required argument after `--free-space'"
    )):  # fmt: skip
        parse_args(["--free-space", "5G"])
    assert parse_args(["--free-space=5G"]).free_space == 5 * 2**30
    opts = parse_args(["--collect-garbage", "5G"])
    assert opts.min_freed is None and opts.paths == ["5G"]
    with pytest.raises(UsageError, match=re.escape("Extraneous argument after `--list-dead'")):
        parse_args(["--list-dead=x"])
    with pytest.raises(UsageError, match=re.escape("foo: invalid '--verify' option")):
        parse_args(["--verify=repair,foo"])
    assert parse_args(["--verify=repair,contents"]).verify_options == ["repair", "contents"]


def test_options_last_action_wins_and_unknown() -> None:
    assert parse_args(["--list-dead", "--list-live"]).action == "list-live"
    assert parse_args(["-D", "-R", "x"]).action == "list-requisites"
    assert parse_args(["--", "-C"]).paths == ["-C"]
    with pytest.raises(Unrecognized) as e:
        parse_args(["--list-deda"])
    assert e.value.name == "list-deda"
    with pytest.raises(Unrecognized) as e:
        parse_args(["-x"])
    assert e.value.name == "x"


def test_direct_store_path() -> None:
    store = "/gnu/store"
    item = store + "/" + "a" * 32 + "-foo"
    assert direct_store_path(item + "/bin/foo", store) == item
    assert direct_store_path(item, store) == item
    assert direct_store_path("/tmp/x", store) == "/tmp/x"


# --- generations ---------------------------------------------------------------------------------


def make_profile(state: Path, store: Path, generations: list[int], current: int) -> str:
    directory = state / "profiles" / "per-user" / "alice"
    directory.mkdir(parents=True, exist_ok=True)
    profile = str(directory / "guix-profile")
    for n in generations:
        item = store / (f"{n:032d}"[-32:].replace("0", "a") + f"-profile{n}")
        item.mkdir(parents=True, exist_ok=True)
        (item / "manifest").write_text("(manifest)")
        os.symlink(str(item), profiles.generation_file_name(profile, n))
    os.symlink(f"guix-profile-{current}-link", profile)
    return profile


def test_generations(tmp_path: Path) -> None:
    profile = make_profile(tmp_path / "state", tmp_path / "store", [1, 2, 4, 10], current=4)
    assert profiles.generation_number(profile) == 4
    assert profiles.generation_numbers(profile) == [1, 2, 4, 10]
    roots = profiles.gc_roots(str(tmp_path / "state"), str(tmp_path / "store"))
    assert {profiles.generation_profile(r) for r in roots} == {profile}
    # Everything is from today: a duration of 0 days matches nothing, but seen three days
    # later a 1-day pattern matches every generation.
    assert profiles.matching_generations(profile, 0) == []
    later = time.time() + 3 * 86400
    assert profiles.matching_generations(profile, 86400, now=later) == [1, 2, 4, 10]
    printed: list[str] = []
    deleted = profiles.delete_old_generations(profile, 86400, out=printed.append, now=later)
    assert deleted == [1, 2, 10]
    assert printed == [f"deleting {profile}-{n}-link\n" for n in (1, 2, 10)]
    assert profiles.generation_numbers(profile) == [4]


# --- against the daemon --------------------------------------------------------------------------


def test_list_dead_live_and_delete(daemon: Daemon) -> None:
    with daemon.client() as c:
        a = c.add_text_to_store("a", "aaa")
        b = c.add_text_to_store("b", "bbb", [a])
        x = c.add_text_to_store("x", "xxx")
    os.symlink(b, os.path.join(daemon.state_dir, "gcroots", "my-root"))
    r = run_gc(daemon, "--list-dead")
    assert r.returncode == 0 and r.stdout == f"{x}\n"
    assert "finding garbage collector roots..." in r.stderr
    r = run_gc(daemon, "--list-live")
    assert r.stdout.splitlines() == sorted([a, b])
    r = run_gc(daemon, "--list-roots")
    assert f"{daemon.state_dir}/gcroots/my-root" in r.stdout.splitlines()
    r = run_gc(daemon, "-D", a + "/sub/file")
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"guix gc: error: cannot delete path `{a}' since it is still alive"
    )
    r = run_gc(daemon, "--references", b)
    assert r.stdout == f"{a}\n"
    r = run_gc(daemon, "-R", b)
    assert r.stdout.splitlines() == [a, b]
    r = run_gc(daemon, "--referrers", a)
    assert r.stdout == f"{b}\n"
    r = run_gc(daemon, "-D", x)
    assert r.returncode == 0 and r.stdout == ""
    assert not os.path.exists(x)
    r = run_gc(daemon, "--list-roots", "extra", "args")
    assert r.returncode == 1
    assert r.stderr == "guix gc: error: extraneous arguments: args extra \n"
    r = run_gc(daemon, "--list-deda")
    assert r.returncode == 1
    assert r.stderr == (
        "guix gc: error: list-deda: unrecognized option\nhint: Did you mean `list-dead'?\n\n"
    )
    r = run_gc(daemon, "-C", "5g")
    assert (r.returncode, r.stderr) == (1, "guix gc: error: unknown unit: g\n")


def test_collect_min_and_freed_message(daemon: Daemon) -> None:
    with daemon.client() as c:
        items = [c.add_text_to_store(f"t{i}", os.urandom(1000).hex()) for i in range(20)]
    r = run_gc(daemon, "-C", "5000")
    assert r.returncode == 0, r.stderr
    gone = [p for p in items if not os.path.exists(p)]
    # Each text file is 2000 bytes: the third deletion exceeds 5000 bytes.
    assert len(gone) == 3
    assert "deleted or invalidated more than 5000 bytes; stopping" in r.stderr
    assert r.stderr.splitlines()[-1] == "guix gc: freed 6 KiB"
    r = run_gc(daemon)
    assert r.returncode == 0
    assert r.stderr.splitlines()[-1] == "guix gc: freed 33 KiB"  # 17 × 2000 bytes
    assert not any(os.path.exists(p) for p in items)


def test_daemon_keep_derivations_flag(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, "--gc-keep-derivations=no")
    try:
        drv = d.store_dir + "/" + "2" * 32 + "-thing.drv"
        with open(drv, "w") as f:
            f.write("Derive([])")
        out_path = d.store_dir + "/" + "1" * 32 + "-thing"
        os.mkdir(out_path)
        db = StoreDatabase.open(os.path.dirname(d.db_path), fsync=False)
        try:
            db.register_valid_paths([
                ValidPathInfo(drv, "sha256:" + "00" * 32, 1, frozenset()),
                ValidPathInfo(out_path, "sha256:" + "00" * 32, 1, frozenset(), deriver=drv),
            ])  # fmt: skip
            db.add_derivation_outputs(drv, {"out": out_path})
        finally:
            db.close()
        os.symlink(out_path, os.path.join(d.state_dir, "gcroots", "out"))
        r = run_gc(d, "--list-dead")
        assert r.stdout.splitlines() == [drv]
    finally:
        stop_daemon(d)


def test_delete_generations_end_to_end(daemon: Daemon) -> None:
    profile = make_profile(Path(daemon.state_dir), Path(daemon.store_dir), [1, 2, 3], current=3)
    r = run_gc(daemon, "-d")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"deleting {profile}-{n}-link\n" for n in (1, 2))
    assert sorted(os.listdir(os.path.dirname(profile))) == ["guix-profile", "guix-profile-3-link"]


def test_list_busy(daemon: Daemon) -> None:
    with daemon.client() as c:
        item = c.add_text_to_store("busy-text", "hello")
    holder = subprocess.Popen(["sleep", "60"], stdin=open(item, "rb"))  # noqa: SIM115
    try:
        time.sleep(0.2)
        r = run_gc(daemon, "--list-busy")
        assert item in r.stdout.splitlines()
        r = run_gc(daemon)
        assert os.path.exists(item)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs store needs root")
def test_free_space_on_small_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(store)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        d = start_daemon(tmp_path, "--disable-deduplication")
        try:
            with d.client() as c:
                items = [c.add_text_to_store(f"blob{i}", os.urandom(512 * 1024).hex())
                         for i in range(16)]  # fmt: skip
            free = shutil.disk_usage(str(store)).free
            assert free < 12 * 2**20
            r = run_gc(d, "-F", "1K")
            assert r.returncode == 0
            assert r.stderr.startswith("guix gc: already ") and "nothing to do" in r.stderr
            r = run_gc(d, "-F", "12M")
            assert r.returncode == 0, r.stderr
            assert "guix gc: freeing " in r.stderr and "freed" not in r.stderr
            after = shutil.disk_usage(str(store)).free
            assert after >= 12 * 2**20
            remaining = [p for p in items if os.path.exists(p)]
            assert 0 < len(remaining) < len(items)
        finally:
            stop_daemon(d)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


@pytest.mark.skipif(
    not (GUILE_GUIX and os.access(GUILE_GUIX, os.X_OK)),
    reason="GUIX_UPSTREAM_GUIX does not name an upstream guix command",
)
def test_same_output_as_upstream_client(daemon: Daemon) -> None:
    with daemon.client() as c:
        a = c.add_text_to_store("a", "aaa")
        c.add_text_to_store("b", "bbb", [a])
    env = dict(daemon.env, GUIX_DAEMON_SOCKET=daemon.socket)
    for args in (["--list-dead"], ["--list-live"], ["--list-roots"], ["-R", a], ["-x"]):
        theirs = subprocess.run([GUILE_GUIX, "gc", *args], env=env, capture_output=True,
                                text=True, check=False, timeout=120)  # fmt: skip
        ours = run_gc(daemon, *args)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), args
