"""The collector engine on a real SQLite store and real files: liveness, limits, trash, links."""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from guixsvc.daemon.collector import Collector, delete_counting
from guixsvc.protocol.ops import GCAction
from guixsvc.protocol.store_api import StoreError
from guixsvc.store import roots
from tests.gc.conftest import LocalStore

LIVE, DEAD = GCAction.RETURN_LIVE, GCAction.RETURN_DEAD
DELETE, SPECIFIC = GCAction.DELETE_DEAD, GCAction.DELETE_SPECIFIC


def test_root_chain_keeps_closure(local_store: LocalStore) -> None:
    s = local_store
    a = s.add("a")
    b = s.add("b", (a,))
    c = s.add("c", (b, a))
    x = s.add("x")
    y = s.add("y", (x,))
    s.root_link(c)
    assert s.gc(LIVE).paths == sorted([a, b, c])
    assert s.gc(DEAD).paths == sorted([x, y])
    out = s.gc(DELETE)
    assert sorted(out.paths) == sorted([x, y])
    assert out.bytes_freed == 32
    assert s.entries() == {a, b, c}
    assert sorted(s.db.all_valid_paths()) == sorted([a, b, c])
    messages = [text for _, text in s.logs]
    assert "finding garbage collector roots..." in messages
    assert "deleting garbage..." in messages
    assert any(m.endswith(f"deleting '{y}'") and m.startswith("[") for m in messages)


def test_indirect_root_link_removed(local_store: LocalStore, tmp_path: os.PathLike[str]) -> None:
    s = local_store
    p = s.add("p", directory=True)
    user_link = os.path.join(str(tmp_path), "result")
    os.symlink(p, user_link)
    auto = roots.add_indirect_root(s.state_dir, user_link)
    assert s.gc(LIVE).paths == [p]
    os.unlink(user_link)
    assert s.gc(DEAD).paths == [p]
    # The stale link in gcroots/auto was removed while looking for roots.
    assert not os.path.lexists(auto)
    assert any("removing stale link from" in t for _, t in s.logs)
    assert s.gc(DELETE).paths == [p]
    assert not os.path.exists(p)
    assert not os.path.exists(f"{s.store_dir}/trash")


