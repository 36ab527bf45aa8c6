"""Derivations: ATerm printing/parsing, hashDerivationModulo and output path checks.

Oracles: the spec's worked example (store.md §6) and Debian's Nix, whose `nix-instantiate`
writes .drv files with the same ATerm format and output path rules into a temporary store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guixsvc.store.derivation import (
    Derivation,
    DerivationError,
    DerivationOutput,
    check_derivation_outputs,
    expected_output_paths,
    hash_derivation_modulo,
    parse_derivation,
    read_derivation,
    unparse_derivation,
)
from guixsvc.store.paths import StoreDir

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Nix

GNU = StoreDir("/gnu/store")

SPEC_DRV = (
    b'Derive([("out","/gnu/store/b0hs05w9rzk5r6zrg7dmhjn2950lz9yz-demo","","")],[],[],'
    b'"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","demo"),'
    b'("out","/gnu/store/b0hs05w9rzk5r6zrg7dmhjn2950lz9yz-demo"),("system","x86_64-linux")])'
)
SPEC_DRV_PATH = "/gnu/store/5mr3q377sm4i7kmy0s0gai2dxxq0lkhh-demo.drv"


def no_inputs(path: str) -> Derivation:
    raise AssertionError(f"unexpected read of {path}")


def drv_store_path(store: StoreDir, name: str, text: bytes, drv: Derivation) -> str:
    refs = set(drv.input_srcs) | set(drv.input_drvs)
    return store.display(store.make_text_path(name, hashlib.sha256(text).digest(), refs))


# -- the spec example -----------------------------------------------------------------------------


def test_spec_example() -> None:
    drv = parse_derivation(SPEC_DRV)
    assert drv.outputs == {
        "out": DerivationOutput("/gnu/store/b0hs05w9rzk5r6zrg7dmhjn2950lz9yz-demo", "", "")
    }
    assert drv.input_drvs == {}
    assert drv.input_srcs == frozenset()
    assert drv.platform == "x86_64-linux"
    assert drv.builder == "/bin/sh"
    assert drv.args == ["-c", "echo hi > $out"]
    assert drv.env["name"] == "demo"
    assert not drv.is_fixed_output
    assert unparse_derivation(drv) == SPEC_DRV
    assert drv_store_path(GNU, "demo.drv", SPEC_DRV, drv) == SPEC_DRV_PATH
    drv_path = GNU.parse(SPEC_DRV_PATH)
    check_derivation_outputs(GNU, drv_path, drv, no_inputs, {})
    expected = expected_output_paths(GNU, "demo", drv, no_inputs, {})
    assert GNU.display(expected["out"]) == drv.outputs["out"].path


def test_spec_example_wrong_outputs() -> None:
    drv = parse_derivation(SPEC_DRV)
    drv_path = GNU.parse(SPEC_DRV_PATH)
    good = drv.outputs["out"].path
    bad = "/gnu/store/00000000000000000000000000000000-demo"
    wrong_path = replace(drv, outputs={"out": DerivationOutput(bad)})
    with pytest.raises(DerivationError) as info:
        check_derivation_outputs(GNU, drv_path, wrong_path, no_inputs, {})
    assert str(info.value) == (
        f"derivation `{SPEC_DRV_PATH}' has incorrect output `{bad}', should be `{good}'"
    )
    # The environment variable is checked too (the message names the output tuple's path).
    wrong_env = replace(drv, env={**drv.env, "out": bad})
    with pytest.raises(DerivationError, match="has incorrect output"):
        check_derivation_outputs(GNU, drv_path, wrong_env, no_inputs, {})
    no_env = replace(drv, env={k: v for k, v in drv.env.items() if k != "out"})
    with pytest.raises(DerivationError, match="has incorrect output"):
        check_derivation_outputs(GNU, drv_path, no_env, no_inputs, {})
    # Another store directory gives other paths.
    with pytest.raises(DerivationError):
        check_derivation_outputs(StoreDir("/nix/store"), drv_path, drv, no_inputs, {})


# -- printing -------------------------------------------------------------------------------------


def simple(**env: str) -> Derivation:
    return Derivation(
        outputs={"out": DerivationOutput("/s/o")}, platform="p", builder="/b", env=dict(env)
    )


def test_escapes() -> None:
    drv = simple(v='a"b\\c\nd\re\tf\x01g\x7fé')
    text = unparse_derivation(drv)
    assert b'("v","a\\"b\\\\c\\nd\\re\\tf\x01g\x7f\xc3\xa9")' in text
    assert parse_derivation(text) == drv


def test_nul_truncates_strings() -> None:
    drv = simple(v="abc\0def", w="\0")
    text = unparse_derivation(drv)
    assert b'("v","abc")' in text
    assert b'("w","")' in text
    assert unparse_derivation(simple(v="abc", w="")) == text
    # The hash sees the truncated text too.
    assert hash_derivation_modulo(drv, no_inputs, {}) == hash_derivation_modulo(
        simple(v="abc", w=""), no_inputs, {}
    )


def test_parse_keeps_raw_nul_and_unknown_escapes() -> None:
    text = b'Derive([],[],[],"p\x00q","/b",["\\x\\\\\\"\\n\\r\\t\\\n"],[])'
    drv = parse_derivation(text)
    assert drv.platform == "p\0q"
    assert drv.args == ['x\\"\n\r\t\n']


def test_non_utf8_bytes_survive() -> None:
    text = b'Derive([],[],[],"\xff\xfe","/b\xc3",["\xe9t\xc3\xa9"],[("k\x80","v")])'
    drv = parse_derivation(text)
    assert unparse_derivation(drv) == text
    assert drv.args == ["\udce9té"]


def test_sorting_is_bytewise() -> None:
    # "é" (c3 a9) sorts after the escaped byte 0x80 bytewise but before it by code point.
    drv = simple(**{"é": "1", "\udc80": "2", "Z": "3", "a": "4"})
    text = unparse_derivation(drv)
    assert text.index(b'"Z"') < text.index(b'"a"') < text.index(b'"\x80"') < text.index(b'"\xc3')
    drv = Derivation(
        outputs={"b": DerivationOutput("/o/b"), "a": DerivationOutput("/o/a")},
        input_drvs={"/z.drv": frozenset({"y", "x"}), "/a.drv": frozenset({"out"})},
        input_srcs=frozenset({"/src/b", "/src/a"}),
        platform="p",
        builder="/b",
        args=["z", "a"],  # arguments keep their order
    )
    assert unparse_derivation(drv) == (
        b'Derive([("a","/o/a","",""),("b","/o/b","","")],[("/a.drv",["out"]),'
        b'("/z.drv",["x","y"])],["/src/a","/src/b"],"p","/b",["z","a"],[])'
    )


# -- parsing errors and upstream leniency ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "expected string `Derive(['"),
        (b"Derive(", "expected string `Derive(['"),
        (b'Derive([("out","relative","","")],[],[],"p","/b",[],[])',
         "bad path `relative' in derivation"),
        (b'Derive([("out","","","")],[],[],"p","/b",[],[])', "bad path `' in derivation"),
        (b'Derive([],[],["x"],"p","/b",[],[])', "bad path `x' in derivation"),
        (b'Derive([],[("y.drv",["out"])],[],"p","/b",[],[])', "bad path `y.drv' in derivation"),
        (b'Derive([],[],[],"p","/b",[],[]', "expected string `)'"),
        (b'Derive([],[],[],"p","/b",[],[("a")])', "expected string `,'"),
        (b'Derive([],[],[],p,"/b",[],[])', "expected string `\"'"),
        (b'Derive([],[],[],"p', "unexpected end of derivation inside a string"),
        (b'Derive([],[],[],"p\\', "unexpected end of derivation inside a string"),
        (b"Derive([],[],[],", "expected string `\"'"),
    ],
)  # fmt: skip
def test_parse_errors(text: bytes, message: str) -> None:
    with pytest.raises(DerivationError) as info:
        parse_derivation(text)
    assert str(info.value) == message
    with pytest.raises(DerivationError) as info:
        parse_derivation(text, "/gnu/store/x-y.drv")
    assert str(info.value) == f"error parsing derivation `/gnu/store/x-y.drv': {message}"


def test_upstream_leniency() -> None:
    # endOfList only looks for `,` and `]`: a missing separator is accepted.
    drv = parse_derivation(b'Derive([],[],[],"p","/b",["a""b","c"],[])')
    assert drv.args == ["a", "b", "c"]
    # Data after the closing parenthesis is ignored; later duplicates win.
    drv = parse_derivation(b'Derive([],[],[],"p","/b",[],[("k","1"),("k","2")])trailing')
    assert drv.env == {"k": "2"}


def test_read_derivation(tmp_path: Path) -> None:
    f = tmp_path / "x.drv"
    f.write_bytes(SPEC_DRV)
    assert read_derivation(str(f)) == parse_derivation(SPEC_DRV)
    f.write_bytes(b"junk")
    with pytest.raises(DerivationError, match=rf"^error parsing derivation `{f}': expected"):
        read_derivation(str(f))


# -- round trips ----------------------------------------------------------------------------------

strings = (
    st.binary(max_size=20)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
paths = strings.map(lambda s: "/" + s)
outputs = st.builds(DerivationOutput, paths, strings, strings)
derivations = st.builds(
    Derivation,
    outputs=st.dictionaries(strings, outputs, max_size=4),
    input_drvs=st.dictionaries(paths, st.frozensets(strings, max_size=3), max_size=4),
    input_srcs=st.frozensets(paths, max_size=4),
    platform=strings,
    builder=strings,
    args=st.lists(strings, max_size=5),
    env=st.dictionaries(strings, strings, max_size=6),
)


@given(derivations)
def test_unparse_parse_round_trip(drv: Derivation) -> None:
    text = unparse_derivation(drv)
    parsed = parse_derivation(text)
    assert parsed == drv
    assert unparse_derivation(parsed) == text


@given(st.binary(max_size=200))
def test_parse_random_bytes_fails_cleanly(data: bytes) -> None:
    with contextlib.suppress(DerivationError):
        parse_derivation(b"Derive([" + data)


# -- hashDerivationModulo -------------------------------------------------------------------------

FIXED_HASH = hashlib.sha256(b"hello").hexdigest()


def fixed_drv(builder: str = "/bin/fetch", algo: str = "sha256") -> Derivation:
    out = "/gnu/store/" + "1" * 32 + "-src"
    return Derivation(
        outputs={"out": DerivationOutput(out, algo, FIXED_HASH)},
        platform="x86_64-linux",
        builder=builder,
        env={"out": out},
    )


def test_fixed_output_hash() -> None:
    drv = fixed_drv(algo="r:sha256")
    assert drv.is_fixed_output
    expected = hashlib.sha256(
        f"fixed:out:r:sha256:{FIXED_HASH}:/gnu/store/{'1' * 32}-src".encode()
    ).digest()
    assert hash_derivation_modulo(drv, no_inputs, {}) == expected
    # Not fixed: two outputs, or a hashed output not called `out`.
    two = replace(drv, outputs={**drv.outputs, "doc": DerivationOutput("/x")})
    assert not two.is_fixed_output
    other = replace(drv, outputs={"bin": drv.outputs["out"]})
    assert not other.is_fixed_output


def test_fixed_output_paths() -> None:
    for algo, recursive in (("sha256", False), ("r:sha256", True), ("r:sha1", True)):
        digest_hex = hashlib.new(algo.removeprefix("r:"), b"x").hexdigest()
        drv = Derivation(outputs={"out": DerivationOutput("/unused", algo, digest_hex)})
        got = expected_output_paths(GNU, "src", drv, no_inputs, {})
        want = GNU.make_fixed_output_path(
            recursive, algo.removeprefix("r:"), bytes.fromhex(digest_hex), "src"
        )
        assert got == {"out": want}
    bad_algo = Derivation(outputs={"out": DerivationOutput("/o", "sha42", "00")})
    with pytest.raises(DerivationError, match=r"^unknown hash algorithm `sha42'$"):
        expected_output_paths(GNU, "src", bad_algo, no_inputs, {})
    bad_hash = Derivation(outputs={"out": DerivationOutput("/o", "sha256", "zz")})
    with pytest.raises(DerivationError, match=r"^invalid hash `zz'$"):
        expected_output_paths(GNU, "src", bad_hash, no_inputs, {})


def graph(fixed_builder: str = "/bin/fetch", mid_builder: str = "/bin/sh") -> dict[str, Derivation]:
    mid = Derivation(
        outputs={"out": DerivationOutput("/gnu/store/m-mid"), "lib": DerivationOutput("/l")},
        input_drvs={"/gnu/store/f-src.drv": frozenset({"out"})},
        platform="x86_64-linux",
        builder=mid_builder,
    )
    return {"/gnu/store/f-src.drv": fixed_drv(fixed_builder), "/gnu/store/m-mid.drv": mid}


def top_drv() -> Derivation:
    return Derivation(
        outputs={"out": DerivationOutput("")},
        input_drvs={
            "/gnu/store/m-mid.drv": frozenset({"lib"}),
            "/gnu/store/f-src.drv": frozenset({"out"}),
        },
        platform="x86_64-linux",
        builder="/bin/sh",
    )


def test_hash_modulo_replaces_inputs_by_their_hashes() -> None:
    drvs = graph()
    calls: list[str] = []

    def read(path: str) -> Derivation:
        calls.append(path)
        return drvs[path]

    cache: dict[str, bytes] = {}
    h = hash_derivation_modulo(top_drv(), read, cache)
    assert sorted(calls) == sorted(drvs)  # each input read once
    fixed_h = hash_derivation_modulo(drvs["/gnu/store/f-src.drv"], no_inputs, {})
    mid_masked = replace(
        drvs["/gnu/store/m-mid.drv"], input_drvs={fixed_h.hex(): frozenset({"out"})}
    )
    mid_h = hashlib.sha256(unparse_derivation(mid_masked)).digest()
    assert cache == {"/gnu/store/f-src.drv": fixed_h, "/gnu/store/m-mid.drv": mid_h}
    top_masked = replace(
        top_drv(),
        input_drvs={fixed_h.hex(): frozenset({"out"}), mid_h.hex(): frozenset({"lib"})},
    )
    assert h == hashlib.sha256(unparse_derivation(top_masked)).digest()
    # Cached: a second computation reads nothing.
    assert hash_derivation_modulo(top_drv(), no_inputs, cache) == h


def test_hash_modulo_ignores_how_fixed_outputs_are_built() -> None:
    h1 = hash_derivation_modulo(top_drv(), graph().__getitem__, {})
    h2 = hash_derivation_modulo(top_drv(), graph(fixed_builder="/bin/other").__getitem__, {})
    h3 = hash_derivation_modulo(top_drv(), graph(mid_builder="/bin/bash").__getitem__, {})
    assert h1 == h2
    assert h1 != h3


def test_hash_modulo_detects_cycles() -> None:
    a = Derivation(
        input_drvs={"/b.drv": frozenset({"out"})}, outputs={"out": DerivationOutput("/x")}
    )
    b = Derivation(
        input_drvs={"/a.drv": frozenset({"out"})}, outputs={"out": DerivationOutput("/y")}
    )
    with pytest.raises(DerivationError, match="depends on itself"):
        hash_derivation_modulo(a, {"/a.drv": a, "/b.drv": b}.__getitem__, {})


def test_hash_modulo_deep_chain() -> None:
    drvs: dict[str, Derivation] = {}
    prev: str | None = None
    for i in range(3000):  # deeper than Python's recursion limit
        inputs = {prev: frozenset({"out"})} if prev else {}
        drvs[f"/d{i}.drv"] = Derivation(input_drvs=inputs, outputs={"out": DerivationOutput("/o")})
        prev = f"/d{i}.drv"
    top = Derivation(input_drvs={prev: frozenset({"out"})})
    cache: dict[str, bytes] = {}
    hash_derivation_modulo(top, drvs.__getitem__, cache)
    assert len(cache) == 3000


def test_check_rejects_non_drv_path() -> None:
    drv = parse_derivation(SPEC_DRV)
    with pytest.raises(DerivationError, match="is not a derivation"):
        check_derivation_outputs(GNU, GNU.parse(SPEC_DRV_PATH[:-4]), drv, no_inputs, {})


# -- Nix as an oracle -----------------------------------------------------------------------------

NIX_EXPR = r"""
let
  sys = "x86_64-linux";
  fixedFlat = derivation {
    name = "fixed-flat"; system = sys; builder = "/bin/sh"; args = [ "-c" "false" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
  };
  fixedRec = derivation {
    name = "fixed-rec"; system = sys; builder = "/bin/sh"; args = [ "-c" "false" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13";
  };
  fixedSha1 = derivation {
    name = "fixed-sha1"; system = sys; builder = "/bin/sh";
    outputHashMode = "recursive"; outputHashAlgo = "sha1";
    outputHash = "84983e441c3bd26ebaae4aa1f95129e5e54670f1";
  };
  src = builtins.toFile "build.sh" "echo building";
  multi = derivation {
    name = "multi-1.0"; system = sys; builder = "/bin/sh"; args = [ "-e" src ];
    outputs = [ "out" "doc" "dev" ];
    special = "quote\" backslash\\ newline\n tab\t cr\r unicode é dollar \${x} ctrl ";
    deps = [ fixedFlat ];
  };
  top = derivation {
    name = "top"; system = sys; builder = "${multi}/bin/sh";
    args = [ "${multi.dev}/include" fixedRec fixedSha1 ];
    docs = multi.doc;
    "weird name" = "x";
  };
in top
"""


def test_nix_instantiated_derivations(nix: Nix, tmp_path: Path) -> None:
    expr_file = tmp_path / "expr.nix"
    expr_file.write_text(NIX_EXPR)
    top_path = nix.text("nix-instantiate", str(expr_file)).splitlines()[-1]
    store = StoreDir(nix.store_dir)
    seen: dict[str, Derivation] = {}
    todo = [top_path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen[p] = read_derivation(p)
        todo.extend(seen[p].input_drvs)
    assert len(seen) == 5
    kinds = {store.parse(p).name: d.is_fixed_output for p, d in seen.items()}
    assert kinds == {
        "top.drv": False,
        "multi-1.0.drv": False,
        "fixed-flat.drv": True,
        "fixed-rec.drv": True,
        "fixed-sha1.drv": True,
    }
    cache: dict[str, bytes] = {}
    for p, drv in seen.items():
        with open(p, "rb") as f:
            text = f.read()
        assert unparse_derivation(drv) == text, p
        name = store.parse(p).name
        assert drv_store_path(store, name, text, drv) == p
        check_derivation_outputs(store, store.parse(p), drv, read_derivation, cache)
    multi = next(d for p, d in seen.items() if p.endswith("-multi-1.0.drv"))
    assert "\r" in multi.env["special"] and "é" in multi.env["special"]
    assert set(multi.outputs) == {"out", "doc", "dev"}
    # A tampered output path is detected.
    top = seen[top_path]
    bad = replace(top, env={**top.env, "out": top.env["out"][:-1] + "X"})
    with pytest.raises(DerivationError, match="has incorrect output"):
        check_derivation_outputs(store, store.parse(top_path), bad, read_derivation, cache)
    assert os.path.isabs(top_path)
