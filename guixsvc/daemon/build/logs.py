"""Build logs on disk: `<log dir>/drvs/XX/REST[.gz|.bz2]` (spec/build-env.md §8).

Only the builder's own output is written here; compression follows `--log-compression`
(gzip level 9 by default, bzip2 block size 9, or none) and `--lose-logs` keeps nothing.
"""

from __future__ import annotations

import bz2
import gzip
import os
from typing import BinaryIO


def log_file_name(log_dir: str, drv_path: str, compression: str) -> str:
    base = os.path.basename(drv_path)
    suffix = {"gzip": ".gz", "bzip2": ".bz2"}.get(compression, "")
    return os.path.join(log_dir, "drvs", base[:2], base[2:] + suffix)


class BuildLog:
    """An open build log; `write` takes the raw chunks read from the builder."""

    def __init__(self, log_dir: str, drv_path: str, compression: str) -> None:
        self.path = log_file_name(log_dir, drv_path, compression)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._raw = raw
        self._file: BinaryIO
        if compression == "gzip":
            self._file = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9)  # type: ignore[assignment]
        elif compression == "bzip2":
            self._file = bz2.BZ2File(raw, "wb", compresslevel=9)  # type: ignore[assignment]
        else:
            self._file = raw

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def close(self) -> None:
        if self._file is not self._raw:
            self._file.close()
        self._raw.close()


def read_log(path: str) -> bytes:
    """Read a stored log back (used by tests and tools)."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    if path.endswith(".bz2"):
        with bz2.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()
