"""Store paths: their syntax, and how their hash parts are computed.

Every store item is `<store>/<hash>-<name>` where `<hash>` is 32 nix-base32 characters derived
from a pre-image that names the item's type, a SHA-256 digest, the store directory and the name.
The rules must match upstream bit for bit, or the daemon and its clients disagree about where
things live (spec store.md §2 and §4; upstream `nix/libstore/store-api.cc`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from guixsvc.store import base32
from guixsvc.store.hashes import compress_hash, digest_size

__all__ = [
    "HASH_PART_LENGTH",
    "InvalidName",
    "InvalidStorePath",
    "StoreDir",
    "StorePath",
    "check_name",
]

HASH_PART_LENGTH = 32

_NAME_OK = re.compile(r"[A-Za-z0-9+\-._?=]*")
_NAME_BAD_CHAR = re.compile(r"[^A-Za-z0-9+\-._?=]")
_HASH_PART = re.compile(r"[0-9a-df-np-sv-z]{32}")


class InvalidStorePath(ValueError):
    """A string that is not a (well-formed) store path."""

    def __init__(self, path: str) -> None:
        super().__init__(f"path `{path}' is not in the store")
        self.path = path


class InvalidName(ValueError):
    """A store item name rejected by upstream's `checkStoreName`."""


def check_name(name: str) -> None:
    """Raise InvalidName unless `name` is acceptable as a store item name (`checkStoreName`).

    Names must not start with `.` and may only use `A-Z a-z 0-9 + - . _ ? =`.  Upstream also
    accepts the empty name, which makes `<hash>-`, a path no client can parse back; we refuse it.
    """
    if not name or name.startswith("."):
        raise InvalidName(f"invalid name: `{name}'")
    if _NAME_OK.fullmatch(name) is None:
        bad = _NAME_BAD_CHAR.search(name)
        assert bad is not None
        raise InvalidName(f"invalid character `{bad.group()}' in name `{name}'")


@dataclass(frozen=True, order=True, slots=True)
class StorePath:
    """A store path without its store directory: `<hash_part>-<name>`.

    Construction validates strictly (32 nix-base32 characters, valid name).  Ordering is the
    bytewise ordering of base names (the hash parts all have the same length and everything is
    ASCII, so comparing the field tuple is the same thing).
    """

    hash_part: str
    name: str

    def __post_init__(self) -> None:
        if _HASH_PART.fullmatch(self.hash_part) is None:
            raise InvalidStorePath(f"{self.hash_part}-{self.name}")
        check_name(self.name)

    @property
    def base_name(self) -> str:
        """`<hash>-<name>`, the file name of the item inside the store directory."""
        return f"{self.hash_part}-{self.name}" if self.hash_part else self.name

    @property
    def is_strict(self) -> bool:
        """False for a name accepted only by :meth:`lax` (its hash part is not nix-base32)."""
        return (
            _HASH_PART.fullmatch(self.hash_part) is not None
            and _NAME_OK.fullmatch(self.name) is not None
        )

    @classmethod
    def lax(cls, base_name: str) -> StorePath:
        """Any file name directly in the store, as upstream's `readStorePath` takes it.

        Upstream only checks that a path on the wire is directly inside the store, so
        `<store>/eeee…-foo` (not nix-base32) or a temporary `<store>/guix-XXXXXX` are store
        paths to it: valid-path? says #f, add-temp-root roots it, a database filled by a client
        may hold it.  `<hash>-<name>` keeps its two parts; any other name has an empty hash
        part.  Refused (InvalidStorePath) here, beyond upstream: the empty name, names starting
        with `.` (`.`, `..`, `.links`) and names holding `/` or NUL.
        """
        if not base_name or base_name.startswith(".") or "/" in base_name or "\0" in base_name:
            raise InvalidStorePath(base_name)
        try:
            return cls.from_base_name(base_name)
        except InvalidStorePath:
            pass
        sp = object.__new__(cls)
        if len(base_name) > HASH_PART_LENGTH and base_name[HASH_PART_LENGTH] == "-":
            hash_part, name = base_name[:HASH_PART_LENGTH], base_name[HASH_PART_LENGTH + 1 :]
        else:
            hash_part, name = "", base_name
        object.__setattr__(sp, "hash_part", hash_part)
        object.__setattr__(sp, "name", name)
        return sp

    @property
    def is_derivation(self) -> bool:
        """True for `.drv` files."""
        return self.name.endswith(".drv")

    @classmethod
    def from_base_name(cls, base_name: str) -> StorePath:
        """Parse `<hash>-<name>`; raises InvalidStorePath (also for a bad name)."""
        if len(base_name) <= HASH_PART_LENGTH or base_name[HASH_PART_LENGTH] != "-":
            raise InvalidStorePath(base_name)
        try:
            return cls(base_name[:HASH_PART_LENGTH], base_name[HASH_PART_LENGTH + 1 :])
        except InvalidName:
            raise InvalidStorePath(base_name) from None

    def __str__(self) -> str:
        return self.base_name


