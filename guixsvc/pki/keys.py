"""Signing keys, signatures and the ACL, in the formats and with the messages of upstream Guix.

One module for what Guix spreads over ``guix/pki.scm``, ``guix/scripts/authenticate.scm``,
``guix/scripts/archive.scm`` (``--generate-key``, ``--authorize``), the signature parts of
``guix/narinfo.scm`` / ``guix/scripts/publish.scm`` and Guile-Gcrypt's ``pk-crypto``:

* key files ``<conf>/signing-key.pub`` / ``.sec`` (libgcrypt advanced-format S-expressions);
* ``sign_hash`` -- the ``(signature (data ...) (sig-val ...) (public-key ...))`` text that
  ``guix authenticate sign`` returns and ``guix publish`` base64-encodes in narinfos;
* verification with upstream's statuses and error texts (``verify_signature``,
  ``signature_status``, ``verify_narinfo_signature``);
* the ACL ``<conf>/acl``: ``(acl (entry <public-key> (tag (guix import))) ...)``.

Signing and verification are pure Python (``ecdsa`` for the default Ed25519-curve keys, a small
PKCS#1 v1.5 implementation for RSA keys); nothing here needs libgcrypt.

Texts: libgcrypt S-expression text is a byte string that Guile treats as ISO-8859-1.  Functions
returning S-expression text return those raw bytes (what ``guix authenticate`` writes);
files are written and read the way Guix does under a UTF-8 locale (Latin-1 characters above
0x7F become two UTF-8 bytes -- never the case for keys, which are hex).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from guixsvc.pki import ecdsa, sexp
from guixsvc.pki.sexp import SExp, SExpError

__all__ = [
    "DEFAULT_KEY_PARAMETERS",
    "Acl",
    "AclError",
    "Authenticator",
    "Key",
    "PkiError",
    "SignatureError",
    "SignatureStatus",
    "acl_file",
    "authorize_key",
    "check_secrecy",
    "current_acl",
    "generate_key_files",
    "generate_key_pair",
    "generate_keys",
    "hash_data",
    "hash_data_value",
    "load_key",
    "load_key_pair",
    "load_public_key",
    "load_secret_key",
    "narinfo_signature",
    "narinfo_signed_digest",
    "parse_narinfo_signature",
    "public_key_file",
    "secret_key_file",
    "sign_data",
    "sign_hash",
    "signature_sexp",
    "signature_status",
    "verify_data",
    "verify_narinfo_signature",
    "verify_signature",
]

#: ``%key-generation-parameters`` of ``guix archive`` (libgcrypt > 1.6.0).
DEFAULT_KEY_PARAMETERS = b"(genkey (ecdsa (curve Ed25519) (flags rfc6979)))"

_ED25519_NAMES = frozenset({b"Ed25519", b"1.3.6.1.4.1.11591.15.1", b"1.3.101.112"})
_ECC_NAMES = frozenset({b"ecc", b"ecdsa"})
_ACL_TAG: SExp = (b"tag", (b"guix", b"import"))

# DER DigestInfo prefixes for EMSA-PKCS1-v1_5 (RFC 8017 section 9.2, note 1).
_DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


class PkiError(Exception):
    """An error whose message is upstream's text (what Guix prints or sends to clients)."""


class SignatureError(PkiError):
    """A signature that does not pass; ``status`` says why (a :class:`SignatureStatus`)."""

    def __init__(self, message: str, status: SignatureStatus) -> None:
        super().__init__(message)
        self.status = status


class AclError(PkiError):
    """An ACL that is not ``(acl (entry KEY (tag (guix import))) ...)``."""

    def __init__(self, message: str = "invalid access-control list") -> None:
        super().__init__(message)


class SignatureStatus(enum.Enum):
    """The outcomes of ``%signature-status`` (``guix/pki.scm``), plus ``UNSIGNED`` for a
    narinfo without a usable ``Signature`` field."""

    VALID = "valid-signature"
    INVALID = "invalid-signature"
    HASH_MISMATCH = "hash-mismatch"
    UNAUTHORIZED = "unauthorized-key"
    CORRUPT = "corrupt-signature"
    UNSIGNED = "unsigned"


# --- small helpers --------------------------------------------------------------------------


def _text(data: bytes) -> str:
    """S-expression bytes as the Guile string upstream formats into messages."""
    return data.decode("latin-1")


