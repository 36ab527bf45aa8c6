"""Store path syntax and computation: spec examples, harmonia vectors, and Nix as an oracle."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guixsvc.store import base32, nar
from guixsvc.store.paths import (
    InvalidName,
    InvalidStorePath,
    StoreDir,
    StorePath,
    check_name,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Nix

GNU = StoreDir("/gnu/store")
NIX = StoreDir("/nix/store")
HELLO_WORLD = hashlib.sha256(b"hello, world").digest()
FOO = "/gnu/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-foo"


# -- syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hello", "hello-2.10", "a+b-c.d_e?f=g", "A9", "x.drv"])
def test_check_name_accepts(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (".hidden", "invalid name: `.hidden'"),
        ("", "invalid name: `'"),
        (".", "invalid name: `.'"),
        ("..", "invalid name: `..'"),
        ("a b", "invalid character ` ' in name `a b'"),
        ("a/b", "invalid character `/' in name `a/b'"),
        ("é", "invalid character `é' in name `é'"),
        ("ok!bad", "invalid character `!' in name `ok!bad'"),
        ("x\n", "invalid character `\n' in name `x\n'"),
    ],
)
def test_check_name_rejects(name: str, message: str) -> None:
    with pytest.raises(InvalidName) as info:
        check_name(name)
    assert str(info.value) == message


def test_store_path_basics() -> None:
    sp = GNU.parse("/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello")
    assert sp == StorePath("26b8xvbkhrfwsi2kbr0yk5symm00w4b7", "hello")
    assert sp.base_name == "26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello"
    assert str(sp) == sp.base_name
    assert StorePath.from_base_name(sp.base_name) == sp
    assert GNU.display(sp) == "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello"
    assert not sp.is_derivation
    assert StorePath(sp.hash_part, "demo.drv").is_derivation
    assert GNU.is_store_path(GNU.display(sp))
    assert hash(sp) == hash(StorePath.from_base_name(sp.base_name))


@pytest.mark.parametrize(
    "text",
    [
        "/gnu/store",
        "/gnu/store/",
        "/gnu/storex/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello",
        "/nix/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello",
        "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello/bin",
        "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7_hello",
        "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b-hello",  # 31 characters
        "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4be-hello",  # `e' is not nix-base32
        "/gnu/store/26B8XVBKHRFWSI2KBR0YK5SYMM00W4B7-hello",
        "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-.hello",
        "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hel lo",
        "gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidStorePath) as info:
        GNU.parse(text)
    assert str(info.value) == f"path `{text}' is not in the store"
    assert not GNU.is_store_path(text)


def test_store_path_constructor_validates() -> None:
    with pytest.raises(InvalidStorePath):
        StorePath("short", "x")
    with pytest.raises(InvalidName):
        StorePath("26b8xvbkhrfwsi2kbr0yk5symm00w4b7", "a b")
    with pytest.raises(InvalidStorePath):
        StorePath.from_base_name("26b8xvbkhrfwsi2kbr0yk5symm00w4b7-a b")


def test_lax_helpers() -> None:
    assert GNU.is_direct_store_path("/gnu/store/anything")
    assert GNU.is_direct_store_path("/gnu/store/x.drv!out")
    assert not GNU.is_direct_store_path("/gnu/store/a/b")
    assert not GNU.is_direct_store_path("/gnu/store/")
    assert GNU.is_in_store("/gnu/store/a/b")
    assert GNU.to_store_path("/gnu/store/abc-x/bin/sh") == "/gnu/store/abc-x"
    assert GNU.to_store_path("/gnu/store/abc-x") == "/gnu/store/abc-x"
    with pytest.raises(InvalidStorePath, match="path `/etc/passwd' is not in the store"):
        GNU.to_store_path("/etc/passwd")


def test_store_dir_is_canonical() -> None:
    assert StoreDir("/gnu/store/").path == "/gnu/store"
    assert StoreDir("//gnu/./store//").path == "/gnu/store"
    assert StoreDir("/").path == "/"
    with pytest.raises(ValueError):
        StoreDir("gnu/store")


names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=",
    min_size=1,
    max_size=20,
).filter(lambda s: not s.startswith("."))
hash_parts = st.text(alphabet=base32.ALPHABET, min_size=32, max_size=32)


@given(st.lists(st.tuples(hash_parts, names), max_size=20))
def test_sorting_is_bytewise_on_base_names(items: list[tuple[str, str]]) -> None:
    paths = [StorePath(h, n) for h, n in items]
    assert [p.base_name for p in sorted(paths)] == sorted(
        (p.base_name for p in paths), key=lambda s: s.encode()
    )


@given(hash_parts, names)
def test_parse_display_round_trip(h: str, n: str) -> None:
    sp = StorePath(h, n)
    assert GNU.parse(GNU.display(sp)) == sp


# -- computation: spec worked examples (store.md §4) --------------------------------------------


def test_spec_text_paths() -> None:
    sp = GNU.make_text_path("hello", HELLO_WORLD, [])
    assert GNU.display(sp) == "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello"
    sp = GNU.make_text_path("hello", HELLO_WORLD, [GNU.parse(FOO)])
    assert GNU.display(sp) == "/gnu/store/lm659jafvwi85z9dv4lswfml1v4kww9k-hello"
    # Strings work as references too, and duplicates collapse like a std::set.
    assert GNU.make_text_path("hello", HELLO_WORLD, [FOO, FOO]) == sp


def test_spec_source_path() -> None:
    nar_hash = hashlib.sha256(nar.dump_regular(b"hello\n")).digest()
    assert nar_hash.hex() == "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
    sp = GNU.make_fixed_output_path(True, "sha256", nar_hash, "hello.txt")
    assert GNU.display(sp) == "/gnu/store/mai503rgk7jq72577x5iwgyc5izfvp9i-hello.txt"
    assert GNU.make_store_path("source", nar_hash, "hello.txt") == sp


def test_text_references_are_sorted() -> None:
    a = "/gnu/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a"
    b = "/gnu/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"
    expected = GNU.make_store_path(f"text:{a}:{b}", HELLO_WORLD, "x")
    assert GNU.make_text_path("x", HELLO_WORLD, [b, a]) == expected
    assert GNU.make_text_path("x", HELLO_WORLD, [GNU.parse(a), GNU.parse(b)]) == expected


# Vectors published by nix-community/harmonia (harmonia-store-content-address), /nix/store.
ABC_SHA256 = bytes.fromhex("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
ABC_SHA1 = bytes.fromhex("84983e441c3bd26ebaae4aa1f95129e5e54670f1")


def test_harmonia_vectors() -> None:
    # The digests are those of the classic "abcdbcdecdef..." test message.
    msg = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
    assert hashlib.sha256(msg).digest() == ABC_SHA256
    assert hashlib.sha1(msg).digest() == ABC_SHA1
    name = "konsole-18.12.3"
    assert NIX.make_text_path(name, ABC_SHA256, []).hash_part == "aidi01pgcl6i79fkw737qzx06kjl930m"
    assert (
        NIX.make_fixed_output_path(True, "sha256", ABC_SHA256, name).hash_part
        == "1w01xxn8f7s9s4n65ry6rwd7x9awf04s"
    )
    assert (
        NIX.make_fixed_output_path(False, "sha256", ABC_SHA256, name).hash_part
        == "jw8chmp9sf8f7pw684cszp6pa2zmn0bx"
    )
    assert (
        NIX.make_fixed_output_path(True, "sha1", ABC_SHA1, name).hash_part
        == "ww9d58nz1xsl5ck0vcpc99h23l1y2hln"
    )


def test_make_output_path() -> None:
    h = hashlib.sha256(b"drv").digest()
    assert GNU.make_output_path("out", h, "demo") == GNU.make_store_path("output:out", h, "demo")
    assert GNU.make_output_path("doc", h, "demo") == GNU.make_store_path(
        "output:doc", h, "demo-doc"
    )


def test_make_store_path_checks() -> None:
    with pytest.raises(InvalidName, match="invalid character ` ' in name `a b'"):
        GNU.make_text_path("a b", HELLO_WORLD, [])
    with pytest.raises(ValueError):
        GNU.make_store_path("text", b"short", "x")
    with pytest.raises(ValueError):
        GNU.make_fixed_output_path(False, "sha1", HELLO_WORLD, "x")


def test_store_dir_matters() -> None:
    assert StoreDir("/gnu/store").make_text_path("x", HELLO_WORLD) != StoreDir(
        "/gnu/store2"
    ).make_text_path("x", HELLO_WORLD)


# -- computation: Debian's Nix as an oracle, on a store that is not /nix/store ------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "empty").mkdir()
    (root / "file.txt").write_bytes(b"some text\n")
    (root / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run", 0o755)
    (root / "sub" / "data").write_bytes(bytes(range(256)) * 3 + b"odd")
    os.symlink("../file.txt", root / "sub" / "link")
    return root


def test_source_paths_against_nix(nix: Nix, tree: Path) -> None:
    store = StoreDir(nix.store_dir)
    for item in (tree, tree / "file.txt", tree / "run", tree / "sub"):
        theirs = nix.text("nix-store", "--add", str(item))
        digest, _ = nar.hash_path(item)
        ours = store.make_fixed_output_path(True, "sha256", digest, item.name)
        assert store.display(ours) == theirs
        assert store.parse(theirs) == ours


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
def test_flat_fixed_paths_against_nix(nix: Nix, tree: Path, algo: str) -> None:
    store = StoreDir(nix.store_dir)
    f = tree / "sub" / "data"
    theirs = nix.text("nix-store", "--add-fixed", algo, str(f))
    digest = hashlib.new(algo, f.read_bytes()).digest()
    assert store.display(store.make_fixed_output_path(False, algo, digest, "data")) == theirs


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
def test_recursive_fixed_paths_against_nix(nix: Nix, tree: Path, algo: str) -> None:
    store = StoreDir(nix.store_dir)
    theirs = nix.text("nix-store", "--add-fixed", "--recursive", algo, str(tree))
    digest, _ = nar.hash_path(tree, algo)
    assert store.display(store.make_fixed_output_path(True, algo, digest, "src")) == theirs


def test_name_characters_against_nix(nix: Nix, tmp_path: Path) -> None:
    store = StoreDir(nix.store_dir)
    f = tmp_path / "a+b-c.d_e?f=g"
    f.write_text("x")
    theirs = nix.text("nix-store", "--add", str(f))
    digest, _ = nar.hash_path(f)
    assert store.display(store.make_fixed_output_path(True, "sha256", digest, f.name)) == theirs


def _nix_string(nix: Nix, expr: str) -> str:
    out = nix.text("nix-instantiate", "--eval", "--expr", expr)
    assert out.startswith('"') and out.endswith('"')
    return out[1:-1]


def test_text_paths_against_nix(nix: Nix) -> None:
    store = StoreDir(nix.store_dir)
    theirs = _nix_string(nix, 'builtins.toFile "hello" "hello, world"')
    assert store.display(store.make_text_path("hello", HELLO_WORLD)) == theirs
    # With references (from the string context), given in unsorted order.
    b = _nix_string(nix, 'builtins.toFile "bbb" "b"')
    a = _nix_string(nix, 'builtins.toFile "aaa" "a"')
    contents = f"{b} and {a}"
    expr = (
        'let a = builtins.toFile "aaa" "a"; b = builtins.toFile "bbb" "b"; in '
        'builtins.toFile "refs" "${b} and ${a}"'
    )
    theirs = _nix_string(nix, expr)
    ours = store.make_text_path("refs", hashlib.sha256(contents.encode()).digest(), [b, a])
    assert store.display(ours) == theirs
