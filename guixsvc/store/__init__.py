"""Store primitives: paths, nix-base32, hashes, NAR, derivations, the SQLite database, locks."""