def _usg(value: int) -> bytes:
    """An MPI in libgcrypt's unsigned format: big-endian, no leading zero bytes."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _mpi(atom: bytes | None) -> int | None:
    return None if atom is None else int.from_bytes(atom, "big")


def _param(params: SExp, name: bytes) -> bytes | None:
    """Value of ``(name VALUE)`` inside a key's parameter list."""
    lst = sexp.find_token(params, name)
    return None if lst is None else sexp.nth_data(lst, 1)


def _file_bytes(text: bytes) -> bytes:
    """What ``display`` of a Latin-1 Guile string writes to a UTF-8 port."""
    return text.decode("latin-1").encode("utf-8")


def _text_from_file(data: bytes) -> bytes:
    """Inverse of :func:`_file_bytes` (``read-string`` then ``string->pointer`` in Latin-1);
    falls back to the raw bytes when the file is not such UTF-8."""
    try:
        return data.decode("utf-8").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return data


def _write_atomic(path: str, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """``with-atomic-file-output``: write a temporary file next to ``path``, sync, give it
    ``mode`` (and ``owner``), rename over ``path`` (replacing a symlink, not its target)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            if owner is not None:
                os.fchown(out.fileno(), owner[0], owner[1])
            os.fsync(out.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def public_key_file(conf_dir: str) -> str:
    """``%public-key-file``."""
    return os.path.join(conf_dir, "signing-key.pub")


def secret_key_file(conf_dir: str) -> str:
    """``%private-key-file``."""
    return os.path.join(conf_dir, "signing-key.sec")


def acl_file(conf_dir: str) -> str:
    """``%acl-file``."""
    return os.path.join(conf_dir, "acl")


# --- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Key:
    """A public or private key: ``(public-key (ALGO PARAMS...))`` / ``(private-key ...)``."""

    sexp: tuple[SExp, ...]

    @classmethod
    def parse(cls, text: bytes | str) -> Key:
        """Parse key text (canonical or advanced).  Raises :class:`SExpError` for bad syntax
        and :class:`PkiError` when the S-expression is not a key."""
        value = sexp.parse(text)
        if isinstance(value, bytes) or sexp.nth_data(value, 0) not in (
            b"public-key",
            b"private-key",
        ):
            raise PkiError("s-expression does not denote a key")
        return cls(value)

    @property
    def kind(self) -> str:
        """``"public-key"`` or ``"private-key"``."""
        head = sexp.nth_data(self.sexp, 0)
        return head.decode("latin-1") if head else ""

    @property
    def is_secret(self) -> bool:
        return self.kind == "private-key"

    @property
    def key_type(self) -> str | None:
        """Guile-Gcrypt's ``key-type``: ``"ecc"``, ``"rsa"``, ...; None if not a key."""
        if self.kind not in ("public-key", "private-key"):
            return None
        inner = sexp.nth(self.sexp, 1)
        algo = sexp.nth_data(inner, 0) if inner is not None else None
        return algo.decode("latin-1") if algo is not None else None

    @property
    def _params(self) -> tuple[SExp, ...]:
        inner = sexp.nth(self.sexp, 1)
        if inner is None:
            raise PkiError("invalid key: no algorithm parameters")
        return inner

    def public(self) -> Key:
        """The public half: for a private key, the same parameters minus the secret ones
        (``d`` for ECC; ``d p q u`` for RSA), which is what libgcrypt writes to the ``.pub``."""
        if not self.is_secret:
            return self
        params = self._params
        algo = params[0]
        secret_names = {b"d", b"p", b"q", b"u"} if algo == b"rsa" else {b"d"}
        kept = [
            item
            for item in params[1:]
            if not (isinstance(item, tuple) and item and item[0] in secret_names)
        ]
        if algo in _ECC_NAMES and sexp.find_token(params, b"q") is None:
            d = _mpi(_param(params, b"d"))
            if d is None:
                raise PkiError("invalid key: no secret scalar")
            kept.append((b"q", ecdsa.public_key(d)))
        return Key((b"public-key", (algo, *kept)))

    def to_bytes(self) -> bytes:
        """``canonical-sexp->string``: the advanced text (trailing newline included)."""
        return sexp.to_advanced(self.sexp)

    def to_canonical(self) -> bytes:
        return sexp.to_canonical(self.sexp)

    def __repr__(self) -> str:  # never show key material
        return f"<Key {self.kind} {self.key_type}>"


def load_key(path: str | os.PathLike[str]) -> Key:
    """Read a key file (``read-file-sexp``); canonical or advanced syntax."""
    with open(path, "rb") as f:
        return Key.parse(_text_from_file(f.read()))


def load_public_key(path: str | os.PathLike[str]) -> Key:
    """Read a public key file such as ``signing-key.pub``."""
    key = load_key(path)
    if key.kind != "public-key":
        raise PkiError(f"{os.fspath(path)}: s-expression does not denote a public key")
    return key


def load_secret_key(path: str | os.PathLike[str]) -> Key:
    """Read a secret key file such as ``signing-key.sec``."""
    key = load_key(path)
    if key.kind != "private-key":
        raise PkiError(f"{os.fspath(path)}: s-expression does not denote a private key")
    return key


def load_key_pair(secret_key_path: str) -> tuple[Key, Key]:
    """``load-key-pair`` of ``guix authenticate``: the secret key at ``secret_key_path`` and the
    public key next to it (the last four characters replaced by ``.pub``).  Returns
    ``(public, secret)``; errors read ``failed to load key pair at 'FILE': REASON``."""
    try:
        secret = load_key(secret_key_path)
        public = load_key(secret_key_path[:-4] + ".pub")
    except OSError as exc:
        raise PkiError(
            f"failed to load key pair at '{secret_key_path}': {os.strerror(exc.errno or 0)}\n"
        ) from exc
    except (SExpError, PkiError) as exc:
        raise PkiError(f"failed to load key pair at '{secret_key_path}': {exc}\n") from exc
    return public, secret


def check_secrecy(path: str) -> None:
    """The daemon's ``checkSecrecy``: refuse a secret key readable by group or others."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PkiError(f"getting status of `{path}': {os.strerror(exc.errno or 0)}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PkiError(f"file `{path}' should be secret (inaccessible to everybody else)!")


def generate_keys(parameters: bytes | str | None = None) -> tuple[Key, Key]:
    """``generate-key`` for ``parameters`` (default :data:`DEFAULT_KEY_PARAMETERS`).  Returns
    ``(public, secret)``.  Only Ed25519-curve ECDSA keys can be generated here; anything else
    raises :class:`PkiError` (``key generation failed: ...``)."""
    params = sexp.parse(parameters if parameters is not None else DEFAULT_KEY_PARAMETERS)
    spec = sexp.nth(params, 1) if sexp.nth_data(params, 0) == b"genkey" else None
    if spec is None:
        raise PkiError("key generation failed: gcrypt: Invalid object")
    algo = sexp.nth_data(spec, 0)
    curve = _param(spec, b"curve")
    flags = sexp.find_token(spec, b"flags")
    if (
        algo not in (b"ecdsa", b"ecc")
        or curve not in _ED25519_NAMES
        or (flags is not None and b"eddsa" in flags[1:])
    ):
        raise PkiError(
            "key generation failed: guixsvc: only Ed25519-curve ECDSA keys are supported"
        )
    d = ecdsa.generate_secret()
    q = ecdsa.public_key(d)
    curve_item = (b"curve", b"Ed25519")
    public = Key((b"public-key", (b"ecc", curve_item, (b"q", q))))
    secret = Key((b"private-key", (b"ecc", curve_item, (b"q", q), (b"d", _usg(d)))))
    return public, secret


def generate_key_pair(parameters: bytes | str | None = None) -> tuple[bytes, bytes]:
    """A new key pair as the texts ``guix archive --generate-key`` writes to
    ``signing-key.pub`` and ``signing-key.sec``: ``(public_text, secret_text)``."""
    public, secret = generate_keys(parameters)
    return public.to_bytes(), secret.to_bytes()


def generate_key_files(
    conf_dir: str,
    parameters: bytes | str | None = None,
    *,
    secret_owner: tuple[int, int] | None = None,
) -> tuple[Key, Key]:
    """``guix archive --generate-key``: create ``signing-key.pub`` (0444) and
    ``signing-key.sec`` (0400, chowned to ``secret_owner`` if given, like newer Guix's
    ``ensure-daemon-ownership``) under ``conf_dir``, atomically.  Refuses with upstream's
    ``key pair exists under '<conf>'; remove it first`` if either file exists."""
    pub_path = public_key_file(conf_dir)
    sec_path = secret_key_file(conf_dir)
    if os.path.exists(pub_path) or os.path.exists(sec_path):
        raise PkiError(f"key pair exists under '{conf_dir}'; remove it first")
    public, secret = generate_keys(parameters)
    os.makedirs(conf_dir, exist_ok=True)
    _write_atomic(pub_path, _file_bytes(public.to_bytes()), 0o400)
    _write_atomic(sec_path, _file_bytes(secret.to_bytes()), 0o400, secret_owner)
    os.chmod(pub_path, 0o444)
    return public, secret


# --- signing and verifying ------------------------------------------------------------------


def hash_data(digest: bytes, key_type: str = "ecc", hash_algo: str = "sha256") -> SExp:
    """``bytevector->hash-data``: ``(data (flags rfc6979) (hash sha256 #...#))`` for ECC/DSA
    keys, ``(flags pkcs1)`` for RSA keys."""
    if key_type in ("ecc", "dsa"):
        flag = b"rfc6979"
    elif key_type == "rsa":
        flag = b"pkcs1"
    else:
        raise PkiError(f"unknown key type {key_type}")
    return (b"data", (b"flags", flag), (b"hash", hash_algo.encode("latin-1"), digest))


def hash_data_value(data: SExp) -> tuple[bytes, str] | None:
    """``hash-data->bytevector``: ``(digest, algorithm)`` from a ``data`` S-expression, or
    None when it has no usable ``(hash ALGO VALUE)``."""
    lst = sexp.find_token(data, b"hash")
    if lst is None:
        return None
    algo = sexp.nth_data(lst, 1)
    value = sexp.nth_data(lst, 2)
    if algo is None or value is None:
        return None
    return value, algo.decode("latin-1")


def _ecc_check(params: tuple[SExp, ...]) -> None:
    if _param(params, b"curve") not in _ED25519_NAMES:
        raise PkiError("unsupported elliptic curve (only Ed25519 is supported)")
    flags = sexp.find_token(params, b"flags")
    if flags is not None and b"eddsa" in flags[1:]:
        raise PkiError("EdDSA keys are not supported")


def _pkcs1_encoded(digest: bytes, algo: str, k: int) -> int:
    prefix = _DIGEST_INFO.get(algo.lower())
    if prefix is None:
        raise PkiError(f"unsupported hash algorithm {algo}")
    if len(digest) != hashlib.new(algo.lower()).digest_size:
        raise PkiError("hash value has the wrong length")
    t = prefix + digest
    if k < len(t) + 11:
        raise PkiError("RSA key too short")
    return int.from_bytes(b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t, "big")


def sign_data(data: SExp, secret_key: Key) -> SExp:
    """``gcry_pk_sign``: the ``(sig-val ...)`` of ``data`` (a :func:`hash_data` S-expression)
    with ``secret_key``.  ECC: deterministic RFC 6979 ECDSA, byte-identical to libgcrypt;
    RSA: PKCS#1 v1.5, ``s`` padded to the modulus length as libgcrypt does."""
    if not secret_key.is_secret:
        raise PkiError("not a secret key")
    hv = hash_data_value(data)
    if hv is None:
        raise PkiError("invalid data to sign")
    digest, algo = hv
    params = secret_key._params
    name = params[0]
    if name in _ECC_NAMES:
        _ecc_check(params)
        d = _mpi(_param(params, b"d"))
        if not d:
            raise PkiError("invalid key: no secret scalar")
        try:
            r, s = ecdsa.sign(d, digest, algo)
        except ValueError as exc:
            raise PkiError(str(exc)) from exc
        return (b"sig-val", (b"ecdsa", (b"r", _usg(r)), (b"s", _usg(s))))
    if name == b"rsa":
        n = _mpi(_param(params, b"n"))
        e = _mpi(_param(params, b"e"))
        dd = _mpi(_param(params, b"d"))
        if not n or not e or not dd:
            raise PkiError("invalid RSA key")
        k = (n.bit_length() + 7) // 8
        m = _pkcs1_encoded(digest, algo, k)
        p = _mpi(_param(params, b"p"))
        q = _mpi(_param(params, b"q"))
        if p and q and p * q == n:
            # CRT; the result is the same integer as pow(m, d, n).
            m1 = pow(m, dd % (p - 1), p)
            m2 = pow(m, dd % (q - 1), q)
            h = (pow(q, -1, p) * (m1 - m2)) % p
            s = m2 + h * q
        else:
            s = pow(m, dd, n)
        return (b"sig-val", (b"rsa", (b"s", s.to_bytes(k, "big"))))
    raise PkiError(f"unsupported key algorithm {_text(name) if isinstance(name, bytes) else ''}")


def verify_data(sig_val: SExp, data: SExp, public_key: Key | SExp) -> bool:
    """``gcry_pk_verify``: True iff ``sig_val`` is a valid signature of ``data`` by
    ``public_key``.  Anything malformed or unsupported gives False."""
    key_sexp = public_key.sexp if isinstance(public_key, Key) else public_key
    if isinstance(key_sexp, bytes) or isinstance(sig_val, bytes):
        return False
    params = sexp.nth(key_sexp, 1)
    sig_params = sexp.nth(sig_val, 1)
    hv = hash_data_value(data)
    if params is None or sig_params is None or hv is None:
        return False
    if sexp.nth_data(sig_val, 0) != b"sig-val":
        return False
    digest, algo = hv
    name = params[0]
    sig_name = sig_params[0]
    if name in _ECC_NAMES and sig_name in _ECC_NAMES:
        try:
            _ecc_check(params)
        except PkiError:
            return False
        q = _param(params, b"q")
        r = _mpi(_param(sig_params, b"r"))
        s = _mpi(_param(sig_params, b"s"))
        if q is None or r is None or s is None:
            return False
        if algo.lower() not in ecdsa.HASH_ALGORITHMS:
            return False
        return ecdsa.verify(q, digest, r, s)
    if name == b"rsa" and sig_name == b"rsa":
        n = _mpi(_param(params, b"n"))
        e = _mpi(_param(params, b"e"))
        s = _mpi(_param(sig_params, b"s"))
        if not n or not e or s is None or s >= n:
            return False
        try:
            expected = _pkcs1_encoded(digest, algo, (n.bit_length() + 7) // 8)
        except (PkiError, ValueError):
            return False
        return pow(s, e, n) == expected
    return False


def signature_sexp(data: SExp, secret_key: Key, public_key: Key) -> SExp:
    """``signature-sexp``: ``(signature DATA SIG-VAL PUBLIC-KEY)``."""
    return (b"signature", data, sign_data(data, secret_key), public_key.sexp)


def sign_hash(
    secret_key: Key | str | os.PathLike[str], sha256: bytes, public_key: Key | None = None
) -> bytes:
    """Sign a SHA-256 digest; return the signature text exactly as ``guix authenticate sign``
    prints it (libgcrypt advanced format, raw Latin-1 bytes, trailing newline)::

        (signature
         (data (flags rfc6979) (hash sha256 #...#))
         (sig-val (ecdsa (r #...#) (s #...#)))
         (public-key (ecc (curve Ed25519) (q #...#))))

    ``public_key`` is the key embedded in the signature (upstream reads it from the ``.pub``
    file next to the secret key); by default it is derived from ``secret_key``.  Given a file
    name instead of a key, load that secret key and the ``.pub`` next to it, like ``guix
    authenticate`` (:func:`load_key_pair`)."""
    if len(sha256) != 32:
        raise ValueError("a SHA-256 digest is 32 bytes long")
    if not isinstance(secret_key, Key):
        file_public, secret_key = load_key_pair(os.fspath(secret_key))
        public_key = public_key if public_key is not None else file_public
    public = public_key if public_key is not None else secret_key.public()
    key_type = public.key_type
    data = hash_data(sha256, key_type or "")
    return sexp.to_advanced(signature_sexp(data, secret_key, public))


def _parse_signature(signature: bytes | str | SExp) -> SExp:
    if isinstance(signature, tuple):
        return signature
    try:
        return sexp.parse(signature)
    except SExpError as exc:
        text = signature if isinstance(signature, str) else _text(bytes(signature))
        raise SignatureError(f"corrupt signature data: {text}", SignatureStatus.CORRUPT) from exc


def signature_status(signature: bytes | str | SExp, digest: bytes, acl: Acl) -> SignatureStatus:
    """``%signature-status`` (``guix/pki.scm``): how ``signature`` relates to ``digest`` and
    ``acl``, checked in upstream's order (corrupt, unauthorized, hash mismatch, invalid)."""
    try:
        sig = _parse_signature(signature)
    except SignatureError:
        return SignatureStatus.CORRUPT
    subject = sexp.find_token(sig, b"public-key")
    data = sexp.find_token(sig, b"data")
    if subject is None or data is None:
        return SignatureStatus.CORRUPT
    if not acl.authorizes(subject):
        return SignatureStatus.UNAUTHORIZED
    hv = hash_data_value(data)
    if hv is None or hv[0] != digest:
        return SignatureStatus.HASH_MISMATCH
    sig_val = sexp.find_token(sig, b"sig-val")
    if sig_val is None or not verify_data(sig_val, data, subject):
        return SignatureStatus.INVALID
    return SignatureStatus.VALID


def verify_signature(signature: bytes | str | SExp, acl: Acl) -> bytes:
    """``validate-signature`` of ``guix authenticate verify``: check that ``signature``'s key
    is in ``acl`` and that the signature is valid; return the signed digest.  Raises
    :class:`SignatureError` with upstream's messages (``corrupt signature data: SEXP``,
    ``unauthorized public key: KEY``, ``invalid signature: SEXP``; SEXP in advanced text).
    The caller compares the digest with the data's actual hash."""
    sig = _parse_signature(signature)
    subject = sexp.find_token(sig, b"public-key")
    data = sexp.find_token(sig, b"data")
    if subject is None or data is None:
        raise SignatureError(
            f"corrupt signature data: {_text(sexp.to_advanced(sig))}", SignatureStatus.CORRUPT
        )
    if not acl.authorizes(subject):
        raise SignatureError(
            f"unauthorized public key: {_text(sexp.to_advanced(subject))}",
            SignatureStatus.UNAUTHORIZED,
        )
    sig_val = sexp.find_token(sig, b"sig-val")
    if sig_val is None or not verify_data(sig_val, data, subject):
        raise SignatureError(
            f"invalid signature: {_text(sexp.to_advanced(sig))}", SignatureStatus.INVALID
        )
    hv = hash_data_value(data)
    if hv is None:  # upstream crashes here; report it as corrupt data
        raise SignatureError(
            f"corrupt signature data: {_text(sexp.to_advanced(sig))}", SignatureStatus.CORRUPT
        )
    return hv[0]


class Authenticator:
    """In-process ``guix authenticate``: the daemon's signing/verification agent.

    ``sign(key_file, hex_hash)`` and ``verify(signature)`` return the reply payloads of
    ``sign``/``verify`` requests (signature text; lowercase base16 digest) and raise
    :class:`PkiError` with the reply text of a failing (code 500) request.  Key pairs are
    cached per file name, and the ACL is read once, as upstream does."""

    def __init__(self, acl: Acl) -> None:
        self.acl = acl
        self._pairs: dict[str, tuple[Key, Key]] = {}

    def sign(self, key_file: str, hex_hash: str) -> bytes:
        pair = self._pairs.get(key_file)
        if pair is None:
            pair = self._pairs[key_file] = load_key_pair(key_file)
        public, secret = pair
        digest = bytes.fromhex(hex_hash)
        data = hash_data(digest, public.key_type or "")
        return sexp.to_advanced(signature_sexp(data, secret, public))

    def verify(self, signature: bytes) -> str:
        return verify_signature(signature, self.acl).hex()


# --- narinfo signatures ---------------------------------------------------------------------


def narinfo_signature(
    secret_key: Key,
    text: bytes | str,
    *,
    public_key: Key | None = None,
    host: str | None = None,
) -> str:
    """The value of a narinfo ``Signature:`` field (``1;HOST;BASE64``) for ``text``, the
    narinfo bytes from its start up to and including the newline before ``Signature:``.
    ``host`` defaults to ``gethostname()``, as in ``guix publish``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    sig = sign_hash(secret_key, hashlib.sha256(data).digest(), public_key)
    encoded = base64.b64encode(_file_bytes(sig)).decode("ascii")
    return f"1;{host if host is not None else socket.gethostname()};{encoded}"


# What Guile's string->number reads as a decimal number (enough for a version field).
_SCHEME_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_narinfo_signature(value: str) -> SExp:
    """``narinfo-signature->canonical-sexp``: decode a ``Signature`` field value.  Raises
    :class:`SignatureError` (status UNSIGNED) with upstream's messages."""
    parts = value.split(";")
    if len(parts) != 3:
        raise SignatureError(
            f"invalid format of the signature field: {value}", SignatureStatus.UNSIGNED
        )
    version, _host, b64 = parts
    if not _SCHEME_DECIMAL.fullmatch(version):
        raise SignatureError(
            f'signature version must be a number: "{version}"', SignatureStatus.UNSIGNED
        )
    number: int | float = int(version) if version.lstrip("+-").isdigit() else float(version)
    if number != 1:
        raise SignatureError(f"unsupported signature version: {number}", SignatureStatus.UNSIGNED)
    try:
        text = base64.b64decode(b64, validate=True).decode("utf-8")
        return sexp.parse(text.encode("latin-1"))
    except (ValueError, UnicodeError) as exc:
        raise SignatureError(
            "signature is not a valid s-expression", SignatureStatus.UNSIGNED
        ) from exc


_MANDATORY_FIELDS = (b"StorePath", b"NarHash", b"References")


def _recutils_fields(text: bytes) -> list[tuple[bytes, bytes]] | None:
    """``recutils->alist`` on the first record of ``text``; None on an unparsable line."""
    fields: list[tuple[bytes, bytes]] = []
    for line in text.split(b"\n"):
        if not line:
            if fields:
                break
            continue
        first = line[:1]
        if first.isalpha() or first == b"%":
            colon = line.find(b":")
            if colon < 0:
                return None
            fields.append((line[:colon], line[colon + 1 :].lstrip()))
        elif first == b"#":
            continue
        elif first == b"+" and fields:
            rest = line[2:] if line.startswith(b"+ ") else line[1:]
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + rest)
        else:
            return None
    return fields


def narinfo_signed_digest(narinfo: bytes) -> bytes | None:
    """``narinfo-sha256``: SHA-256 of everything before the first ``Signature:``, or None if
    there is none or ``StorePath``, ``NarHash`` or ``References`` is not in that part."""
    idx = narinfo.find(b"Signature:")
    if idx < 0:
        return None
    above = narinfo[:idx]
    fields = _recutils_fields(above)
    if fields is None:
        return None
    names = {name for name, _ in fields}
    if not all(f in names for f in _MANDATORY_FIELDS):
        return None
    return hashlib.sha256(above).digest()


def verify_narinfo_signature(narinfo: bytes | str, acl: Acl) -> SignatureStatus:
    """``valid-narinfo?`` without the messages: the status of a whole narinfo body.
    ``UNSIGNED`` covers a missing or unparsable ``Signature`` field and unsigned mandatory
    fields; only ``VALID`` makes a narinfo usable by itself (see also the "equivalent
    narinfo" rule of ``guix substitute``, which is the caller's business)."""
    body = narinfo.encode("utf-8") if isinstance(narinfo, str) else bytes(narinfo)
    fields = _recutils_fields(body)
    if fields is None:
        return SignatureStatus.UNSIGNED
    value = next((v for name, v in fields if name == b"Signature"), None)
    if value is None:
        return SignatureStatus.UNSIGNED
    try:
        sig = parse_narinfo_signature(value.decode("utf-8"))
    except (SignatureError, UnicodeDecodeError):
        return SignatureStatus.UNSIGNED
    digest = narinfo_signed_digest(body)
    if digest is None:
        return SignatureStatus.UNSIGNED
    return signature_status(sig, digest, acl)


# --- the ACL --------------------------------------------------------------------------------


def _subject(key: Key | SExp | bytes | str) -> SExp:
    if isinstance(key, Key):
        return key.sexp
    if isinstance(key, tuple):
        return key
    return sexp.parse(key)


class Acl:
    """The access-control list of archive imports: the public keys (any subject S-expression,
    compared structurally) whose signatures are accepted, in file order."""

    def __init__(self, subjects: Iterable[Key | SExp | str] = ()) -> None:
        """``subjects``: keys, parsed S-expressions, or key *texts* (``bytes``/``str``)."""
        self.subjects: list[SExp] = [_subject(s) for s in subjects]
        self._set = frozenset(self.subjects)

    @classmethod
    def from_sexp(cls, value: SExp) -> Acl:
        """Accept exactly ``(acl (entry SUBJECT (tag (guix import))) ...)``; else
        :class:`AclError` (``invalid access-control list``)."""
        if isinstance(value, bytes) or not value or value[0] != b"acl":
            raise AclError()
        subjects = []
        for entry in value[1:]:
            if (
                not isinstance(entry, tuple)
                or len(entry) != 3
                or entry[0] != b"entry"
                or entry[2] != _ACL_TAG
            ):
                raise AclError()
            subjects.append(entry[1])
        acl = cls()
        acl.subjects = subjects  # taken as they are, even odd (atom) subjects
        acl._set = frozenset(subjects)
        return acl

    @classmethod
    def parse(cls, text: bytes | str) -> Acl:
        """Parse ACL text (raises :class:`SExpError` or :class:`AclError`)."""
        return cls.from_sexp(sexp.parse(text))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Acl:
        """Read an ACL file (raises OSError, :class:`SExpError` or :class:`AclError`)."""
        with open(path, "rb") as f:
            return cls.parse(_text_from_file(f.read()))

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[SExp]:
        return iter(self.subjects)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Acl) and self.subjects == other.subjects

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Acl with {len(self.subjects)} entries>"

    def authorizes(self, public_key: Key | SExp | bytes | str) -> bool:
        """``authorized-key?``: is this key (structurally) one of the subjects?"""
        return _subject(public_key) in self._set

    def add(self, public_key: Key | SExp | bytes | str) -> None:
        """Authorize a key the way ``guix archive --authorize`` does: put it first, then drop
        repeated entries keeping the first of each (newer Guix's ``public-keys->acl`` uses
        ``delete-duplicates``; so authorizing a key twice changes nothing but its position)."""
        seen: set[SExp] = set()
        subjects = []
        for s in [_subject(public_key), *self.subjects]:
            if s not in seen:
                seen.add(s)
                subjects.append(s)
        self.subjects = subjects
        self._set = frozenset(subjects)

    def to_sexp(self) -> SExp:
        return (b"acl", *((b"entry", s, _ACL_TAG) for s in self.subjects))

    def to_bytes(self) -> bytes:
        """``write-acl``: the advanced text, as in ``/etc/guix/acl``."""
        return sexp.to_advanced(self.to_sexp())

    def save(self, path: str, mode: int = 0o644) -> None:
        """Write atomically (temporary file + rename; a symlink at ``path`` is replaced by a
        regular file), then mode 0644 like newer Guix (2022 left 0600)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_atomic(path, _file_bytes(self.to_bytes()), mode)


def current_acl(conf_dir: str) -> Acl:
    """``current-acl``: the ACL of ``conf_dir``.  When ``acl`` is missing but
    ``signing-key.pub`` exists, first create an ACL holding just that key (``ensure-acl``);
    when neither exists, the ACL is empty."""
    path = acl_file(conf_dir)
    if not os.path.exists(path):
        pub = public_key_file(conf_dir)
        if os.path.exists(pub):
            Acl([load_key(pub)]).save(path)
    if os.path.exists(path):
        return Acl.load(path)
    return Acl()


def authorize_key(
    conf_dir: str,
    text: bytes | str,
    *,
    store_dir: str = "/gnu/store",
    warning: Callable[[str], None] | None = None,
    hint: Callable[[str], None] | None = None,
) -> Acl:
    """``guix archive --authorize``: add the public key in ``text`` to ``<conf>/acl``.

    Reports (through ``warning``/``hint``) that a symlinked ACL gets replaced, raises
    :class:`PkiError` with ``failed to read public key: SOURCE: MESSAGE`` or
    ``s-expression does not denote a public key``, and returns the ACL written."""
    path = acl_file(conf_dir)
    if os.path.islink(path):
        if warning is not None:
            warning(f"replacing symbolic link {path} with a regular file")
        if hint is not None and os.readlink(path).startswith(store_dir):
            hint(
                "On Guix System, add all @code{authorized-keys} to the\n"
                "@code{guix-service-type} service of your @code{operating-system} instead."
            )
    try:
        key = sexp.parse(text)
    except SExpError as exc:
        raise PkiError(f"failed to read public key: {exc.source}: {exc}") from exc
    acl = current_acl(conf_dir)
    if sexp.nth_data(key, 0) != b"public-key":
        raise PkiError("s-expression does not denote a public key")
    acl.add(key)
    acl.save(path)
    return acl
