"""NAR writer, push parser and sinks, checked against `nix-store --dump`, `nix-hash` and the
spec's byte-level example, plus round trips through the parser and RestoreSink."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guixsvc.store import base32, nar
from guixsvc.store.nar import NarError, NarParser, NullSink, RestoreSink

if TYPE_CHECKING:
    from .conftest import Nix

SPEC_HELLO = bytes.fromhex(
    "0d00000000000000" "6e69782d61726368" "6976652d31000000"
    "0100000000000000" "2800000000000000"
    "0400000000000000" "7479706500000000"
    "0700000000000000" "726567756c617200"
    "0800000000000000" "636f6e74656e7473"
    "0600000000000000" "68656c6c6f0a0000"
    "0100000000000000" "2900000000000000"
)  # fmt: skip


# -- helpers ------------------------------------------------------------------------------------


def s(data: bytes, pad: bytes | None = None) -> bytes:
    """A protocol string, written independently of the module under test."""
    padding = pad if pad is not None else b"\0" * (-len(data) % 8)
    return len(data).to_bytes(8, "little") + data + padding


def nar_of(*tokens: bytes) -> bytes:
    return s(b"nix-archive-1") + b"".join(tokens)


def regular(data: bytes, executable: bool = False) -> bytes:
    exe = s(b"executable") + s(b"") if executable else b""
    return (
        s(b"(") + s(b"type") + s(b"regular") + exe + s(b"contents")
        + len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8) + s(b")")
    )  # fmt: skip


def entry(name: bytes, node: bytes) -> bytes:
    return s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")


def directory(*entries: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"directory") + b"".join(entries) + s(b")")


def symlink(target: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


class Recorder:
    """A sink recording events, with each file's contents joined."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.chunk_types: set[type] = set()
        self._data: list[bytes] = []

    def directory(self, path: str) -> None:
        self.events.append(("dir", path))

    def symlink(self, path: str, target: bytes) -> None:
        self.events.append(("link", path, target))

    def file_start(self, path: str, executable: bool, size: int) -> None:
        self.events.append(("file", path, executable, size))
        self._data = []

    def file_data(self, chunk: memoryview | bytes) -> None:
        self.chunk_types.add(type(chunk))
        self._data.append(bytes(chunk))

    def file_end(self) -> None:
        self.events.append(("data", b"".join(self._data)))


def parse(data: bytes, sink: Any = None, chunk: int | None = None) -> NarParser:
    parser = NarParser(sink if sink is not None else NullSink())
    if chunk is None:
        assert parser.feed(data) == len(data)
    else:
        for i in range(0, len(data), chunk):
            assert parser.feed(data[i : i + chunk]) == len(data[i : i + chunk])
    parser.finish()
    assert parser.done
    assert parser.bytes_consumed == len(data)
    return parser


def dump_bytes(path: str | os.PathLike[str]) -> bytes:
    return b"".join(nar.dump(path))


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree with every node kind and awkward names and sizes."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    for size in (1, 7, 8, 9, 15, 16, 17):
        (root / f"size-{size}").write_bytes(bytes(range(size)))
    (root / "exe").write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(root / "exe", 0o755)
    (root / "only-user-x").write_bytes(b"x")
    os.chmod(root / "only-user-x", 0o700)
    (root / "group-x-only").write_bytes(b"x")  # S_IXGRP alone does not make it executable
    os.chmod(root / "group-x-only", 0o654)
    (root / "big").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    sub = root / "sub dir"
    sub.mkdir()
    (sub / "é").write_bytes("unicode é\n".encode())
    (sub / "日本").write_bytes(b"\xff" * 100)
    (sub / "B").write_bytes(b"upper")
    (sub / "a").write_bytes(b"lower")
    (sub / "a-").write_bytes(b"")
    (sub / "a.b").write_bytes(b"")
    os.symlink("../exe", sub / "rel-link")
    os.symlink("/nonexistent/target", sub / "dangling")
    os.symlink("é" * 40, sub / "long-unicode-link")
    deep = sub / "x" / "y" / "z"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf")
    os.mkdir(os.path.join(os.fsencode(root), b"non-utf8-\xff\xfe"))
    with open(os.path.join(os.fsencode(root), b"non-utf8-\xff\xfe", b"\x80"), "wb") as f:
        f.write(b"raw")
    return root


