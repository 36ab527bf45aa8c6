"""ECDSA over the Ed25519 curve, computed the way libgcrypt does it for Guix keys.

Guix's default signing keys come from ``(genkey (ecdsa (curve Ed25519) (flags rfc6979)))``.
Such a key carries no ``eddsa`` flag, so libgcrypt signs with plain **ECDSA on the twisted
Edwards curve** -- not RFC 8032 EdDSA, which is what ordinary Ed25519 libraries implement and
which Guix would reject.  This module does that arithmetic in pure Python so that signatures are
byte-identical to libgcrypt's (RFC 6979 nonces) and verification accepts what libgcrypt signs:

* curve ``-x^2 + y^2 = 1 + d x^2 y^2`` over ``p = 2^255 - 19``, the usual base point,
  group order ``n`` (253 bits);
* the secret ``d`` is a plain integer scalar (libgcrypt draws 256 random bits, clears bit 255,
  sets bit 254 and clears bits 0-2, so ``d > n`` is normal and is *not* reduced for RFC 6979);
* the public ``q`` is the RFC 8032-style 32-byte encoding of ``d*G``;
* ``e`` is the digest as a big-endian integer truncated to 253 bits (``>> 3`` for SHA-256);
* ``r = x(k*G) mod n`` with ``x`` the affine Edwards x coordinate, ``s = k^-1 (e + r d) mod n``.

Signing avoids secret-dependent branches (fixed-length comb over the base point, randomised
projective coordinates, Fermat inversions); Python integers are still not constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from functools import cache

__all__ = [
    "HASH_ALGORITHMS",
    "ORDER",
    "InvalidPoint",
    "decode_point",
    "encode_point",
    "generate_secret",
    "message_representative",
    "public_key",
    "rfc6979_nonces",
    "sign",
    "verify",
]

P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P
_D2 = 2 * D % P
#: Order ``n`` of the base point.
ORDER = 2**252 + 27742317777372353535851937790883648493
_QBITS = ORDER.bit_length()  # 253
_RLEN = (_QBITS + 7) // 8  # 32
_SQRT_M1 = pow(2, (P - 1) // 4, P)
GX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
GY = 46316835694926478169428394003475163141307993866256225615783033603165251855960

#: Hash names libgcrypt accepts in ``(hash NAME ...)`` mapped to hashlib names, for RFC 6979.
HASH_ALGORITHMS: dict[str, str] = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}

# Points in extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.
_Point = tuple[int, int, int, int]
# "Cached" form of a point used as the second addend: (Y-X, Y+X, 2d*T, 2Z).
_Cached = tuple[int, int, int, int]


class InvalidPoint(ValueError):
    """A public key that does not encode a point of the curve."""


def _add(p1: _Point, c2: _Cached) -> _Point:
    """Complete addition (add-2008-hwcd-3, a = -1) of a point and a cached point."""
    x1, y1, z1, t1 = p1
    ym, yp, t2d, z2 = c2
    a = (y1 - x1) * ym % P
    b = (y1 + x1) * yp % P
    c = t1 * t2d % P
    dd = z1 * z2 % P
    e = b - a
    f = dd - c
    g = dd + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p1: _Point) -> _Point:
    """Doubling (dbl-2008-hwcd, a = -1)."""
    x1, y1, z1, _ = p1
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    e = ((x1 + y1) * (x1 + y1) - a - b) % P
    g = b - a
    f = g - c
    h = -a - b
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _cached(pt: _Point) -> _Cached:
    x, y, z, t = pt
    return ((y - x) % P, (y + x) % P, t * _D2 % P, 2 * z % P)


def _affine(pt: _Point) -> tuple[int, int]:
    x, y, z, _ = pt
    zi = pow(z, P - 2, P)
    return x * zi % P, y * zi % P


def _from_affine(x: int, y: int) -> _Point:
    return (x, y, 1, x * y % P)


_IDENTITY: _Point = (0, 1, 1, 0)
_WINDOWS = 64  # 4-bit windows: covers scalars below 2^256


@cache
def _base_table() -> tuple[tuple[_Cached, ...], ...]:
    """table[i][j] = j * 16^i * G (cached form), for the fixed-base comb."""
    table = []
    base = _from_affine(GX, GY)
    for _ in range(_WINDOWS):
        row = [_cached(_IDENTITY)]
        acc = _IDENTITY
        cb = _cached(base)
        for _j in range(1, 16):
            acc = _add(acc, cb)
            row.append(_cached(acc))
        table.append(tuple(row))
        for _k in range(4):
            base = _double(base)
    return tuple(table)


def _mul_base(k: int) -> _Point:
    """k * G for 0 <= k < 2^256: always 64 additions, whatever k is."""
    table = _base_table()
    z = secrets.randbelow(P - 1) + 1  # random projective representation of the identity
    acc: _Point = (0, z, z, 0)
    for i in range(_WINDOWS):
        acc = _add(acc, table[i][(k >> (4 * i)) & 15])
    return acc


def _mul(k: int, pt: _Point) -> _Point:
    """k * pt for public data (verification): fixed 4-bit window."""
    cached = [_cached(_IDENTITY)]
    acc = _IDENTITY
    cp = _cached(pt)
    for _ in range(15):
        acc = _add(acc, cp)
        cached.append(_cached(acc))
    result = _IDENTITY
    for shift in range(4 * ((k.bit_length() + 3) // 4) - 4, -4, -4):
        for _ in range(4):
            result = _double(result)
        result = _add(result, cached[(k >> shift) & 15])
    return result


def encode_point(x: int, y: int) -> bytes:
    """RFC 8032 encoding: little-endian y, low bit of x in the top bit of the last byte."""
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _recover_x(y: int, sign: int) -> int:
    if y >= P:
        raise InvalidPoint("y coordinate out of range")
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    # x = sqrt(u/v) = u v^3 (u v^7)^((p-5)/8)
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    vx2 = v * x * x % P
    if vx2 == u:
        pass
    elif vx2 == (-u) % P:
        x = x * _SQRT_M1 % P
    else:
        raise InvalidPoint("not a point of the curve")
    if x == 0 and sign:
        raise InvalidPoint("invalid point encoding")
    if x & 1 != sign:
        x = P - x
    return x


def decode_point(data: bytes) -> tuple[int, int]:
    """Decode a public ``q`` as libgcrypt accepts it for Ed25519: the 32-byte RFC 8032 form,
    the same prefixed with 0x40, or the uncompressed ``04 || x || y`` form."""
    if len(data) == 33 and data[0] == 0x40:
        data = data[1:]
    if len(data) == 32:
        val = int.from_bytes(data, "little")
        y = val & ((1 << 255) - 1)
        return _recover_x(y, val >> 255), y
    if len(data) == 65 and data[0] == 0x04:
        x = int.from_bytes(data[1:33], "big")
        y = int.from_bytes(data[33:], "big")
        if x >= P or y >= P or (y * y - x * x - 1 - D * x * x * y * y) % P:
            raise InvalidPoint("not a point of the curve")
        return x, y
    raise InvalidPoint("invalid point encoding")


def public_key(d: int) -> bytes:
    """The encoded public point ``q = d*G`` of secret scalar ``d``."""
    return encode_point(*_affine(_mul_base(d % ORDER)))


def generate_secret() -> int:
    """A secret scalar drawn the way libgcrypt 1.10 does for Ed25519 ECDSA keys."""
    raw = bytearray(secrets.token_bytes(32))
    raw[0] = (raw[0] & 0x7F) | 0x40
    raw[31] &= 0xF8
    return int.from_bytes(raw, "big")


def message_representative(digest: bytes) -> int:
    """``e``: the digest as an integer, truncated to the 253 bits of ``n``."""
    e = int.from_bytes(digest, "big")
    excess = 8 * len(digest) - _QBITS
    return e >> excess if excess > 0 else e


def _hash_name(hash_algo: str) -> str:
    try:
        return HASH_ALGORITHMS[hash_algo.lower()]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm: {hash_algo}") from None


def rfc6979_nonces(d: int, digest: bytes, hash_algo: str = "sha256") -> Iterator[int]:
    """RFC 6979 nonce candidates as libgcrypt's ``_gcry_dsa_gen_rfc6979_k`` produces them
    (x = ``d`` unreduced, h1 = ``digest``, HMAC with ``hash_algo``)."""
    name = _hash_name(hash_algo)
    hlen = hashlib.new(name).digest_size
    if len(digest) != hlen:
        raise ValueError(f"digest length {len(digest)} does not match {hash_algo}")
    if not 0 < d < 1 << (8 * _RLEN):
        raise ValueError("secret scalar out of range")

    def mac(key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, name).digest()

    xb = d.to_bytes(_RLEN, "big")
    h1 = message_representative(digest)
    if h1 >= ORDER:
        h1 -= ORDER
    hb = h1.to_bytes(_RLEN, "big")
    v = b"\x01" * hlen
    k = b"\x00" * hlen
    k = mac(k, v + b"\x00" + xb + hb)
    v = mac(k, v)
    k = mac(k, v + b"\x01" + xb + hb)
    v = mac(k, v)
    while True:
        t = b""
        while 8 * len(t) < _QBITS:
            v = mac(k, v)
            t += v
        cand = int.from_bytes(t, "big") >> (8 * len(t) - _QBITS)
        if 0 < cand < ORDER:
            yield cand
        k = mac(k, v + b"\x00")
        v = mac(k, v)


def sign(d: int, digest: bytes, hash_algo: str = "sha256") -> tuple[int, int]:
    """Sign ``digest`` with secret scalar ``d``; deterministic (RFC 6979), as libgcrypt does
    for ``(data (flags rfc6979) (hash HASH_ALGO #digest#))``.  Returns ``(r, s)``."""
    e = message_representative(digest)
    dn = d % ORDER
    for k in rfc6979_nonces(d, digest, hash_algo):
        x, _ = _affine(_mul_base(k))
        r = x % ORDER
        if r == 0:
            continue
        s = pow(k, ORDER - 2, ORDER) * (e + r * dn) % ORDER
        if s:
            return r, s
    raise AssertionError("unreachable")  # pragma: no cover


def verify(q: bytes | tuple[int, int], digest: bytes, r: int, s: int) -> bool:
    """Check an ECDSA signature ``(r, s)`` of ``digest`` by public key ``q`` (encoded bytes
    or an affine point).  Returns False for any invalid input, including a bad ``q``."""
    if not (0 < r < ORDER and 0 < s < ORDER):
        return False
    try:
        qx, qy = decode_point(q) if isinstance(q, bytes | bytearray) else q
    except InvalidPoint:
        return False
    w = pow(s, ORDER - 2, ORDER)
    u1 = message_representative(digest) * w % ORDER
    u2 = r * w % ORDER
    pt = _add(_mul_base(u1), _cached(_mul(u2, _from_affine(qx, qy))))
    if pt[2] % P == 0:  # cannot happen with complete formulas; be safe
        return False
    x, _ = _affine(pt)
    return x % ORDER == r
