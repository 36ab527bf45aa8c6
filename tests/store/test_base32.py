"""nix-base32: spec check values, an independent bit-by-bit oracle, and Nix's own converter."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guixsvc.store import base32

if TYPE_CHECKING:
    from .conftest import Nix


def spec_print_hash32(h: bytes) -> str:
    """The encoding loop exactly as written in spec store.md §3 (upstream `printHash32`)."""
    n = len(h)
    length = (8 * n - 1) // 5 + 1 if n else 0
    out = []
    for k in range(length - 1, -1, -1):
        b = 5 * k
        i, j = divmod(b, 8)
        c = h[i] >> j
        if i + 1 < n:
            c |= h[i + 1] << (8 - j)
        out.append("0123456789abcdfghijklmnpqrsvwxyz"[c & 31])
    return "".join(out)


def test_alphabet() -> None:
    assert base32.ALPHABET == "0123456789abcdfghijklmnpqrsvwxyz"
    assert len(set(base32.ALPHABET)) == 32
    assert not set("eout") & set(base32.ALPHABET)


def test_spec_check_values() -> None:
    empty = hashlib.sha256(b"").digest()
    assert base32.encode(empty) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert base32.encode(bytes(range(1, 21))) == "2h9i448h1w70s30b184hh1q60l2060h1"
    assert base32.decode("2h9i448h1w70s30b184hh1q60l2060h1") == bytes(range(1, 21))
    # NAR hash of the spec's `hello\n` example.
    nar_hash = bytes.fromhex("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    assert base32.encode(nar_hash) == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


@pytest.mark.parametrize(
    ("nbytes", "length"), [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52), (64, 103)]
)
def test_encoded_length(nbytes: int, length: int) -> None:
    assert base32.encoded_length(nbytes) == length
    assert len(base32.encode(bytes(nbytes))) == length


@pytest.mark.parametrize(
    "text",
    [
        "e" * 32,  # letters outside the alphabet
        "o" + "0" * 31,
        "u" + "0" * 31,
        "t" + "0" * 31,
        "A" + "0" * 31,  # upper case
        "0" * 31 + " ",
        "0",  # no byte count encodes to one character
        "000",  # nor three
        "0" * 6,  # nor six
    ],
)
def test_decode_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid base-32 hash '"):
        base32.decode(text)
    assert not base32.is_valid(text)


def test_decode_drops_overflow_bits_like_upstream() -> None:
    # 52 digits hold 260 bits; parseHash32 drops the 4 bits beyond 256 without complaint.
    rest = "mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert base32.decode("z" + rest) == base32.decode("1" + rest)
    assert base32.decode("0" + rest) == hashlib.sha256(b"").digest()


@given(st.binary(max_size=200))
def test_matches_spec_algorithm(data: bytes) -> None:
    assert base32.encode(data) == spec_print_hash32(data)


@given(st.binary(max_size=200))
def test_round_trip(data: bytes) -> None:
    text = base32.encode(data)
    assert base32.is_valid(text)
    assert base32.decode(text) == data


@given(st.text(alphabet=base32.ALPHABET, max_size=120))
def test_decode_encode_canonical(text: str) -> None:
    if not base32.is_valid(text):
        with pytest.raises(ValueError):
            base32.decode(text)
        return
    data = base32.decode(text)
    # Re-encoding gives the input unless the first digit carried dropped overflow bits.
    spare = 5 * len(text) - 8 * len(data)
    top = base32.ALPHABET.index(text[0]) if text else 0
    if top >> (5 - spare) == 0:
        assert base32.encode(data) == text


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
def test_against_nix_hash(nix: Nix, algo: str) -> None:
    for i in range(4):
        digest = hashlib.new(algo, b"guixsvc %d" % i).digest()
        theirs = nix.text("nix-hash", "--type", algo, "--to-base32", digest.hex())
        assert base32.encode(digest) == theirs
        back = nix.text("nix-hash", "--type", algo, "--to-base16", theirs)
        assert base32.decode(theirs).hex() == back
