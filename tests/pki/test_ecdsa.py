"""ECDSA on the Ed25519 curve: the spec's vector, and byte-identity with libgcrypt."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guixsvc.pki import ecdsa, sexp

from . import gcrypt, needs_gcrypt

# substitutes.md section 6.5 (public test material).
VECTOR_D = 0x474189E50BC895EF462F3ADB0FA410E9653871691C34213B26FE1443A31F4298
VECTOR_Q = bytes.fromhex("2E458669F1DBD153A8822B82D317042EC2804A69A684FFDC9ECCA8709BAE51C4")
VECTOR_DIGEST = bytes.fromhex("5891B5B522D5DF086D0FF0B110FBD9D21BB4FC7163AF34D08286A2E846F6BE03")
VECTOR_R = 0x04FA66F4F68C8157C7C1E0489323670372B4EE312FAFFFF8F870F00A96C2E3ED
VECTOR_S = 0x0E70080882B485AFCE639267DB5FB4FFA1C5F643BF0256F5D7A0C21483C7BD00

# The Signature of the substitutes.md section 5.4 narinfo (same key).
NARINFO_SIG_B64 = (
    "KHNpZ25hdHVyZSAKIChkYXRhIAogIChmbGFncyByZmM2OTc5KQogIChoYXNoIHNoYTI1NiAjMDVBMkI1RDRB"
    "OERFNzZGMjAzNDZBMkY3RUEyREQ4RjUyNkNENEUxODNGNTRFMDk1QkQ1NkUwQzZDODFERkEwNiMpCiAgKQog"
    "KHNpZy12YWwgCiAgKGVjZHNhIAogICAociAjQzYzNTRGRUQwNEY1RkZENjkzNTcwODFDRkVFRjVCRTA1MzI1"
    "NzY2NjFBNDQxRkUzN0Q1MDlGM0Y3MjQxMjcjKQogICAocyAjMDhGNDQ1MTlCNEYyQzRCQ0ZBQUFFMEQ5NkUy"
    "OTYzQjdDRjYwNjQ3RUZDNThERDZDNDkwOUM3OTlDNDREN0ExNyMpCiAgICkKICApCiAocHVibGljLWtleSAK"
    "ICAoZWNjIAogICAoY3VydmUgRWQyNTUxOSkKICAgKHEgIzJFNDU4NjY5RjFEQkQxNTNBODgyMkI4MkQzMTcw"
    "NDJFQzI4MDRBNjlBNjg0RkZEQzlFQ0NBODcwOUJBRTUxQzQjKQogICApCiAgKQogKQo="
)
NARINFO_DIGEST = bytes.fromhex("05a2b5d4a8de76f20346a2f7ea2dd8f526cd4e183f54e095bd56e0c6c81dfa06")


def test_spec_vector() -> None:
    assert hashlib.sha256(b"hello\n").digest() == VECTOR_DIGEST
    assert ecdsa.public_key(VECTOR_D) == VECTOR_Q
    assert ecdsa.sign(VECTOR_D, VECTOR_DIGEST) == (VECTOR_R, VECTOR_S)
    assert ecdsa.verify(VECTOR_Q, VECTOR_DIGEST, VECTOR_R, VECTOR_S)


def test_spec_vector_tampering_refused() -> None:
    bad_digest = bytes([VECTOR_DIGEST[0] ^ 1]) + VECTOR_DIGEST[1:]
    assert not ecdsa.verify(VECTOR_Q, bad_digest, VECTOR_R, VECTOR_S)
    assert not ecdsa.verify(VECTOR_Q, VECTOR_DIGEST, VECTOR_R + 1, VECTOR_S)
    assert not ecdsa.verify(VECTOR_Q, VECTOR_DIGEST, VECTOR_R, VECTOR_S + 1)
    other_q = ecdsa.public_key(VECTOR_D + 8)
    assert not ecdsa.verify(other_q, VECTOR_DIGEST, VECTOR_R, VECTOR_S)
    # Out-of-range values and a q that is not on the curve.
    assert not ecdsa.verify(VECTOR_Q, VECTOR_DIGEST, 0, VECTOR_S)
    assert not ecdsa.verify(VECTOR_Q, VECTOR_DIGEST, VECTOR_R, ecdsa.ORDER)
    assert not ecdsa.verify(VECTOR_Q, VECTOR_DIGEST, VECTOR_R + ecdsa.ORDER, VECTOR_S)
    assert not ecdsa.verify(b"\x02" + b"\x00" * 31, VECTOR_DIGEST, VECTOR_R, VECTOR_S)
    assert not ecdsa.verify(b"\x00" * 31, VECTOR_DIGEST, VECTOR_R, VECTOR_S)


def test_not_eddsa() -> None:
    """An RFC 8032 implementation must not be what we do: the same key interpreted as an
    EdDSA seed gives another public key."""
    seed_hash = hashlib.sha512(VECTOR_D.to_bytes(32, "big")).digest()
    a = int.from_bytes(seed_hash[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    assert ecdsa.public_key(a) != VECTOR_Q


def test_spec_narinfo_signature() -> None:
    text = base64.b64decode(NARINFO_SIG_B64)
    value = sexp.parse(text)
    assert sexp.to_advanced(value) == text
    data = sexp.find_token(value, b"data")
    assert data is not None and sexp.nth_data(sexp.find_token(data, b"hash") or (), 2) == (
        NARINFO_DIGEST
    )
    r = sexp.nth_data(sexp.find_token(value, b"r") or (), 1)
    s = sexp.nth_data(sexp.find_token(value, b"s") or (), 1)
    assert r is not None and s is not None
    assert len(r) == 31  # leading zero byte stripped, no sign byte
    assert ecdsa.verify(
        VECTOR_Q, NARINFO_DIGEST, int.from_bytes(r, "big"), int.from_bytes(s, "big")
    )
    assert ecdsa.sign(VECTOR_D, NARINFO_DIGEST) == (
        int.from_bytes(r, "big"),
        int.from_bytes(s, "big"),
    )


def test_point_encoding_round_trip() -> None:
    for d in (1, 2, 3, VECTOR_D, ecdsa.ORDER - 1):
        q = ecdsa.public_key(d)
        x, y = ecdsa.decode_point(q)
        assert ecdsa.encode_point(x, y) == q
        uncompressed = b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")
        assert ecdsa.decode_point(uncompressed) == (x, y)
        assert ecdsa.decode_point(b"\x40" + q) == (x, y)
    # The base point's standard encoding.
    assert ecdsa.public_key(1).hex() == (
        "5866666666666666666666666666666666666666666666666666666666666666"
    )
    with pytest.raises(ecdsa.InvalidPoint):
        ecdsa.decode_point(b"\x04" + b"\x01" * 64)
    with pytest.raises(ecdsa.InvalidPoint):
        ecdsa.decode_point(b"\xff" * 32)  # y >= p


def test_scalar_reduction() -> None:
    """d and d + n name the same point (libgcrypt's d is usually above n)."""
    assert ecdsa.public_key(VECTOR_D) == ecdsa.public_key(VECTOR_D % ecdsa.ORDER)
    assert ecdsa.public_key(ecdsa.ORDER) == ecdsa.encode_point(0, 1)


def test_generate_secret_matches_libgcrypt_pattern() -> None:
    for _ in range(20):
        d = ecdsa.generate_secret()
        assert d >> 255 == 0 and (d >> 254) & 1 == 1 and d & 7 == 0
        q = ecdsa.public_key(d)
        digest = hashlib.sha256(q).digest()
        assert ecdsa.verify(q, digest, *ecdsa.sign(d, digest))


def test_message_representative() -> None:
    assert ecdsa.message_representative(b"\xff" * 32) == (1 << 253) - 1
    assert ecdsa.message_representative(b"\x01" * 20) == int.from_bytes(b"\x01" * 20, "big")


def test_rfc6979_rejects_mismatched_digest() -> None:
    with pytest.raises(ValueError):
        next(ecdsa.rfc6979_nonces(VECTOR_D, b"\x00" * 20, "sha256"))
    with pytest.raises(ValueError):
        next(ecdsa.rfc6979_nonces(VECTOR_D, b"\x00" * 32, "md4"))


# --- against libgcrypt ----------------------------------------------------------------------

_HEX = re.compile(rb"\((\w) #([0-9A-F]+)#\)")


def _params(text: bytes) -> dict[bytes, bytes]:
    return {name: bytes.fromhex(value.decode()) for name, value in _HEX.findall(text)}


@needs_gcrypt
def test_public_keys_match_libgcrypt() -> None:
    for d, q in _oracle_keys():
        assert ecdsa.public_key(d) == q
        assert d >> 255 == 0 and (d >> 254) & 1 and d & 7 == 0  # libgcrypt's pattern


def _secret_text(d: int, q: bytes) -> bytes:
    return b"(private-key (ecc (curve Ed25519) (q #%s#) (d #%s#)))" % (
        q.hex().encode(),
        d.to_bytes(32, "big").hex().encode(),
    )


def _public_text(q: bytes) -> bytes:
    return b"(public-key (ecc (curve Ed25519) (q #%s#)))" % q.hex().encode()


@needs_gcrypt
@given(
    st.integers(min_value=0, max_value=7),
    st.binary(min_size=32, max_size=32),
    st.sampled_from(["sha256", "sha512", "sha1"]),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_signatures_identical_to_libgcrypt(index: int, seed: bytes, algo: str) -> None:
    oracle = gcrypt()
    assert oracle is not None
    keys = [*_oracle_keys()[:6], *_EXTRA_KEYS]
    d, q = keys[index]
    digest = hashlib.new(algo, seed).digest()
    data = b"(data (flags rfc6979) (hash %s #%s#))" % (algo.encode(), digest.hex().encode())
    expected = _params(oracle.sign(data, _secret_text(d, q)))
    r, s = ecdsa.sign(d, digest, algo)
    assert (r, s) == (int.from_bytes(expected[b"r"], "big"), int.from_bytes(expected[b"s"], "big"))
    assert ecdsa.verify(q, digest, r, s)
    sig_val = b"(sig-val (ecdsa (r #%064X#) (s #%064X#)))" % (r, s)
    assert oracle.verify(sig_val, data, _public_text(q))
    # Tampering is refused by both.
    bad = b"(sig-val (ecdsa (r #%064X#) (s #%064X#)))" % (r, (s + 1) % ecdsa.ORDER)
    assert not oracle.verify(bad, data, _public_text(q))
    assert not ecdsa.verify(q, digest, r, (s + 1) % ecdsa.ORDER)


_KEYS: list[tuple[int, bytes]] = []
# Scalars libgcrypt would not generate but accepts: small, and below n.
_EXTRA_KEYS = [
    (12345, ecdsa.public_key(12345)),
    (ecdsa.ORDER - 2, ecdsa.public_key(ecdsa.ORDER - 2)),
]


def _oracle_keys() -> list[tuple[int, bytes]]:
    """Key pairs generated by libgcrypt: (d, q)."""
    if not _KEYS:
        oracle = gcrypt()
        assert oracle is not None
        for _ in range(6):
            _pub, sec = oracle.genkey(b"(genkey (ecdsa (curve Ed25519) (flags rfc6979)))")
            p = _params(sec)
            _KEYS.append((int.from_bytes(p[b"d"], "big"), p[b"q"]))
    return _KEYS


@needs_gcrypt
def test_our_keys_work_in_libgcrypt() -> None:
    oracle = gcrypt()
    assert oracle is not None
    d = ecdsa.generate_secret()
    q = ecdsa.public_key(d)
    digest = hashlib.sha256(b"payload").digest()
    data = b"(data (flags rfc6979) (hash sha256 #%s#))" % digest.hex().encode()
    expected = _params(oracle.sign(data, _secret_text(d, q)))
    assert ecdsa.sign(d, digest) == (
        int.from_bytes(expected[b"r"], "big"),
        int.from_bytes(expected[b"s"], "big"),
    )
    # libgcrypt computes q itself when the key lacks it: same point.
    no_q = b"(private-key (ecc (curve Ed25519) (d #%064X#)))" % d
    assert _params(oracle.sign(data, no_q)) == expected


@needs_gcrypt
def test_random_nonce_signatures_verify() -> None:
    """libgcrypt without the rfc6979 flag draws a random k; such signatures verify too.
    (A 31-byte value, so that no truncation question arises for raw data.)"""
    oracle = gcrypt()
    assert oracle is not None
    d, q = _oracle_keys()[0]
    value = hashlib.sha256(b"random k").digest()[:31]
    data = b"(data (flags raw) (value #%s#))" % value.hex().encode()
    seen = set()
    for _ in range(3):
        p = _params(oracle.sign(data, _secret_text(d, q)))
        r, s = int.from_bytes(p[b"r"], "big"), int.from_bytes(p[b"s"], "big")
        seen.add(r)
        assert ecdsa.verify(q, value, r, s)
        assert not ecdsa.verify(q, value, r, (s + 1) % ecdsa.ORDER)
    assert len(seen) == 3  # really random nonces
