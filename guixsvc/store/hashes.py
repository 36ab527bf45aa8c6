"""Hash algorithms by their upstream names, and the textual hash forms the store uses.

The daemon names algorithms as libgcrypt/Guix do (`sha256`, `blake2s-256`, ...), prints hashes
in base16 (database, path pre-images, derivations) or nix-base32 (store paths, narinfos), and
folds SHA-256 digests to 160 bits for store paths (`compressHash`).  Upstream:
`nix/libutil/hash.cc`; spec store.md §3.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from guixsvc.store import base32

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "ALGORITHMS",
    "InvalidHash",
    "UnknownHashType",
    "compress_hash",
    "digest_size",
    "format_hash",
    "hash_bytes",
    "new_hasher",
    "parse_base16",
    "parse_db_hash",
    "parse_hash",
    "print_hash16or32",
]

# Upstream name -> hashlib constructor name.
_HASHLIB_NAMES: dict[str, str] = {
    "md5": "md5",
    "sha1": "sha1",
    "sha256": "sha256",
    "sha512": "sha512",
    "sha3-256": "sha3_256",
    "sha3-512": "sha3_512",
    "blake2s-256": "blake2s",  # BLAKE2s with its default (and maximal) 32-byte digest
}

_DIGEST_SIZES: dict[str, int] = {
    "md5": 16,
    "sha1": 20,
    "sha256": 32,
    "sha512": 64,
    "sha3-256": 32,
    "sha3-512": 64,
    "blake2s-256": 32,
}

ALGORITHMS: frozenset[str] = frozenset(_HASHLIB_NAMES)

# `isxdigit`: upstream's parseHash accepts upper-case hex digits too.
_HEX = re.compile(r"[0-9a-fA-F]*")


class UnknownHashType(ValueError):
    """An algorithm name that upstream's `parseHashType` does not know."""

    def __init__(self, algo: str, context: str = "") -> None:
        super().__init__(f"unknown hash type `{algo}'{context}")
        self.algo = algo


class InvalidHash(ValueError):
    """A textual hash that does not parse (upstream messages)."""


def _check(algo: str) -> str:
    try:
        return _HASHLIB_NAMES[algo]
    except KeyError:
        raise UnknownHashType(algo) from None


def new_hasher(algo: str) -> _Hash:
    """A fresh hashlib object for upstream algorithm name `algo`."""
    return hashlib.new(_check(algo))


def hash_bytes(algo: str, data: bytes) -> bytes:
    """Digest of `data` with algorithm `algo` (upstream `hashString`)."""
    return hashlib.new(_check(algo), data).digest()


def digest_size(algo: str) -> int:
    """Digest length in bytes of `algo`."""
    _check(algo)
    return _DIGEST_SIZES[algo]


def compress_hash(digest: bytes, size: int = 20) -> bytes:
    """XOR-fold `digest` into `size` bytes (upstream `compressHash`)."""
    out = bytearray(size)
    for i, byte in enumerate(digest):
        out[i % size] ^= byte
    return bytes(out)


def parse_base16(algo: str, text: str) -> bytes:
    """Parse a base16 hash of algorithm `algo` (upstream `parseHash`; hex only)."""
    size = digest_size(algo)
    if len(text) != 2 * size or _HEX.fullmatch(text) is None:
        raise InvalidHash(f"invalid hash `{text}'")
    return bytes.fromhex(text)


def parse_hash(algo: str, text: str) -> bytes:
    """Parse base16 or nix-base32 `text` depending on its length (`parseHash16or32`)."""
    size = digest_size(algo)
    if len(text) == 2 * size:
        return parse_base16(algo, text)
    if len(text) == base32.encoded_length(size):
        try:
            return base32.decode(text)
        except ValueError as exc:
            raise InvalidHash(str(exc)) from None
    raise InvalidHash(f"hash `{text}' has wrong length for hash type `{algo}'")


def print_hash16or32(algo: str, digest: bytes) -> str:
    """base16 for MD5, nix-base32 otherwise (upstream `printHash16or32`)."""
    _check(algo)
    return digest.hex() if algo == "md5" else base32.encode(digest)


def format_hash(algo: str, digest: bytes) -> str:
    """The database form `algo:<base16>` (e.g. `sha256:<64 hex digits>`)."""
    _check(algo)
    return f"{algo}:{digest.hex()}"


def parse_db_hash(text: str, path: str | None = None) -> tuple[str, bytes]:
    """Parse the database form `algo:<base16>` (upstream `parseHashField`).

    `path`, if given, is named in the error messages like upstream does.
    """
    suffix = "" if path is None else f" in valid-path entry for `{path}'"
    algo, colon, rest = text.partition(":")
    if not colon:
        raise InvalidHash(f"corrupt hash `{text}'{suffix}")
    if algo not in _HASHLIB_NAMES:
        raise UnknownHashType(algo, suffix)
    return algo, parse_base16(algo, rest)
