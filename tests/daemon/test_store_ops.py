"""The daemon as a subprocess on a temporary store, driven over its socket by our client.

Expected hashes come from Debian's nix-bin (`nix-hash`) where it is installed, and store paths
from `StoreDir` (itself checked against nix-bin and the spec's vectors in tests/store).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonError
from guixsvc.store import nar
from guixsvc.store.derivation import (
    Derivation,
    DerivationOutput,
    expected_output_paths,
    unparse_derivation,
)
from guixsvc.store.paths import StoreDir
from tests.conftest import Daemon

NIX_HASH = shutil.which("nix-hash")


def oracle_nar_hash(path: str) -> str:
    """SHA-256 of the NAR of `path`, base16, from nix-hash if present, else from our dumper."""
    if NIX_HASH:
        out = subprocess.run(
            [NIX_HASH, "--type", "sha256", path], check=True, capture_output=True, text=True
        )
        return out.stdout.strip()
    return hashlib.sha256(b"".join(nar.dump(path))).hexdigest()


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (tree / "bin" / "hello").chmod(0o755)
    (tree / "data").write_bytes(os.urandom(100_000))
    (tree / "link").symlink_to("bin/hello")
    (tree / "odd size").write_bytes(b"1234567")
    return tree


def db_paths(daemon: Daemon) -> set[str]:
    with sqlite3.connect(daemon.db_path) as db:
        return {row[0] for row in db.execute("select path from ValidPaths")}


def test_add_text_and_queries(daemon: Daemon) -> None:
    store = StoreDir(daemon.store_dir)
    with daemon.client() as c:
        c.set_options()
        a = c.add_text_to_store("a.txt", b"first")
        b = c.add_text_to_store("b.txt", "refers to " + a, [a])
        assert a == store.display(store.make_text_path("a.txt", hashlib.sha256(b"first").digest()))
        assert b == store.display(
            store.make_text_path("b.txt", hashlib.sha256(b"refers to " + a.encode()).digest(), [a])
        )
        assert c.is_valid_path(a) and c.is_valid_path(b)
        assert not c.is_valid_path(a[:-1] + "x")
        info = c.query_path_info(b)
        assert info.deriver is None
        assert info.references == [a]
        assert info.nar_hash == oracle_nar_hash(b)
        assert info.nar_size == len(b"".join(nar.dump(b)))
        assert c.query_path_hash(b) == info.nar_hash
        assert c.query_references(b) == [a]
        assert c.query_referrers(a) == [b]
        assert c.query_valid_paths([b, a, a[:-1] + "x"]) == sorted([a, b])
        assert c.query_all_valid_paths() == sorted([a, b])
        hash_part = os.path.basename(a)[:32]
        assert c.query_path_from_hash_part(hash_part) == a
        assert c.query_path_from_hash_part("0" * 32) is None
        # Adding the same text again gives the same path and does not duplicate anything.
        assert c.add_text_to_store("a.txt", b"first") == a
    st = os.lstat(a)
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime == 1
    assert Path(a).read_bytes() == b"first"
    assert db_paths(daemon) == {a, b}


def test_add_to_store_recursive(daemon: Daemon, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    store = StoreDir(daemon.store_dir)
    with daemon.client() as c:
        path = c.add_to_store("my-tree", str(tree))
        expected_hash = oracle_nar_hash(str(tree))
        assert path == store.display(
            store.make_fixed_output_path(True, "sha256", bytes.fromhex(expected_hash), "my-tree")
        )
        assert c.query_path_info(path).nar_hash == expected_hash
    assert oracle_nar_hash(path) == expected_hash
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, ""]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            assert st.st_mtime == 1, full
            if not stat.S_ISLNK(st.st_mode):
                assert stat.S_IMODE(st.st_mode) in (0o444, 0o555), full
    assert stat.S_IMODE(os.lstat(os.path.join(path, "bin", "hello")).st_mode) == 0o555
    assert os.readlink(os.path.join(path, "link")) == "bin/hello"


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
def test_add_to_store_flat_and_other_algorithms(daemon: Daemon, tmp_path: Path, algo: str) -> None:
    f = tmp_path / "file.bin"
    f.write_bytes(os.urandom(5000))
    f.chmod(0o755)  # flat hashing ignores the executable bit
    store = StoreDir(daemon.store_dir)
    with daemon.client() as c:
        flat = c.add_to_store("file.bin", str(f), recursive=False, algo=algo)
        digest = hashlib.new(algo, f.read_bytes()).digest()
        assert flat == store.display(store.make_fixed_output_path(False, algo, digest, "file.bin"))
        assert stat.S_IMODE(os.lstat(flat).st_mode) == 0o444
        assert c.query_path_info(flat).nar_hash == oracle_nar_hash(flat)
        rec = c.add_to_store("file.bin", str(f), recursive=True, algo=algo)
        nar_digest = hashlib.new(algo, b"".join(nar.dump(str(f)))).digest()
        assert rec == store.display(
            store.make_fixed_output_path(True, algo, nar_digest, "file.bin")
        )
        assert c.query_path_info(rec).nar_hash == oracle_nar_hash(str(f))


def test_flat_add_of_a_directory_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    with daemon.client() as c:
        with pytest.raises(DaemonError, match="regular file expected"):
            c.add_to_store("dir", str(tree), recursive=False)
        assert c.add_text_to_store("still-alive", b"yes")  # the session goes on
    assert len(db_paths(daemon)) == 1


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "sp ace", ""])
def test_bad_names_are_refused_and_the_session_goes_on(
    daemon: Daemon, tmp_path: Path, name: str
) -> None:
    f = tmp_path / "f"
    f.write_text("data")
    with daemon.client() as c:
        with pytest.raises(DaemonError, match="invalid"):
            c.add_to_store(name, str(f))
        with pytest.raises(DaemonError, match="invalid"):
            c.add_text_to_store(name, b"x")
        assert c.is_valid_path(c.add_text_to_store("ok", b"ok"))
    assert not any(n.startswith("nix-") for n in os.listdir(daemon.store_dir))
    assert not os.path.exists(os.path.join(os.path.dirname(daemon.store_dir), "escape"))


def test_unknown_hash_algorithm(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("data")
    with daemon.client() as c:
        with pytest.raises(DaemonError, match="unknown hash type"):
            c.add_to_store("f", str(f), algo="crc32")
        assert c.query_all_valid_paths() == []


def test_derivation_outputs(daemon: Daemon) -> None:
    store = StoreDir(daemon.store_dir)
    with daemon.client() as c:
        builder = c.add_text_to_store("builder.sh", b"echo hi > $out")
        drv = Derivation(
            outputs={"out": DerivationOutput("", "", ""), "doc": DerivationOutput("", "", "")},
            input_drvs={},
            input_srcs=frozenset({builder}),
            platform="x86_64-linux",
            builder="/bin/sh",
            args=[builder],
            env={"out": "", "doc": "", "name": "demo"},
        )
        outputs = expected_output_paths(store, "demo", drv, lambda p: None, {})  # type: ignore[arg-type, return-value]
        for name, sp in outputs.items():
            drv.outputs[name] = DerivationOutput(store.display(sp), "", "")
            drv.env[name] = store.display(sp)
        text = unparse_derivation(drv)
        drv_path = c.add_text_to_store("demo.drv", text, [builder])
        assert c.query_derivation_output_names(drv_path) == ["doc", "out"]
        assert c.query_derivation_outputs(drv_path) == sorted(
            store.display(p) for p in outputs.values()
        )
        out = store.display(outputs["out"])
        assert c.query_valid_derivers(out) == [drv_path]
        # A derivation whose output does not match what the daemon computes is refused.
        bad = text.replace(os.path.basename(out)[:5].encode(), b"00000", 1)
        with pytest.raises(DaemonError, match="has incorrect output"):
            c.add_text_to_store("demo.drv", bad, [builder])
        assert len(c.query_all_valid_paths()) == 2
    assert not any(n.startswith("nix-") for n in os.listdir(daemon.store_dir))


def test_referencing_an_invalid_path_is_refused(daemon: Daemon) -> None:
    missing = daemon.store_dir + "/" + "1" * 32 + "-missing"
    with daemon.client() as c:
        with pytest.raises(DaemonError, match="is not valid"):
            c.add_text_to_store("x", b"x", [missing])
        assert c.query_all_valid_paths() == []


def test_roots(daemon: Daemon, tmp_path: Path) -> None:
    with daemon.client() as c:
        p = c.add_text_to_store("rooted", b"root me")
        c.add_temp_root(p)
        temproots = Path(daemon.state_dir, "temproots")
        contents = b"".join(f.read_bytes() for f in temproots.iterdir())
        assert p.encode() + b"\0" in contents
        link = tmp_path / "result"
        link.symlink_to(p)
        c.add_indirect_root(str(link))
        auto = Path(daemon.state_dir, "gcroots", "auto")
        assert [os.readlink(x) for x in auto.iterdir()] == [str(link)]
        roots = c.find_roots()
        assert roots == {str(link): p}
        c.sync_with_gc()
    # The session's temp-roots file is gone once the session ended.
    for _ in range(100):
        if not any(Path(daemon.state_dir, "temproots").iterdir()):
            break
        import time

        time.sleep(0.05)
    assert not any(Path(daemon.state_dir, "temproots").iterdir())


def test_deduplication(daemon: Daemon, tmp_path: Path) -> None:
    blob = os.urandom(20_000)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "f").write_bytes(blob)
    (tmp_path / "two" / "g").write_bytes(blob)
    with daemon.client() as c:
        one = c.add_to_store("one", str(tmp_path / "one"))
        two = c.add_to_store("two", str(tmp_path / "two"))
    a, b = os.stat(os.path.join(one, "f")), os.stat(os.path.join(two, "g"))
    assert a.st_ino == b.st_ino and a.st_nlink == 3


def test_verify_store(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("original")
    with daemon.client() as c:
        good = c.add_text_to_store("good", b"good")
        damaged = c.add_to_store("damaged", str(tmp_path / "d"))
        gone = c.add_text_to_store("gone", b"gone")
        assert c.verify_store(check_contents=True) is False
        os.chmod(damaged, 0o755)
        f = os.path.join(damaged, "f")
        os.chmod(f, 0o644)
        Path(f).write_text("tampered")
        os.unlink(gone)
        assert c.verify_store(check_contents=True) is True
        assert not c.is_valid_path(gone)
        assert c.is_valid_path(good)


def test_failed_paths_and_misc(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.query_failed_paths() == []
        c.clear_failed_paths(["*"])
        assert "download" in c.builtin_builders()
        c.set_options(overrides=[("substitute-urls", "http://example.org")])
        assert c.substitute_urls() == ["http://example.org"]
        c.optimise_store()


def test_build_and_ensure_of_valid_paths_are_no_ops(daemon: Daemon) -> None:
    missing = daemon.store_dir + "/" + "1" * 32 + "-x"
    with daemon.client() as c:
        c.set_options(use_substitutes=False)
        with pytest.raises(DaemonError, match="does not exist and cannot be created"):
            c.ensure_path(missing)
        p = c.add_text_to_store("present", b"here")
        c.build_paths([p])  # nothing to do for a valid path
        c.ensure_path(p)
        assert c.is_valid_path(p)
