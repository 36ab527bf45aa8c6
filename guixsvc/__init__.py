"""guixsvc: the GNU Guix store services (daemon, publish, gc) written in Python.

Compatibility with upstream Guix is the product: same wire protocol, store paths, NAR bytes,
narinfo signatures, database schema, flags and environment variables.
"""

__version__ = "0.1.0"
