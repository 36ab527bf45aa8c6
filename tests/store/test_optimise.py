"""Tests for guixsvc.store.optimise: deduplication into <store>/.links (store.md §8).

Oracles: Nix's `nix-hash --type sha256 --base32` (the NAR hash that names `.links` entries),
guixsvc.store.nar (another implementation of the NAR format) and the file system itself (inode
numbers and link counts).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guixsvc.store import base32
from guixsvc.store.canonical import canonicalise
from guixsvc.store.locks import LVL_ERROR
from guixsvc.store.optimise import (
    DEDUPLICATION_MIN_SIZE,
    OptimiseStats,
    format_optimise_summary,
    load_inode_hash,
    nar_hash_regular_file,
    optimise_path,
    optimise_store,
)

H = ["0" * 31 + c for c in "123456789"]
BIG = bytes(range(256)) * 40  # 10240 bytes
OTHER = b"other contents " * 700  # 10500 bytes


def _item(store: Path, h: str, files: dict[str, tuple[bytes, int]]) -> Path:
    top = store / f"{h}-item"
    for rel, (data, mode) in files.items():
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
    canonicalise(str(top))
    return top


@pytest.fixture
def store(tmp_path: Path) -> Path:
    s = tmp_path / "store"
    (s / ".links").mkdir(parents=True)
    os.chmod(s, 0o1775)
    return s


def _nix_hash(path: Path) -> str:
    return (
        subprocess.run(
            ["nix-hash", "--type", "sha256", "--base32", str(path)],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )


@pytest.mark.skipif(shutil.which("nix-hash") is None, reason="nix-hash (nix-bin) not installed")
@pytest.mark.parametrize("mode", [0o444, 0o555])
@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 8192, 100_003])
def test_nar_hash_matches_nix_hash(tmp_path: Path, mode: int, size: int) -> None:
    f = tmp_path / "f"
    f.write_bytes(os.urandom(size))
    os.chmod(f, mode)
    assert base32.encode(nar_hash_regular_file(str(f))) == _nix_hash(f)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=3000), executable=st.booleans())
def test_nar_hash_matches_nar_module(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, executable: bool
) -> None:
    import hashlib

    from guixsvc.store import nar

    f = tmp_path_factory.mktemp("h") / "f"
    f.write_bytes(data)
    os.chmod(f, 0o555 if executable else 0o444)
    expected = hashlib.sha256(nar.dump_regular(data, executable)).digest()
    assert nar_hash_regular_file(str(f)) == expected
    assert nar.hash_path(str(f))[0] == expected


def test_dedup_between_items(store: Path) -> None:
    files = {
        "share/big": (BIG, 0o444),
        "bin/tool": (BIG, 0o555),  # same bytes, executable: a different NAR, not linked
        "small": (b"s" * 100, 0o444),
    }
    a = _item(store, H[0], files)
    b = _item(store, H[1], {**files, "share/other": (OTHER, 0o444)})
    b_writable = b / "share" / "writable"
    os.chmod(b / "share", 0o755)
    b_writable.write_bytes(OTHER)
    os.chmod(b_writable, 0o644)
    canonicalise_dir_only(b / "share")

    # First item: files enter the pool, nothing is saved yet.
    assert optimise_path(str(store), str(a)) == (0, 0)
    links = sorted(os.listdir(store / ".links"))
    assert len(links) == 2
    assert os.stat(a / "share" / "big").st_nlink == 2

    log: list[tuple[int, str]] = []
    linked, saved = optimise_path(str(store), str(b), log=lambda lv, m: log.append((lv, m)))
    assert (linked, saved) == (2, 2 * len(BIG))
    for rel in ("share/big", "bin/tool"):
        sa, sb = os.stat(a / rel), os.stat(b / rel)
        assert sa.st_ino == sb.st_ino and sa.st_nlink == 3
        assert stat.S_IMODE(sb.st_mode) == stat.S_IMODE(sa.st_mode)
    assert os.stat(a / "share/big").st_ino != os.stat(a / "bin/tool").st_ino
    assert os.stat(a / "small").st_ino != os.stat(b / "small").st_ino
    assert os.stat(b_writable).st_nlink == 1
    assert (LVL_ERROR, f"skipping suspicious writable file `{b_writable}'") in log
    # Parent directories are back to their canonical state; the store dir is untouched.
    for d in (b / "share", b / "bin"):
        sd = os.stat(d)
        assert stat.S_IMODE(sd.st_mode) == 0o555 and sd.st_mtime == 1
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o1775
    assert not [n for n in os.listdir(store) if n.startswith(".tmp-link-")]
    # Pool names are the NAR hashes.
    expected = {base32.encode(nar_hash_regular_file(str(a / r))) for r in ("share/big", "bin/tool")}
    assert expected | {base32.encode(nar_hash_regular_file(str(b / "share/other")))} == set(
        os.listdir(store / ".links")
    )
    # Idempotent.
    assert optimise_path(str(store), str(b)) == (0, 0)


def canonicalise_dir_only(d: Path) -> None:
    os.chmod(d, 0o555)
    os.utime(d, (1, 1), follow_symlinks=False)


@pytest.mark.skipif(shutil.which("nix-hash") is None, reason="nix-hash (nix-bin) not installed")
def test_links_named_like_nix_hash(store: Path) -> None:
    a = _item(store, H[0], {"f": (BIG, 0o444), "x": (OTHER, 0o555)})
    optimise_path(str(store), str(a))
    assert sorted(os.listdir(store / ".links")) == sorted([_nix_hash(a / "f"), _nix_hash(a / "x")])


def test_top_level_file_items(store: Path) -> None:
    a = store / f"{H[0]}-file"
    b = store / f"{H[1]}-file"
    for p in (a, b):
        p.write_bytes(BIG)
        canonicalise(str(p))
    store_mode = os.stat(store).st_mode
    assert optimise_path(str(store), str(a)) == (0, 0)
    assert optimise_path(str(store), str(b)) == (1, len(BIG))
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert os.stat(store).st_mode == store_mode


def test_threshold(store: Path) -> None:
    assert DEDUPLICATION_MIN_SIZE == 8192
    data = b"t" * 8192  # upstream deduplicationMinSize
    a = _item(store, H[0], {"f": (data, 0o444), "g": (data[:-1], 0o444)})
    b = _item(store, H[1], {"f": (data, 0o444), "g": (data[:-1], 0o444)})
    optimise_path(str(store), str(a))
    assert optimise_path(str(store), str(b)) == (1, 8192)
    assert os.stat(a / "g").st_ino != os.stat(b / "g").st_ino


def test_corrupt_link_is_replaced(store: Path) -> None:
    a = _item(store, H[0], {"f": (BIG, 0o444)})
    key = base32.encode(nar_hash_regular_file(str(a / "f")))
    (store / ".links" / key).write_bytes(b"truncated")
    log: list[tuple[int, str]] = []
    assert optimise_path(str(store), str(a), log=lambda lv, m: log.append((lv, m))) == (0, 0)
    assert os.stat(store / ".links" / key).st_ino == os.stat(a / "f").st_ino
    assert (LVL_ERROR, f"removing corrupted link ‘{store}/.links/{key}’") in log


def test_optimise_store_uses_links_inodes(store: Path) -> None:
    a = _item(store, H[0], {"f": (BIG, 0o444), "g": (OTHER, 0o444)})
    b = _item(store, H[1], {"f": (BIG, 0o444), "g": (OTHER, 0o444)})
    c = _item(store, H[2], {"f": (BIG, 0o444)})
    optimise_path(str(store), str(a))
    assert load_inode_hash(str(store)) >= {os.stat(a / "f").st_ino, os.stat(a / "g").st_ino}
    seen: list[str] = []

    def before(p: str) -> bool:
        seen.append(p)
        return p != str(c)

    stats = OptimiseStats()
    freed, linked = optimise_store(
        str(store), [str(a), str(b), str(c)], before_path=before, stats=stats
    )
    assert (freed, linked) == (len(BIG) + len(OTHER), 2)
    assert seen == [str(a), str(b), str(c)]
    assert os.stat(c / "f").st_nlink == 1  # skipped
    assert stats.files_linked == 2 and stats.blocks_freed > 0
    assert format_optimise_summary(stats) == (
        f"{(len(BIG) + len(OTHER)) / 1048576:.2f} MiB freed by hard-linking 2 files"
    )
    assert format_optimise_summary(OptimiseStats(0, 3 * 1048576 // 2, 0)).startswith("1.50 MiB")


def test_creates_links_dir(tmp_path: Path) -> None:
    store = tmp_path / "s"
    store.mkdir()
    a = _item(store, H[0], {"f": (BIG, 0o444)})
    optimise_path(str(store), str(a))
    assert len(os.listdir(store / ".links")) == 1
