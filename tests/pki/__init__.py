"""Independent oracles for the guixsvc.pki tests.

Upstream Guix does all of this through libgcrypt (via Guile-Gcrypt), so libgcrypt itself is
the reference: :class:`Gcrypt` drives ``libgcrypt.so.20`` through ctypes the way Guile-Gcrypt
does (``gcry_sexp_new`` with autodetection, ``gcry_sexp_sprint`` in advanced/canonical mode,
``gcry_pk_genkey/sign/verify``).  :func:`run_guile` runs Guile with Guile-Gcrypt when both
are installed.  Tests needing either skip with a reason when it is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import shutil
import subprocess

import pytest

__all__ = ["Gcrypt", "GcryptError", "gcrypt", "needs_gcrypt", "needs_guile", "run_guile"]

_ADVANCED = 3
_CANON = 1


class GcryptError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code & 0xFFFF


class Gcrypt:
    """A thin ctypes binding of the libgcrypt calls Guile-Gcrypt uses."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.gcry_check_version.restype = ctypes.c_char_p
        lib.gcry_check_version.argtypes = [ctypes.c_char_p]
        self.version = (lib.gcry_check_version(None) or b"").decode()
        lib.gcry_control.restype = ctypes.c_uint
        lib.gcry_control(37, 0)  # GCRYCTL_DISABLE_SECMEM
        lib.gcry_control(38, 0)  # GCRYCTL_INITIALIZATION_FINISHED
        vp = ctypes.c_void_p
        pvp = ctypes.POINTER(vp)
        lib.gcry_sexp_new.argtypes = [pvp, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
        lib.gcry_sexp_new.restype = ctypes.c_uint
        lib.gcry_sexp_sprint.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
        lib.gcry_sexp_sprint.restype = ctypes.c_size_t
        lib.gcry_sexp_release.argtypes = [vp]
        lib.gcry_sexp_release.restype = None
        lib.gcry_sexp_find_token.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
        lib.gcry_sexp_find_token.restype = vp
        for name in ("gcry_pk_sign", "gcry_pk_genkey"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_uint
        lib.gcry_pk_sign.argtypes = [pvp, vp, vp]
        lib.gcry_pk_genkey.argtypes = [pvp, vp]
        lib.gcry_pk_verify.argtypes = [vp, vp, vp]
        lib.gcry_pk_verify.restype = ctypes.c_uint
        lib.gcry_strerror.argtypes = [ctypes.c_uint]
        lib.gcry_strerror.restype = ctypes.c_char_p
        self.lib = lib

    def _new(self, text: bytes) -> int | None:
        out = ctypes.c_void_p()
        err = self.lib.gcry_sexp_new(ctypes.byref(out), text, len(text), 1)
        if err:
            raise GcryptError(err)
        return out.value

    def _sprint(self, handle: int | None, mode: int) -> bytes:
        size = self.lib.gcry_sexp_sprint(handle, mode, None, 0)
        buf = ctypes.create_string_buffer(size)
        got = self.lib.gcry_sexp_sprint(handle, mode, buf, size)
        return buf.raw[:got]

    def _release(self, *handles: int | None) -> None:
        for h in handles:
            if h:
                self.lib.gcry_sexp_release(h)

    def strerror(self, code: int) -> str:
        return self.lib.gcry_strerror(code | (1 << 24)).decode()

    def reprint(self, text: bytes, canonical: bool = False) -> bytes:
        """Parse like ``string->canonical-sexp`` and print like ``canonical-sexp->string``
        (or canonically).  Raises GcryptError on a parse error."""
        h = self._new(text)
        try:
            return self._sprint(h, _CANON if canonical else _ADVANCED)
        finally:
            self._release(h)

    def find_token(self, text: bytes, token: bytes) -> bytes | None:
        h = self._new(text)
        try:
            found = self.lib.gcry_sexp_find_token(h, token, len(token))
            if not found:
                return None
            try:
                return self._sprint(found, _ADVANCED)
            finally:
                self._release(found)
        finally:
            self._release(h)

    def genkey(self, params: bytes) -> tuple[bytes, bytes]:
        """``generate-key`` then ``find-sexp-token`` of public-key and private-key."""
        p = self._new(params)
        key = ctypes.c_void_p()
        try:
            err = self.lib.gcry_pk_genkey(ctypes.byref(key), p)
            if err:
                raise GcryptError(err)
            text = self._sprint(key.value, _ADVANCED)
        finally:
            self._release(p, key.value)
        pub = self.find_token(text, b"public-key")
        sec = self.find_token(text, b"private-key")
        assert pub is not None and sec is not None
        return pub, sec

    def sign(self, data: bytes, secret: bytes) -> bytes:
        """``gcry_pk_sign``: the advanced text of the sig-val."""
        d = self._new(data)
        k = self._new(secret)
        sig = ctypes.c_void_p()
        try:
            err = self.lib.gcry_pk_sign(ctypes.byref(sig), d, k)
            if err:
                raise GcryptError(err)
            return self._sprint(sig.value, _ADVANCED)
        finally:
            self._release(d, k, sig.value)

    def verify(self, sig_val: bytes, data: bytes, public: bytes) -> bool:
        """``gcry_pk_verify``; True on success, False on GPG_ERR_BAD_SIGNATURE, else raise."""
        s = self._new(sig_val)
        d = self._new(data)
        k = self._new(public)
        try:
            err = self.lib.gcry_pk_verify(s, d, k)
        finally:
            self._release(s, d, k)
        if err == 0:
            return True
        if err & 0xFFFF == 8:  # GPG_ERR_BAD_SIGNATURE
            return False
        raise GcryptError(err)


@functools.cache
def gcrypt() -> Gcrypt | None:
    """The libgcrypt oracle, or None when libgcrypt cannot be loaded."""
    for name in ("libgcrypt.so.20", ctypes.util.find_library("gcrypt")):
        if not name:
            continue
        try:
            return Gcrypt(name)
        except OSError:
            continue
    return None


needs_gcrypt = pytest.mark.skipif(gcrypt() is None, reason="libgcrypt (libgcrypt20) not found")


@functools.cache
def _guile_has_gcrypt() -> bool:
    guile = shutil.which("guile")
    if guile is None:
        return False
    proc = subprocess.run(
        [guile, "--no-auto-compile", "-c", "(use-modules (gcrypt pk-crypto))"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return proc.returncode == 0


needs_guile = pytest.mark.skipif(
    not _guile_has_gcrypt(), reason="guile with Guile-Gcrypt (guile-gcrypt) not found"
)


def run_guile(script: str, stdin: bytes = b"") -> bytes:
    """Run a Guile script (Guile-Gcrypt available) and return its standard output."""
    guile = shutil.which("guile")
    assert guile is not None
    proc = subprocess.run(
        [guile, "--no-auto-compile", "-c", script],
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"guile failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout
