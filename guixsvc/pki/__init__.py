"""Keys, canonical S-expressions, signatures and the ACL, in upstream Guix formats.

Upstream Guix does this through libgcrypt (Guile-Gcrypt); this package reproduces libgcrypt's
observable behaviour in pure Python so that keys, signatures and ACL files are byte-identical:

* :mod:`guixsvc.pki.sexp` -- libgcrypt's S-expression scanner and canonical/advanced printers;
* :mod:`guixsvc.pki.ecdsa` -- ECDSA over the Ed25519 curve with RFC 6979 nonces (not EdDSA);
* :mod:`guixsvc.pki.keys` -- key files, ``sign_hash``/``verify_signature`` (``guix
  authenticate``), narinfo ``Signature:`` fields, and the ``/etc/guix/acl`` file.
"""
