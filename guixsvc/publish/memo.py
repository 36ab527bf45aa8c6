"""In-memory narinfo answers of `guix publish`, keyed by hash part, so that a repeated narinfo
request costs neither daemon RPCs nor a signature.

Why it is safe:

- A positive entry (the signed narinfo text of a valid path) is served only while the store
  item is still there as the very same file system object it was when the daemon said it is
  valid: `lstat` of the path must give the same device, inode and ctime.  The collector
  invalidates a dead path and renames it into `<store>/trash` under one lock, and anything
  that replaces an item (repair, delete + re-add) makes a new inode, so a deleted path is never
  answered from memory.  Entries also expire after `positive_seconds` (the daemon's answer may
  change in ways the file system does not show, e.g. a repair updating the hash), and the
  table is bounded (least recently used entries go first).
- A negative entry ("no such valid path") is kept at most `negative_seconds` (1 s) and only
  while the database files (`db.sqlite`, `db.sqlite-wal`) keep their size, mtime and inode:
  registering a path commits to the database, which changes one of them.  So a newly added
  path is visible at the next request in practice and within a second at worst (file
  timestamps have a clock-tick granularity).  Upstream caches nothing in-process; its
  `--negative-ttl` only sets the Cache-Control header of 404s, which we still send.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable

Signature = tuple[int, ...]

POSITIVE_SECONDS = 60.0
NEGATIVE_SECONDS = 1.0
MAX_ENTRIES = 20_000  # narinfos are ~0.5-2 KB: at most ~40 MB per process


def item_signature(path: str) -> Signature | None:
    """What identifies the file system object at `path` (None when it is gone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mode)


class NarinfoMemo:
    """Narinfo bodies and misses by hash part (see the module docstring for the rules)."""

    MISSING = b""

    def __init__(
        self,
        db_dir: str,
        *,
        positive_seconds: float = POSITIVE_SECONDS,
        negative_seconds: float = NEGATIVE_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db_files = (os.path.join(db_dir, "db.sqlite"), os.path.join(db_dir, "db.sqlite-wal"))
        self.positive_seconds = positive_seconds
        self.negative_seconds = negative_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._found: OrderedDict[str, tuple[bytes, str, Signature, float]] = OrderedDict()
        self._missing: dict[str, tuple[Signature, float]] = {}

    def db_signature(self) -> Signature:
        """Size, mtime and inode of the database files; changes with every commit."""
        out: list[int] = []
        for file in self.db_files:
            try:
                st = os.stat(file)
            except OSError:
                out += (-1, -1, -1)
            else:
                out += (st.st_size, st.st_mtime_ns, st.st_ino)
        return tuple(out)

    def get(self, hash_part: str) -> bytes | None:
        """The narinfo text, `MISSING` for a remembered miss, None when we do not know."""
        entry = self._found.get(hash_part)
        now = self.clock()
        if entry is not None:
            body, path, sig, born = entry
            if now - born < self.positive_seconds and item_signature(path) == sig:
                self._found.move_to_end(hash_part)
                return body
            del self._found[hash_part]
            return None
        miss = self._missing.get(hash_part)
        if miss is not None:
            sig, born = miss
            if now - born < self.negative_seconds and self.db_signature() == sig:
                return self.MISSING
            del self._missing[hash_part]
        return None

    def before_query(self) -> Signature:
        """Call before asking the daemon; pass the result to `put_missing`."""
        return self.db_signature()

    def put(self, hash_part: str, path: str, body: bytes, sig: Signature | None = None) -> None:
        """Remember `body` for the valid `path`; `sig` is its `item_signature` taken before
        the daemon was asked (so a replacement in between is not mistaken for the item)."""
        if sig is None:
            return
        self._missing.pop(hash_part, None)
        self._found[hash_part] = (body, path, sig, self.clock())
        self._found.move_to_end(hash_part)
        while len(self._found) > self.max_entries:
            self._found.popitem(last=False)

    def put_missing(self, hash_part: str, db_sig: Signature) -> None:
        """Remember that there is no valid path for `hash_part` as of `db_sig`."""
        if len(self._missing) >= self.max_entries:
            self._missing.clear()
        self._missing[hash_part] = (db_sig, self.clock())