# -- writer -------------------------------------------------------------------------------------


def test_spec_example(tmp_path: Path) -> None:
    assert len(SPEC_HELLO) == 120
    assert nar.dump_regular(b"hello\n") == SPEC_HELLO
    assert regular(b"hello\n") == SPEC_HELLO[24:]  # our independent token helper agrees
    f = tmp_path / "hello"
    f.write_bytes(b"hello\n")
    assert dump_bytes(f) == SPEC_HELLO
    digest, size = nar.hash_path(f)
    assert digest.hex() == "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
    assert base32.encode(digest) == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    assert size == 120


def test_dump_regular_executable() -> None:
    assert nar.dump_regular(b"abc", executable=True) == nar_of(regular(b"abc", True))
    assert nar.dump_regular(b"") == nar_of(regular(b""))


def test_dump_structure(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "b").write_bytes(b"1")
    (root / "a").mkdir()
    os.symlink("t", root / "c")
    expected = nar_of(
        directory(entry(b"a", directory()), entry(b"b", regular(b"1")), entry(b"c", symlink(b"t")))
    )
    assert dump_bytes(root) == expected
    assert dump_bytes(root / "c") == nar_of(symlink(b"t"))


def test_dump_matches_nix_store(nix: Nix, tree: Path) -> None:
    for path in [tree, tree / "sub dir", tree / "exe", tree / "empty-file", tree / "big"]:
        theirs = nix.run("nix-store", "--dump", str(path))
        ours = dump_bytes(path)
        assert ours == theirs, path
        digest, size = nar.hash_path(path)
        assert size == len(theirs)
        assert base32.encode(digest) == nix.text("nix-hash", "--type", "sha256", "--base32",
                                                 str(path))  # fmt: skip
    link = tree / "sub dir" / "rel-link"
    assert dump_bytes(link) == nix.run("nix-store", "--dump", str(link))


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha512"])
def test_hash_path_algorithms_against_nix(nix: Nix, tree: Path, algo: str) -> None:
    digest, _ = nar.hash_path(tree / "sub dir", algo)
    assert digest.hex() == nix.text("nix-hash", "--type", algo, str(tree / "sub dir"))


def test_dump_sorts_bytewise(tmp_path: Path) -> None:
    root = os.path.join(os.fsencode(tmp_path), b"r")
    os.mkdir(root)
    names = [b"\xff", b"z", "é".encode(), b"B", b"a", b"a-", b"a.", b"\x01", "日".encode()]
    for n in names:
        with open(os.path.join(root, n), "wb"):
            pass
    expected = nar_of(directory(*(entry(n, regular(b"")) for n in sorted(names))))
    assert dump_bytes(root) == expected


