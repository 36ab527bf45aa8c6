"""Hash names, hashers, compressHash and the textual hash forms."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guixsvc.store import base32, hashes

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Nix

# Published test vectors (FIPS 180/202, RFC 1321, RFC 7693) for "abc".
ABC = {
    "md5": "900150983cd24fb0d6963f7d28e17f72",
    "sha1": "a9993e364706816aba3e25717850c26c9cd0d89d",
    "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    "sha512": "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
    "sha3-256": "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
    "sha3-512": "b751850b1a57168a5693cd924b6b096e08f621827444f70d884f5d0240d2712e"
    "10e116e9192af3c91a7ec57647e3934057340b4cf408d5a56592f8274eec53f0",
    "blake2s-256": "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982",
}


def test_algorithms() -> None:
    assert frozenset(ABC) == hashes.ALGORITHMS


@pytest.mark.parametrize("algo", sorted(ABC))
def test_known_vectors(algo: str) -> None:
    h = hashes.new_hasher(algo)
    h.update(b"a")
    h.update(b"bc")
    assert h.hexdigest() == ABC[algo]
    assert hashes.hash_bytes(algo, b"abc").hex() == ABC[algo]
    assert hashes.digest_size(algo) == len(ABC[algo]) // 2


@pytest.mark.parametrize("name", ["sha224", "SHA256", "blake2b", "", "sha-256"])
def test_unknown_hash_type(name: str) -> None:
    for call in (hashes.new_hasher, hashes.digest_size):
        with pytest.raises(hashes.UnknownHashType) as info:
            call(name)
        assert str(info.value) == f"unknown hash type `{name}'"
        assert isinstance(info.value, ValueError)


def spec_compress(h: bytes, size: int) -> bytes:
    out = [0] * size
    for i, b in enumerate(h):
        out[i % size] ^= b
    return bytes(out)


@given(st.binary(max_size=100), st.integers(1, 40))
def test_compress_hash(data: bytes, size: int) -> None:
    assert hashes.compress_hash(data, size) == spec_compress(data, size)


def test_compress_hash_example() -> None:
    h = bytes(range(32))
    # bytes 20..31 fold onto 0..11
    expected = bytes([i ^ (i + 20) for i in range(12)] + list(range(12, 20)))
    assert hashes.compress_hash(h) == expected
    assert hashes.compress_hash(h, 32) == h


def test_parse_hash_both_forms() -> None:
    d = hashlib.sha256(b"x").digest()
    assert hashes.parse_hash("sha256", d.hex()) == d
    assert hashes.parse_hash("sha256", d.hex().upper()) == d  # isxdigit accepts upper case
    assert hashes.parse_hash("sha256", base32.encode(d)) == d
    md5 = hashlib.md5(b"x").digest()
    assert hashes.parse_hash("md5", base32.encode(md5)) == md5
    assert hashes.parse_base16("md5", md5.hex()) == md5


def test_parse_hash_errors() -> None:
    with pytest.raises(
        hashes.InvalidHash,
        match=r"^hash `abc' has wrong length for hash type"
        r" `sha256'$",
    ):
        hashes.parse_hash("sha256", "abc")
    bad16 = "g" + "0" * 63
    with pytest.raises(hashes.InvalidHash, match=rf"^invalid hash `{bad16}'$"):
        hashes.parse_hash("sha256", bad16)
    with pytest.raises(hashes.InvalidHash, match=r"^invalid hash ` 0"):
        hashes.parse_base16("sha1", " 0" + "0" * 38)  # bytes.fromhex would skip the space
    bad32 = "e" * 52
    with pytest.raises(hashes.InvalidHash, match=rf"^invalid base-32 hash '{bad32}'$"):
        hashes.parse_hash("sha256", bad32)
    with pytest.raises(hashes.InvalidHash):
        hashes.parse_base16("sha256", base32.encode(bytes(32)))  # base16 only
    with pytest.raises(hashes.UnknownHashType):
        hashes.parse_hash("sha42", "00")


def test_print_hash16or32() -> None:
    md5 = hashlib.md5(b"").digest()
    sha1 = hashlib.sha1(b"").digest()
    assert hashes.print_hash16or32("md5", md5) == md5.hex()
    assert hashes.print_hash16or32("sha1", sha1) == base32.encode(sha1)


def test_db_hash() -> None:
    d = hashlib.sha256(b"").digest()
    text = hashes.format_hash("sha256", d)
    assert text == "sha256:" + d.hex()
    assert hashes.parse_db_hash(text) == ("sha256", d)
    with pytest.raises(
        hashes.InvalidHash,
        match=r"^corrupt hash `nope' in valid-path entry for"
        r" `/gnu/store/x'$",
    ):
        hashes.parse_db_hash("nope", "/gnu/store/x")
    with pytest.raises(hashes.UnknownHashType, match=r"^unknown hash type `sha42'$"):
        hashes.parse_db_hash("sha42:00")
    with pytest.raises(hashes.UnknownHashType, match=r"^unknown hash type `sha42' in valid-path"):
        hashes.parse_db_hash("sha42:00", "/p")
    with pytest.raises(hashes.InvalidHash):
        hashes.parse_db_hash("sha256:" + base32.encode(d))


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
def test_flat_hash_against_nix_hash(nix: Nix, tmp_path: Path, algo: str) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(range(256)) * 41 + b"tail")
    h = hashes.new_hasher(algo)
    h.update(f.read_bytes())
    assert nix.text("nix-hash", "--flat", "--type", algo, str(f)) == h.hexdigest()
    theirs32 = nix.text("nix-hash", "--flat", "--base32", "--type", algo, str(f))
    assert hashes.parse_hash(algo, theirs32) == h.digest()
