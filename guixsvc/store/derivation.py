"""Derivations: the ATerm `.drv` format, `hashDerivationModulo` and output path checks.

The daemon reads `.drv` files to build them and, whenever one is registered, recomputes its
output paths and refuses it if they do not match (`checkDerivationOutputs`).  The printer must
be byte-identical to upstream because the printed text is what gets hashed, quirks included
(a NUL byte ends a string).  Upstream: `nix/libstore/derivations.cc`, `parseString` in
`nix/libutil/util.cc`, `checkDerivationOutputs` in `nix/libstore/local-store.cc`; spec
store.md §6-§7.

Strings are Python `str` decoded from the file's bytes with UTF-8 and `surrogateescape`, so
arbitrary bytes survive a parse/unparse round trip; everything is sorted by its bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from guixsvc.store.hashes import UnknownHashType, digest_size, parse_base16
from guixsvc.store.paths import StoreDir, StorePath

__all__ = [
    "Derivation",
    "DerivationError",
    "DerivationOutput",
    "check_derivation_outputs",
    "expected_output_paths",
    "hash_derivation_modulo",
    "parse_derivation",
    "read_derivation",
    "unparse_derivation",
]

DRV_EXTENSION = ".drv"


class DerivationError(ValueError):
    """A derivation that does not parse, or whose outputs are wrong (upstream messages)."""


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _sorted(items: Iterable[str]) -> list[str]:
    """Bytewise order, like C++ std::set<std::string>."""
    return sorted(items, key=_enc)


@dataclass
class DerivationOutput:
    """One output: its path, and for fixed outputs `[r:]<algo>` and the base16 hash."""

    path: str
    hash_algo: str = ""
    hash: str = ""

    def parse_hash_info(self) -> tuple[bool, str, bytes]:
        """(recursive, algorithm, digest) of a fixed output (upstream `parseHashInfo`)."""
        algo = self.hash_algo
        recursive = algo.startswith("r:")
        if recursive:
            algo = algo[2:]
        try:
            digest_size(algo)
        except UnknownHashType:
            raise DerivationError(f"unknown hash algorithm `{algo}'") from None
        try:
            digest = parse_base16(algo, self.hash)
        except ValueError as exc:
            raise DerivationError(str(exc)) from None
        return recursive, algo, digest


@dataclass
class Derivation:
    """A parsed `.drv` file (upstream `Derivation`)."""

    outputs: dict[str, DerivationOutput] = field(default_factory=dict)
    input_drvs: dict[str, frozenset[str]] = field(default_factory=dict)
    input_srcs: frozenset[str] = frozenset()
    platform: str = ""
    builder: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def is_fixed_output(self) -> bool:
        """One output, named `out`, with a hash (upstream `isFixedOutputDrv`)."""
        if len(self.outputs) != 1:
            return False
        out = self.outputs.get("out")
        return out is not None and out.hash != ""

    def output_paths(self) -> frozenset[str]:
        """The paths of all outputs."""
        return frozenset(o.path for o in self.outputs.values())


# --------------------------------------------------------------------------------------------
# Printing

_NUL = b"\0"


def _quote(s: str) -> bytes:
    """`printString`: escape `"` `\\` LF CR TAB; the string ends at the first NUL."""
    b = _enc(s)
    nul = b.find(_NUL)
    if nul >= 0:
        b = b[:nul]
    if b'"' in b or b"\\" in b or b"\n" in b or b"\r" in b or b"\t" in b:
        b = (
            b.replace(b"\\", b"\\\\")
            .replace(b'"', b'\\"')
            .replace(b"\n", b"\\n")
            .replace(b"\r", b"\\r")
            .replace(b"\t", b"\\t")
        )
    return b'"' + b + b'"'


def _quote_list(items: Iterable[str]) -> bytes:
    return b"[" + b",".join([_quote(s) for s in items]) + b"]"


def unparse_derivation(drv: Derivation) -> bytes:
    """The ATerm text of `drv` (upstream `unparseDerivation`)."""
    outputs = b",".join(
        [
            b"("
            + _quote(name)
            + b","
            + _quote(out.path)
            + b","
            + _quote(out.hash_algo)
            + b","
            + _quote(out.hash)
            + b")"
            for name, out in sorted(drv.outputs.items(), key=lambda kv: _enc(kv[0]))
        ]
    )
    inputs = b",".join(
        [
            b"(" + _quote(path) + b"," + _quote_list(_sorted(outs)) + b")"
            for path, outs in sorted(drv.input_drvs.items(), key=lambda kv: _enc(kv[0]))
        ]
    )
    env = b",".join(
        [
            b"(" + _quote(k) + b"," + _quote(v) + b")"
            for k, v in sorted(drv.env.items(), key=lambda kv: _enc(kv[0]))
        ]
    )
    return b"".join(
        [
            b"Derive([",
            outputs,
            b"],[",
            inputs,
            b"],",
            _quote_list(_sorted(drv.input_srcs)),
            b",",
            _quote(drv.platform),
            b",",
            _quote(drv.builder),
            b",",
            _quote_list(drv.args),
            b",[",
            env,
            b"])",
        ]
    )


# --------------------------------------------------------------------------------------------
# Parsing

# A quoted string: runs of ordinary bytes or backslash escapes (any byte may be escaped).
_STRING = re.compile(rb'"((?:[^"\\]++|\\.)*+)"', re.DOTALL)
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
_UNESCAPE = {b"n": b"\n", b"r": b"\r", b"t": b"\t"}


def _unescape(m: re.Match[bytes]) -> bytes:
    c = m.group(1)
    return _UNESCAPE.get(c, c)


class _FormatError(Exception):
    pass


class _Parser:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def expect(self, lit: bytes) -> None:
        end = self.pos + len(lit)
        if self.data[self.pos : end] != lit:
            raise _FormatError(f"expected string `{lit.decode()}'")
        self.pos = end

    def string(self) -> str:
        m = _STRING.match(self.data, self.pos)
        if m is None:
            if self.data[self.pos : self.pos + 1] != b'"':
                raise _FormatError("expected string `\"'")
            raise _FormatError("unexpected end of derivation inside a string")
        self.pos = m.end()
        raw = m.group(1)
        if b"\\" in raw:
            raw = _ESCAPE.sub(_unescape, raw)
        return _dec(raw)

    def path(self) -> str:
        s = self.string()
        if not s.startswith("/"):
            raise _FormatError(f"bad path `{s}' in derivation")
        return s

    def end_of_list(self) -> bool:
        """Upstream `endOfList`: `,` -> more, `]` -> end, anything else -> more."""
        c = self.data[self.pos : self.pos + 1]
        if c == b",":
            self.pos += 1
            return False
        if c == b"]":
            self.pos += 1
            return True
        return False

    def strings(self, paths: bool) -> frozenset[str]:
        items = set()
        while not self.end_of_list():
            items.add(self.path() if paths else self.string())
        return frozenset(items)


def parse_derivation(data: bytes, path: str | None = None) -> Derivation:
    """Parse ATerm `.drv` text (upstream `parseDerivation`).

    Raises DerivationError; with `path` the message is upstream's
    `error parsing derivation `P': ...`.  As upstream, later duplicates win, list separators
    are parsed leniently (`endOfList`) and anything after the closing `)` is ignored.
    """
    p = _Parser(bytes(data))
    drv = Derivation()
    try:
        p.expect(b"Derive([")
        while not p.end_of_list():
            p.expect(b"(")
            name = p.string()
            p.expect(b",")
            out_path = p.path()
            p.expect(b",")
            algo = p.string()
            p.expect(b",")
            hash_ = p.string()
            p.expect(b")")
            drv.outputs[name] = DerivationOutput(out_path, algo, hash_)
        p.expect(b",[")
        while not p.end_of_list():
            p.expect(b"(")
            drv_path = p.path()
            p.expect(b",[")
            drv.input_drvs[drv_path] = p.strings(False)
            p.expect(b")")
        p.expect(b",[")
        drv.input_srcs = p.strings(True)
        p.expect(b",")
        drv.platform = p.string()
        p.expect(b",")
        drv.builder = p.string()
        p.expect(b",[")
        while not p.end_of_list():
            drv.args.append(p.string())
        p.expect(b",[")
        while not p.end_of_list():
            p.expect(b"(")
            key = p.string()
            p.expect(b",")
            value = p.string()
            p.expect(b")")
            drv.env[key] = value
        p.expect(b")")
    except _FormatError as exc:
        if path is None:
            raise DerivationError(str(exc)) from None
        raise DerivationError(f"error parsing derivation `{path}': {exc}") from None
    return drv


def read_derivation(file_name: str) -> Derivation:
    """Read and parse the `.drv` file `file_name` (upstream `readDerivation`)."""
    with open(file_name, "rb") as f:
        data = f.read()
    return parse_derivation(data, file_name)


# --------------------------------------------------------------------------------------------
# Hashing modulo fixed-output derivations


def _fixed_output_hash(drv: Derivation) -> bytes:
    out = drv.outputs["out"]
    text = b"fixed:out:" + _enc(out.hash_algo) + b":" + _enc(out.hash) + b":" + _enc(out.path)
    return hashlib.sha256(text).digest()


def _hash_with_input_hashes(drv: Derivation, cache: dict[str, bytes]) -> bytes:
    inputs: dict[str, frozenset[str]] = {}
    for p, outs in drv.input_drvs.items():
        # Distinct input .drv files always have distinct hashes, barring SHA-256 collisions.
        inputs[cache[p].hex()] = outs
    return hashlib.sha256(unparse_derivation(replace(drv, input_drvs=inputs))).digest()


def hash_derivation_modulo(
    drv: Derivation,
    read_drv: Callable[[str], Derivation],
    cache: dict[str, bytes],
) -> bytes:
    """SHA-256 of `drv` with input derivations replaced by their own hashes modulo
    fixed-output derivations (upstream `hashDerivationModulo`).

    `read_drv(path)` loads an input derivation; `cache` memoises results by .drv path (like
    upstream's per-process `drvHashes`) and is updated.  Inputs are walked without recursion.
    """
    if drv.is_fixed_output:
        return _fixed_output_hash(drv)
    _hash_inputs(drv.input_drvs, read_drv, cache)
    return _hash_with_input_hashes(drv, cache)


def _hash_inputs(
    roots: Iterable[str],
    read_drv: Callable[[str], Derivation],
    cache: dict[str, bytes],
) -> None:
    """Fill `cache` for `roots` and everything they depend on (post-order, iterative)."""
    stack = [p for p in roots if p not in cache]
    loaded: dict[str, Derivation] = {}
    active: set[str] = set()
    while stack:
        p = stack[-1]
        if p in cache:
            stack.pop()
            continue
        d = loaded.get(p)
        if d is None:
            d = read_drv(p)
            if d.is_fixed_output:
                cache[p] = _fixed_output_hash(d)
                stack.pop()
                continue
            loaded[p] = d
            active.add(p)
            missing = [q for q in d.input_drvs if q not in cache]
            for q in missing:
                if q in active:
                    raise DerivationError(f"derivation `{q}' depends on itself")
            if missing:
                stack.extend(missing)
                continue
        cache[p] = _hash_with_input_hashes(d, cache)
        del loaded[p]
        active.discard(p)
        stack.pop()


# --------------------------------------------------------------------------------------------
# Output paths


def expected_output_paths(
    store: StoreDir,
    drv_name: str,
    drv: Derivation,
    read_drv: Callable[[str], Derivation],
    cache: dict[str, bytes],
) -> dict[str, StorePath]:
    """The output paths `drv` must have, given its name without `.drv` (spec store.md §7)."""
    if drv.is_fixed_output:
        recursive, algo, digest = drv.outputs["out"].parse_hash_info()
        return {"out": store.make_fixed_output_path(recursive, algo, digest, drv_name)}
    masked = replace(
        drv,
        outputs={
            name: DerivationOutput("", o.hash_algo, o.hash) for name, o in drv.outputs.items()
        },
        env={**drv.env, **dict.fromkeys(drv.outputs, "")},
    )
    h = hash_derivation_modulo(masked, read_drv, cache)
    return {name: store.make_output_path(name, h, drv_name) for name in drv.outputs}


def check_derivation_outputs(
    store: StoreDir,
    drv_path: StorePath,
    drv: Derivation,
    read_drv: Callable[[str], Derivation],
    cache: dict[str, bytes],
) -> None:
    """Raise DerivationError unless every output path, and the environment variable of the
    same name, is the expected one (upstream `checkDerivationOutputs`)."""
    shown = store.display(drv_path)
    if not drv_path.is_derivation:
        raise DerivationError(f"`{shown}' is not a derivation")
    drv_name = drv_path.name[: -len(DRV_EXTENSION)]
    expected = expected_output_paths(store, drv_name, drv, read_drv, cache)
    for name, out in sorted(drv.outputs.items(), key=lambda kv: _enc(kv[0])):
        want = store.display(expected[name])
        if out.path != want or drv.env.get(name) != want:
            raise DerivationError(
                f"derivation `{shown}' has incorrect output `{out.path}', should be `{want}'"
            )