def test_dump_unsupported_type(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(NarError) as info:
        dump_bytes(root)
    assert str(info.value) == f"file `{root}/fifo' has an unsupported type"
    with pytest.raises(NarError, match="has an unsupported type"):
        dump_bytes(root / "fifo")


def test_dump_streams_large_files(tmp_path: Path) -> None:
    f = tmp_path / "big"
    data = os.urandom(5 * 1024 * 1024 + 3)
    f.write_bytes(data)
    chunks = list(nar.dump(f))
    assert len(chunks) >= 5
    assert max(map(len, chunks)) <= 1024 * 1024 + 4096
    assert b"".join(chunks) == nar_of(regular(data))


def test_dump_batches_small_tokens(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    for i in range(500):
        (root / f"f{i:04}").write_bytes(b"x" * (i % 50))
    chunks = list(nar.dump(root))
    assert len(chunks) <= 3  # ~100 KiB of tokens, not thousands of tiny pieces


def remove_chain(top: str, depth: int) -> None:
    """Remove a `top/d/d/.../d/f` chain; pytest's recursive rmtree cannot go this deep."""
    bottom = top + "/d" * depth
    with contextlib.suppress(FileNotFoundError):
        os.unlink(bottom + "/f")
    for level in range(depth, -1, -1):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(top + "/d" * level)


def test_dump_deep_tree_without_recursion(tmp_path: Path) -> None:
    depth = 1500  # deeper than Python's recursion limit
    root = str(tmp_path / "deep")
    dest = str(tmp_path / "restored")
    try:
        path = root
        os.mkdir(path)
        for _ in range(depth):
            path += "/d"
            os.mkdir(path)
        with open(path + "/f", "wb") as f:
            f.write(b"bottom")
        data = dump_bytes(root)
        fds = open_fds()
        nar.restore([data], dest)
        assert open_fds() == fds
        assert dump_bytes(dest) == data
    finally:
        remove_chain(root, depth)
        remove_chain(dest, depth)


def test_file_shrinking_while_dumped(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * (1 << 20))
    it = nar.dump(f)
    header = next(it)  # size taken from lstat, tokens flushed before the contents are read
    assert header.endswith((1 << 20).to_bytes(8, "little"))
    f.write_bytes(b"x" * 10)
    with pytest.raises(NarError, match="unexpected end-of-file"):
        list(it)


# -- parser: round trips --------------------------------------------------------------------------


def test_restore_round_trip(tree: Path, tmp_path: Path) -> None:
    data = dump_bytes(tree)
    dest = tmp_path / "out"
    with umask(0o022):
        assert nar.restore([data[i : i + 65536] for i in range(0, len(data), 65536)], dest) == len(
            data
        )
    assert dump_bytes(dest) == data
    assert stat.S_IMODE(os.lstat(dest / "exe").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "group-x-only").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(dest / "empty-file").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(dest / "sub dir").st_mode) == 0o755
    assert os.readlink(dest / "sub dir" / "rel-link") == "../exe"


def test_restore_modes_follow_umask(tmp_path: Path) -> None:
    data = nar_of(directory(entry(b"d", directory()), entry(b"exe", regular(b"", True)),
                            entry(b"f", regular(b""))))  # fmt: skip
    with umask(0o077):
        nar.restore([data], tmp_path / "o")
    modes = {n: stat.S_IMODE(os.lstat(tmp_path / "o" / n).st_mode) for n in ("d", "exe", "f")}
    # Upstream: mkdir 0777 and open 0666 minus umask, then fchmod(+x for all) on executables.
    assert modes == {"d": 0o700, "exe": 0o711, "f": 0o600}


def test_restore_top_level_kinds(tmp_path: Path) -> None:
    nar.restore([nar.dump_regular(b"data", True)], tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"data"
    assert os.access(tmp_path / "file", os.X_OK)
    nar.restore([nar_of(symlink(b"/somewhere"))], tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "/somewhere"


def test_parse_nix_store_dump(nix: Nix, tree: Path, tmp_path: Path) -> None:
    theirs = nix.run("nix-store", "--dump", str(tree))
    nar.restore([theirs], tmp_path / "out")
    assert nix.run("nix-store", "--dump", str(tmp_path / "out")) == theirs


def test_contents_are_streamed_not_buffered(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 1)
    archive = nar.dump_regular(data)
    rec = Recorder()
    parser = NarParser(rec)
    sizes = []
    for i in range(0, len(archive), 1 << 20):
        parser.feed(archive[i : i + (1 << 20)])
        sizes.append(len(parser._buf))
    parser.finish()
    assert rec.chunk_types == {memoryview}
    assert max(sizes) <= 8 + nar.DEFAULT_MAX_TOKEN
    assert rec.events == [("file", "", False, len(data)), ("data", data)]


def test_trailing_bytes_are_not_consumed() -> None:
    archive = nar.dump_regular(b"hello\n")
    parser = NarParser(NullSink())
    assert parser.feed(archive[:50]) == 50
    assert parser.feed(archive[50:] + b"NEXT MESSAGE") == len(archive) - 50
    assert parser.done
    assert parser.bytes_consumed == len(archive)
    assert parser.feed(b"more") == 0
    parser.finish()
    with pytest.raises(NarError, match="trailing data"):
        nar.restore([archive + b"x"], tempfile.mktemp())


def test_truncated_archives() -> None:
    archive = nar_of(directory(entry(b"a", regular(b"abc", True)), entry(b"l", symlink(b"x"))))
    for cut in range(len(archive)):
        parser = NarParser(Recorder())
        assert parser.feed(archive[:cut]) == cut
        assert not parser.done
        with pytest.raises(NarError, match=r"^unexpected end-of-file$"):
            parser.finish()


def test_file_and_empty_dir_events() -> None:
    archive = nar_of(
        directory(
            entry(b"d", directory(entry(b"e", directory()))),
            entry(b"f", regular(b"12345678", True)),
            entry(b"l", symlink(b"../f")),
            entry("é".encode(), regular(b"")),
        )
    )
    rec = Recorder()
    parse(archive, rec)
    assert rec.events == [
        ("dir", ""),
        ("dir", "d"),
        ("dir", "d/e"),
        ("file", "f", True, 8),
        ("data", b"12345678"),
        ("link", "l", b"../f"),
        ("file", "é", False, 0),
        ("data", b""),
    ]


files = st.tuples(st.just("file"), st.binary(max_size=300), st.booleans())
links = st.tuples(
    st.just("link"), st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b)
)
names = st.binary(min_size=1, max_size=24).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
trees = st.recursive(
    st.one_of(files, links),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(names, children, max_size=5)),
    max_leaves=25,
)


def materialise(node: Any, path: bytes) -> None:
    kind = node[0]
    if kind == "file":
        with open(path, "wb") as f:
            f.write(node[1])
        os.chmod(path, 0o755 if node[2] else 0o644)
    elif kind == "link":
        os.symlink(node[1], path)
    else:
        os.mkdir(path)
        for name, child in node[1].items():
            materialise(child, os.path.join(path, name))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.integers(1, 200))
