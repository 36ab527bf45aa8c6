"""The reference scanner against a naive oracle (every 32-byte window), chunk boundaries."""

from __future__ import annotations

import os
import random
from pathlib import Path

from guixsvc.store import base32
from guixsvc.store.references import ReferenceScanner, scan_path


def _naive(data: bytes, hashes: set[bytes]) -> set[bytes]:
    return {data[i : i + 32] for i in range(len(data) - 31)} & hashes


def test_scanner_matches_naive_search() -> None:
    rng = random.Random(7)
    hashes = {base32.encode(rng.randbytes(20)).encode() for _ in range(20)}
    alphabet = base32.ALPHABET.encode() + b"-/\0xyz"
    for _ in range(30):
        parts = []
        for _ in range(rng.randint(1, 20)):
            if rng.random() < 0.3:
                parts.append(rng.choice(sorted(hashes)))
            parts.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 50))))
        data = b"".join(parts)
        scanner = ReferenceScanner(h.decode() for h in hashes)
        pos = 0
        while pos < len(data):  # random chunking, hashes split across chunks
            n = rng.randint(1, 40)
            scanner.feed(data[pos : pos + n])
            pos += n
        assert scanner.found == _naive(data, hashes)


def test_overlapping_hashes() -> None:
    a = "0" * 16 + "1" * 16
    b = "1" * 16 + "2" * 16
    scanner = ReferenceScanner([a, b])
    scanner.feed(("0" * 16 + "1" * 16 + "2" * 16).encode())
    assert scanner.found == {a.encode(), b.encode()}


def test_scan_path_names_and_symlinks(tmp_path: Path) -> None:
    store = "/gnu/store"
    h1, h2, h3 = (base32.encode(os.urandom(20)) for _ in range(3))
    p1, p2, p3 = f"{store}/{h1}-a", f"{store}/{h2}-b", f"{store}/{h3}-c"
    out = tmp_path / "out"
    out.mkdir()
    (out / f"file-{h1}").write_text("x")
    (out / "link").symlink_to(p2 + "/bin")
    refs, digest, size = scan_path(out, [p1, p2, p3])
    assert refs == {p1, p2}
    assert size > 0 and len(digest) == 32