def _canon_dir(path: str) -> str:
    """Lexical canonicalisation like upstream `canonPath` (without resolving symlinks)."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: `{path}'")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


@dataclass(frozen=True, slots=True)
class StoreDir:
    """A store directory such as `/gnu/store` (kept canonical: absolute, no trailing slash)."""

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _canon_dir(self.path))

    # -- syntax ------------------------------------------------------------------------------

    def parse(self, s: str) -> StorePath:
        """Parse an absolute store path strictly; raises InvalidStorePath."""
        return _parse_cached(self, s)

    def _parse(self, s: str) -> StorePath:
        prefix = self.path + "/"
        if not s.startswith(prefix):
            raise InvalidStorePath(s)
        base = s[len(prefix) :]
        if "/" in base:
            raise InvalidStorePath(s)
        try:
            return StorePath.from_base_name(base)
        except InvalidStorePath:
            raise InvalidStorePath(s) from None

    def parse_lax(self, s: str) -> StorePath:
        """Parse an absolute file name directly in the store (upstream `assertStorePath`), the
        hash part unchecked (:meth:`StorePath.lax`); raises InvalidStorePath."""
        try:
            return _parse_cached(self, s)
        except InvalidStorePath:
            pass
        prefix = self.path + "/"
        if not s.startswith(prefix):
            raise InvalidStorePath(s)
        try:
            return StorePath.lax(s[len(prefix) :])
        except InvalidStorePath:
            raise InvalidStorePath(s) from None

    def display(self, sp: StorePath) -> str:
        """The absolute file name of `sp`."""
        return f"{self.path}/{sp.base_name}"

    def is_store_path(self, s: str) -> bool:
        """True if `s` parses strictly as a store path in this store."""
        try:
            self.parse(s)
        except InvalidStorePath:
            return False
        return True

    def is_in_store(self, s: str) -> bool:
        """True if `s` lies strictly below the store directory (upstream `isInStore`)."""
        prefix = self.path + "/"
        return len(s) > len(prefix) and s.startswith(prefix)

    def is_direct_store_path(self, s: str) -> bool:
        """Upstream's lax `isStorePath`: in the store with no further `/`.

        This is what the daemon's `readStorePath` checks on the wire; it does not check the
        hash part.
        """
        return self.is_in_store(s) and "/" not in s[len(self.path) + 1 :]

    def to_store_path(self, s: str) -> str:
        """The store item containing file `s` (upstream `toStorePath`)."""
        if not self.is_in_store(s):
            raise InvalidStorePath(s)
        slash = s.find("/", len(self.path) + 1)
        return s if slash == -1 else s[:slash]

    # -- computation -------------------------------------------------------------------------

    def make_store_path(self, type: str, digest: bytes, name: str) -> StorePath:
        """`makeStorePath`: `<type>:sha256:<hex digest>:<store>:<name>` hashed and folded."""
        if len(digest) != digest_size("sha256"):
            raise ValueError("make_store_path needs a SHA-256 digest")
        check_name(name)
        preimage = f"{type}:sha256:{digest.hex()}:{self.path}:{name}"
        h = hashlib.sha256(preimage.encode("utf-8", "surrogateescape")).digest()
        return StorePath(base32.encode(compress_hash(h, 20)), name)

    def make_text_path(
        self,
        name: str,
        contents_sha256: bytes,
        references: Iterable[StorePath | str] = (),
    ) -> StorePath:
        """`computeStorePathForText`: type `text` plus `:<ref>` per reference (sorted)."""
        refs = {self.display(r) if isinstance(r, StorePath) else r for r in references}
        ordered = sorted(refs, key=lambda r: r.encode("utf-8", "surrogateescape"))
        type_ = ":".join(["text", *ordered])
        return self.make_store_path(type_, contents_sha256, name)

    def make_fixed_output_path(
        self, recursive: bool, algo: str, digest: bytes, name: str
    ) -> StorePath:
        """`makeFixedOutputPath`: `source` for recursive SHA-256, else `output:out` of the
        SHA-256 of `fixed:out:[r:]<algo>:<hex>:`."""
        if len(digest) != digest_size(algo):
            raise ValueError(f"digest has the wrong size for hash type `{algo}'")
        if recursive and algo == "sha256":
            return self.make_store_path("source", digest, name)
        inner = f"fixed:out:{'r:' if recursive else ''}{algo}:{digest.hex()}:"
        return self.make_store_path("output:out", hashlib.sha256(inner.encode()).digest(), name)

    def make_output_path(self, output: str, drv_hash: bytes, drv_name: str) -> StorePath:
        """`makeOutputPath`: type `output:<id>`, name `drv_name` or `drv_name-<id>`."""
        name = drv_name if output == "out" else f"{drv_name}-{output}"
        return self.make_store_path(f"output:{output}", drv_hash, name)


#: Sessions parse the same few paths over and over (every request names one); StorePath is
#: immutable, so recent results are shared.  Failures are not cached.
_parse_cached = functools.lru_cache(maxsize=8192)(StoreDir._parse)