def test_random_tree_round_trip(node: Any, chunk: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(os.fsencode(tmp), b"src")
        materialise(node, src)
        data = dump_bytes(src)
        dest = os.path.join(os.fsencode(tmp), b"dest")
        nar.restore([data[i : i + chunk] for i in range(0, len(data), chunk)], dest)
        assert dump_bytes(dest) == data


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=trees)
def test_random_tree_matches_nix(nix: Nix, node: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(os.fsencode(tmp), b"src")
        materialise(node, src)
        theirs = subprocess.run(
            ["nix-store", "--dump", src], env=nix.env, capture_output=True, check=True
        ).stdout
        assert dump_bytes(src) == theirs


FIXED_ARCHIVE = nar_of(
    directory(
        entry(b"a", regular(bytes(range(200)) * 3, True)),
        entry(b"b", directory(entry(b"c", symlink(b"target")), entry(b"d", regular(b"")))),
        entry(b"e", regular(b"x" * 17)),
    )
)


@given(st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_chunking_does_not_matter(sizes: list[int]) -> None:
    reference = Recorder()
    parse(FIXED_ARCHIVE, reference)
    rec = Recorder()
    parser = NarParser(rec)
    pos = 0
    i = 0
    while pos < len(FIXED_ARCHIVE):
        n = sizes[i % len(sizes)]
        i += 1
        piece = memoryview(FIXED_ARCHIVE)[pos : pos + n]
        assert parser.feed(piece) == len(piece)
        pos += len(piece)
    parser.finish()
    assert rec.events == reference.events


# -- parser: leniency and errors ------------------------------------------------------------------


def test_executable_after_contents_is_accepted(tmp_path: Path) -> None:
    node = (
        s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + (3).to_bytes(8, "little")
        + b"abc\0\0\0\0\0" + s(b"executable") + s(b"") + s(b")")
    )  # fmt: skip
    archive = nar_of(node)
    nar.restore([archive], tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"abc"
    assert os.stat(tmp_path / "f").st_mode & 0o100
    parse(archive, Recorder())  # a sink without file_executable() copes too


def test_executable_argument_is_ignored() -> None:
    node = (
        s(b"(") + s(b"type") + s(b"regular") + s(b"executable") + s(b"whatever")
        + s(b"contents") + (0).to_bytes(8, "little") + s(b")")
    )  # fmt: skip
    rec = Recorder()
    parse(nar_of(node), rec)
    assert rec.events == [("file", "", True, 0), ("data", b"")]


def test_regular_without_contents_is_an_empty_file() -> None:
    rec = Recorder()
    parse(nar_of(s(b"(") + s(b"type") + s(b"regular") + s(b")")), rec)
    assert rec.events == [("file", "", False, 0), ("data", b"")]


def too_long_name() -> bytes:
    return nar_of(directory(entry(b"n" * (nar.DEFAULT_MAX_TOKEN + 1), regular(b""))))


BAD_ARCHIVES: list[tuple[str, bytes, str]] = [
    ("header", s(b"nix-archive-2") + regular(b""),
     "bad archive: input doesn't look like a normalized archive"),
    ("header-length", s(b"not a nar at all, really") + regular(b""),
     "bad archive: input doesn't look like a normalized archive"),
    ("header-padding", s(b"nix-archive-1", b"\0\0\1") + regular(b""),
     "bad archive: input doesn't look like a normalized archive"),
    ("open-tag", nar_of(s(b"type")), "bad archive: expected open tag"),
    ("unknown-type", nar_of(s(b"(") + s(b"type") + s(b"fifo") + s(b")")),
     "bad archive: unknown file type fifo"),
    ("two-types", nar_of(s(b"(") + s(b"type") + s(b"regular") + s(b"type") + s(b"regular")),
     "bad archive: multiple type fields"),
    ("field-for-other-type", nar_of(s(b"(") + s(b"type") + s(b"regular") + s(b"target")),
     "bad archive: unknown field target"),
    ("entry-in-symlink", nar_of(s(b"(") + s(b"type") + s(b"symlink") + s(b"entry")),
     "bad archive: unknown field entry"),
    ("unknown-field", nar_of(s(b"(") + s(b"type") + s(b"directory") + s(b"foo")),
     "bad archive: unknown field foo"),
    ("entry-open", nar_of(s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"name")),
     "bad archive: expected open tag"),
    ("empty-name", nar_of(directory(entry(b"", regular(b"")))),
     "NAR contains invalid file name `'"),
    ("dot", nar_of(directory(entry(b".", regular(b"")))), "NAR contains invalid file name `.'"),
    ("dotdot", nar_of(directory(entry(b"..", regular(b"")))),
     "NAR contains invalid file name `..'"),
    ("slash", nar_of(directory(entry(b"a/b", regular(b"")))),
     "NAR contains invalid file name `a/b'"),
    ("nul", nar_of(directory(entry(b"a\0b", regular(b"")))),
     "NAR contains invalid file name `a\0b'"),
    ("unsorted", nar_of(directory(entry(b"b", regular(b"")), entry(b"a", regular(b"")))),
     "NAR directory is not sorted"),
    ("duplicate", nar_of(directory(entry(b"a", regular(b"")), entry(b"a", directory()))),
     "NAR directory is not sorted"),
    ("bytewise", nar_of(directory(entry(b"a", regular(b"")), entry(b"B", regular(b"")))),
     "NAR directory is not sorted"),
    ("token-padding", nar_of(s(b"(", b"\0\0\0\0\0\0\1")), "non-zero padding"),
    ("contents-padding", nar_of(s(b"(") + s(b"type") + s(b"regular") + s(b"contents")
                                + (1).to_bytes(8, "little") + b"x\0\0\0\0\0\0\1"),
     "non-zero padding"),
    ("64-bit-length", nar_of((1 << 32 | 1).to_bytes(8, "little")),
     "implementation cannot deal with > 32-bit integers"),
    ("long-token", too_long_name(), "bad archive: string of 65537 bytes is too long"),
    ("long-target", nar_of(symlink(b"t" * 4097)), "bad archive: string of 4097 bytes is too long"),
    ("no-type", nar_of(s(b"(") + s(b")")), "bad archive: node without a type"),
    ("no-target", nar_of(s(b"(") + s(b"type") + s(b"symlink") + s(b")")),
     "bad archive: symlink without a target"),
    ("two-contents", nar_of(s(b"(") + s(b"type") + s(b"regular") + s(b"contents")
                            + bytes(8) + s(b"contents")),
     "bad archive: multiple contents fields"),
    ("entry-without-name", nar_of(s(b"(") + s(b"type") + s(b"directory") + s(b"entry")
                                  + s(b"(") + s(b"node")),
     "bad archive: entry name missing"),
    ("entry-without-node", nar_of(s(b"(") + s(b"type") + s(b"directory") + s(b"entry")
                                  + s(b"(") + s(b"name") + s(b"a") + s(b")")),
     "bad archive: entry node missing"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_ARCHIVES],
                         ids=[i for i, _, _ in BAD_ARCHIVES])  # fmt: skip
def test_bad_archives(data: bytes, message: str) -> None:
    for chunk in (len(data), 1, 7):
        parser = NarParser(Recorder())
        with pytest.raises(NarError) as info:
            for i in range(0, len(data), chunk):
                parser.feed(data[i : i + chunk])
            parser.finish()
        assert str(info.value) == message
        with pytest.raises(NarError):  # the parser stays failed
            parser.feed(b"")


def test_max_token_is_configurable() -> None:
    archive = nar_of(directory(entry(b"n" * 100, regular(b""))))
    parse(archive)
    with pytest.raises(NarError, match="too long"):
        NarParser(NullSink(), max_token=64).feed(archive)
    parse(nar_of(symlink(b"t" * 4096)))


# -- RestoreSink safety ---------------------------------------------------------------------------


def test_restore_refuses_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        nar.restore([nar_of(directory())], tmp_path / "exists")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError):
        nar.restore([nar.dump_regular(b"x")], tmp_path / "file")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(FileExistsError):  # O_EXCL|O_NOFOLLOW: the link is not followed
        nar.restore([nar.dump_regular(b"x")], tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()


def test_restore_never_writes_through_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with RestoreSink(tmp_path / "dest") as sink:
        sink.directory("")
        sink.symlink("a", os.fsencode(outside))
        with pytest.raises(NarError, match="not a restored directory"):
            sink.file_start("a/evil", False, 0)
    assert list(outside.iterdir()) == []


def test_restore_survives_directory_swapped_for_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    with RestoreSink(dest) as sink:
        sink.directory("")
        sink.directory("d")
        # Someone replaces the freshly created directory by a symlink to elsewhere.
        os.rename(dest / "d", dest / "moved")
        os.symlink(outside, dest / "d")
        sink.file_start("d/f", False, 1)
        sink.file_data(b"x")
        sink.file_end()
    assert list(outside.iterdir()) == []
    assert (dest / "moved" / "f").read_bytes() == b"x"


def test_restore_deep_tree_bounded_fds(tmp_path: Path) -> None:
    # 300 levels, with files at each level written after the subdirectory (so ancestors whose
    # descriptors were dropped must be reopened).
    node = regular(b"leaf")
    for level in range(300):
        node = directory(entry(b"d", node), entry(b"f", regular(b"%d" % level)))
    archive = nar_of(node)
    fds = open_fds()
    max_fds = 0

    class Counting(RestoreSink):
        def file_start(self, path: str, executable: bool, size: int) -> None:
            nonlocal max_fds
            super().file_start(path, executable, size)
            max_fds = max(max_fds, open_fds() - fds)

    with Counting(tmp_path / "deep") as sink:
        parse(archive, sink)
    assert open_fds() == fds
    assert max_fds <= 70
    assert dump_bytes(tmp_path / "deep") == archive
    assert (tmp_path / "deep" / "f").read_bytes() == b"299"


def test_null_sink_and_hash(tree: Path) -> None:
    data = dump_bytes(tree)
    parse(data, NullSink(), chunk=4096)
    digest, size = nar.hash_path(tree)
    assert digest == hashlib.sha256(data).digest()
    assert size == len(data)