def test_temp_root_of_live_and_dead_session(local_store: LocalStore) -> None:
    s = local_store
    kept = s.add("kept")
    lost = s.add("lost")
    # A live session: another process holding its temp-roots file locked.
    script = (
        "import sys, time\n"
        "from guixsvc.store.roots import TempRoots\n"
        "t = TempRoots(sys.argv[1]); t.add(sys.argv[2]); print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    live = subprocess.Popen(
        ["python3", "-c", script, s.state_dir, kept],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    try:
        assert live.stdout is not None and live.stdout.readline() == "ready\n"
        # A dead session: a temp-roots file nobody holds a lock on.
        stale = f"{s.state_dir}/temproots/999999999"
        with open(stale, "wb") as f:
            f.write(lost.encode() + b"\0")
        out = s.gc(DELETE)
        assert out.paths == [lost]
        assert os.path.exists(kept) and s.db.is_valid(kept)
        assert not os.path.exists(stale)
        assert any("removing stale temporary roots file" in t for _, t in s.logs)
    finally:
        assert live.stdin is not None
        live.stdin.write("\n")
        live.stdin.close()
        live.wait(10)
    # The session ended (file unlinked at exit): now `kept` is garbage.
    assert s.gc(DEAD).paths == [kept]


def test_invalid_leftovers_and_active_lock_files(local_store: LocalStore) -> None:
    s = local_store
    leftover = s.add("partial", directory=True, register=False)
    building = s.add("building", register=False)
    lock = building + ".lock"
    open(lock, "w").close()
    stale_lock = leftover + ".lock"
    open(stale_lock, "w").close()
    with open(f"{s.state_dir}/temproots/{os.getpid()}", "wb") as f:
        f.write(building.encode() + b"\0")
    # Hold it like a live foreign session would: a child process locks it.
    holder = subprocess.Popen(
        ["python3", "-c", "import fcntl,sys,os; fd=os.open(sys.argv[1], os.O_RDWR);"
         "fcntl.lockf(fd, fcntl.LOCK_SH); print('x', flush=True); sys.stdin.readline()",
         f"{s.state_dir}/temproots/{os.getpid()}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "x\n"
        dead = s.gc(DEAD).paths
        assert leftover in dead and stale_lock in dead
        assert lock not in dead and building not in dead
        out = s.gc(DELETE)
        assert sorted(out.paths) == sorted([leftover, stale_lock])
        assert os.path.exists(lock) and os.path.exists(building)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_derivations(local_store: LocalStore, keep: bool) -> None:
    s = local_store
    out_path = f"{s.store_dir}/" + "1" * 32 + "-hello"
    drv = s.add_drv("hello", {"out": out_path})
    os.makedirs(out_path)
    s.db.register_valid_paths([
        __import__("guixsvc.store.db", fromlist=["ValidPathInfo"]).ValidPathInfo(
            path=out_path, nar_hash="sha256:" + "00" * 32, nar_size=1,
            references=frozenset(), deriver=drv,
        )
    ])  # fmt: skip
    s.root_link(out_path)
    live = s.gc(LIVE, keep_derivations=keep, keep_outputs=False).paths
    assert (drv in live) is keep
    assert out_path in live


@pytest.mark.parametrize("keep", [True, False])
def test_keep_outputs(local_store: LocalStore, keep: bool) -> None:
    s = local_store
    out_path = s.add("out")
    drv = s.add_drv("thing", {"out": out_path})
    s.root_link(drv)
    live = s.gc(LIVE, keep_outputs=keep, keep_derivations=False).paths
    assert (out_path in live) is keep
    dead = s.gc(DEAD, keep_outputs=keep, keep_derivations=False).paths
    assert (out_path in dead) is not keep


def test_delete_specific_refuses_live(local_store: LocalStore) -> None:
    s = local_store
    a = s.add("a")
    b = s.add("b", (a,))
    s.root_link(b)
    x = s.add("x")
    with pytest.raises(StoreError, match=rf"^cannot delete path `{a}' since it is still alive$"):
        s.gc(SPECIFIC, (a,))
    assert s.db.is_valid(a) and os.path.exists(a)
    assert s.gc(SPECIFIC, (x,)).paths == [x]
    assert not os.path.exists(x)


def test_delete_specific_takes_dead_referrers(local_store: LocalStore) -> None:
    s = local_store
    a = s.add("a")
    b = s.add("b", (a,))
    c = s.add("c", (b,))
    assert sorted(s.gc(SPECIFIC, (a,)).paths) == sorted([a, b, c])
    assert s.db.all_valid_paths() == []


def test_max_freed_stops_near_min(local_store: LocalStore) -> None:
    s = local_store
    size = 10_000
    paths = [s.add(f"p{i}", size=size, directory=True) for i in range(30)]
    out = s.gc(DELETE, max_freed=55_000)
    # Stops as soon as freed + invalidated exceeds the limit: 6 directories of NAR size 10000.
    assert len(out.paths) == 6
    assert out.bytes_freed >= 55_000
    assert len([p for p in paths if os.path.exists(p)]) == 24
    assert any("deleted or invalidated more than 55000 bytes; stopping" in t for _, t in s.logs)
    assert any(t.startswith("[0%] deleting '") for _, t in s.logs)
    # max_freed = 0 examines nothing.
    assert s.gc(DELETE, max_freed=0).paths == []


def test_long_chain_no_recursion_limit(local_store: LocalStore) -> None:
    s = local_store
    prev: tuple[str, ...] = ()
    chain = []
    for i in range(3000):
        p = s.add(f"c{i}")
        chain.append(p)
        prev = (p,)
    del prev
    # Build the chain through the database: each item references the previous one.
    conn_paths = chain
    with s.db.transaction() as conn:
        ids = {p: conn.execute("select id from ValidPaths where path=?", (p,)).fetchone()[0]
               for p in conn_paths}  # fmt: skip
        conn.executemany(
            "insert into Refs (referrer, reference) values (?, ?)",
            [(ids[conn_paths[i + 1]], ids[conn_paths[i]]) for i in range(len(conn_paths) - 1)],
        )
    s.root_link(chain[-1])
    assert len(s.gc(LIVE).paths) == 3000
    os.unlink(f"{s.state_dir}/gcroots/{os.path.basename(chain[-1])}")
    assert len(s.gc(SPECIFIC, (chain[0],)).paths) == 3000
    assert s.db.all_valid_paths() == []


def test_links_cleanup_and_byte_count(local_store: LocalStore) -> None:
    s = local_store
    links = f"{s.store_dir}/.links"
    p = s.add("big", size=0, directory=True)
    big = os.urandom(20_000)
    with open(f"{p}/file", "wb") as f:
        f.write(big)
    os.link(f"{p}/file", f"{links}/aaaa")
    small = f"{links}/bbbb"
    with open(small, "wb") as f:
        f.write(b"x" * 100)
    os.link(small, f"{s.store_dir}/../small-elsewhere")  # nlink 2 but < 8192: dropped
    out = s.gc(DELETE, auto_optimise=True)
    assert out.paths == [p]
    # The file had 2 links (store + .links): counted once with threshold 2, the unused
    # .links entry (then nlink 1) counted again, and the small entry too.
    assert out.bytes_freed == 20_000 + 20_000 + 100
    assert os.listdir(links) == []
    assert any(t.startswith("note: currently hard linking saves ") for _, t in s.logs)


def test_delete_counting_readonly_tree(tmp_path: os.PathLike[str]) -> None:
    top = os.path.join(str(tmp_path), "t")
    os.makedirs(f"{top}/a/b")
    with open(f"{top}/a/b/f", "wb") as f:
        f.write(b"12345")
    os.symlink("f", f"{top}/a/b/l")
    for d in (f"{top}/a/b", f"{top}/a", top):
        os.chmod(d, 0o555)
    assert delete_counting(top, 1) == 5 + len("f")
    assert not os.path.exists(top)


def test_gc_lock_excludes_temp_root_creation(local_store: LocalStore) -> None:
    """While a collector holds gc.lock, a new session cannot create its temp-roots file."""
    s = local_store
    p = s.add("p")
    script = (
        "import sys\n"
        "from guixsvc.store.roots import TempRoots\n"
        "t = TempRoots(sys.argv[1]); t.add(sys.argv[2]); print('added', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    lock = roots.GCLock(s.state_dir, exclusive=True)
    lock.acquire()
    child = subprocess.Popen(
        ["python3", "-c", script, s.state_dir, p], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )  # fmt: skip
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 1.0)
        assert ready == []  # still blocked on gc.lock
        lock.release()
        assert child.stdout.readline() == "added\n"
        assert s.gc(LIVE).paths == [p]
    finally:
        lock.release()
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def test_busy_items_are_roots(local_store: LocalStore) -> None:
    s = local_store
    d = s.add("used", directory=True)
    e = s.add("env")
    other = s.add("other")
    env = dict(os.environ, SOME_VAR=f"x:{e}/bin:y")
    proc = subprocess.Popen(["sleep", "60"], cwd=d, env=env)
    try:
        time.sleep(0.2)
        c = Collector(s.store_dir, s.state_dir, s.db)  # real /proc scan
        out = c.run(DELETE)
        assert out.paths == [other]
        assert os.path.isdir(d) and os.path.exists(e)
    finally:
        proc.kill()
        proc.wait()


def test_fcntl_locks_are_posix(local_store: LocalStore) -> None:
    """gc.lock is an fcntl lock: an exclusive holder blocks another process's F_SETLK."""
    s = local_store
    lock = roots.GCLock(s.state_dir, exclusive=True)
    lock.acquire()
    try:
        code = (
            "import fcntl,os,sys\n"
            "fd=os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n fcntl.lockf(fd, fcntl.LOCK_SH|fcntl.LOCK_NB); print('got')\n"
            "except OSError: print('busy')\n"
        )
        out = subprocess.run(["python3", "-c", code, f"{s.state_dir}/gc.lock"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert out.stdout.strip() == "busy"
    finally:
        lock.release()
