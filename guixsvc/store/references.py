"""Reference scanning of build outputs (upstream `scanForReferences`, spec/store.md §12).

A build output refers to a store item when the 32-character hash part of that item's name
occurs anywhere in the output's NAR serialisation (file contents, names, symlink targets).
The daemon scans the NAR it hashes anyway, so references, NAR hash and NAR size come out of a
single pass over the output; the search itself is one compiled regular expression per chunk.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable

from guixsvc.store import nar

#: Bytes of the previous chunk kept so that a hash split across two chunks is still found.
_TAIL = 31


class ReferenceScanner:
    """Accumulates the candidate hash parts seen in a stream of bytes."""

    def __init__(self, hash_parts: Iterable[str]) -> None:
        self.pending = {h.encode("ascii") for h in hash_parts}
        self.found: set[bytes] = set()
        self._tail = b""
        self._compile()

    def _compile(self) -> None:
        if self.pending:
            alternatives = b"|".join(sorted(re.escape(h) for h in self.pending))
            # A lookahead finds overlapping occurrences too (every start position is tried).
            self._regex: re.Pattern[bytes] | None = re.compile(b"(?=(" + alternatives + b"))")
        else:
            self._regex = None

    def feed(self, chunk: bytes | memoryview) -> None:
        if self._regex is None:
            return
        data = self._tail + bytes(chunk)
        hits = {m.group(1) for m in self._regex.finditer(data)}
        if hits:
            self.found |= hits
            self.pending -= hits
            self._compile()
        self._tail = data[-_TAIL:]


def scan_path(
    path: str | os.PathLike[str], candidates: Iterable[str]
) -> tuple[set[str], bytes, int]:
    """Scan `path` for references among the store paths `candidates`.

    Returns (referenced candidate paths, NAR SHA-256 digest, NAR size).
    """
    by_hash: dict[str, list[str]] = {}
    for cand in candidates:
        base = os.path.basename(cand)
        by_hash.setdefault(base[:32], []).append(cand)
    scanner = ReferenceScanner(by_hash)
    hasher = hashlib.sha256()
    size = 0
    for chunk in nar.dump(path):
        hasher.update(chunk)
        scanner.feed(chunk)
        size += len(chunk)
    refs: set[str] = set()
    for h in scanner.found:
        refs.update(by_hash[h.decode("ascii")])
    return refs, hasher.digest(), size
