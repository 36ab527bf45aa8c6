"""The store interface that the worker protocol serves.

The protocol package defines what a store must answer; the daemon's `LocalStore` implements it.
Each opcode handler in `protocol.server` is then a few lines: decode, call one method, encode.
Errors meant for the client are `StoreError`s carrying upstream's message and exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from guixsvc.protocol.ops import (
    AddToStoreRequest,
    BuildMode,
    ClientOptions,
    GCRequest,
)
from guixsvc.store.paths import StorePath


class StoreError(Exception):
    """An error reported to the client with STDERR_ERROR; the session goes on."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class NotImplementedYet(StoreError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: not implemented yet")


@dataclass(frozen=True)
class PathInfo:
    path: StorePath
    deriver: StorePath | None
    nar_hash: bytes  # SHA-256 digest
    references: list[StorePath]  # sorted
    registration_time: int
    nar_size: int


@dataclass(frozen=True)
class SubstitutablePathInfo:
    path: StorePath
    deriver: StorePath | None
    references: list[StorePath]
    download_size: int
    nar_size: int


@dataclass(frozen=True)
class GCResult:
    paths: list[str]
    bytes_freed: int


#: Feeds an AddToStore NAR from the connection into a parser: `feed_nar(consume)` calls
#: `consume(chunk) -> bytes used` until the consumer reports the archive complete.
NarFeeder = Callable[[Callable[[memoryview], int], Callable[[], bool]], None]
#: ImportPaths' source: `read(max)` returns 1..max bytes from the client (STDERR_READ).
ReadSource = Callable[[int], bytes]
#: ExportPath's sink: receives the export record bytes (sent as STDERR_WRITE).
WriteSink = Callable[[bytes], None]
#: Sends a message line to the client (STDERR_NEXT) at a verbosity level.
Logger = Callable[[int, str], None]


class Store(Protocol):
    def is_valid_path(self, path: StorePath) -> bool: ...
    def query_valid_paths(self, paths: list[StorePath]) -> list[StorePath]: ...
    def query_path_info(self, path: StorePath) -> PathInfo: ...
    def query_referrers(self, path: StorePath) -> list[StorePath]: ...
    def query_valid_derivers(self, path: StorePath) -> list[StorePath]: ...
    def query_derivation_outputs(self, drv: StorePath) -> dict[str, StorePath]: ...
    def query_path_from_hash_part(self, hash_part: str) -> StorePath | None: ...
    def query_all_valid_paths(self) -> list[StorePath]: ...

    def add_to_store(self, request: AddToStoreRequest, feed_nar: NarFeeder) -> StorePath: ...
    def add_text_to_store(
        self, name: str, contents: bytes, references: list[StorePath]
    ) -> StorePath: ...
    def export_path(self, path: StorePath, sign: bool, sink: WriteSink) -> None: ...
    def import_paths(self, read: ReadSource) -> list[StorePath]: ...

    def build_paths(self, items: list[str], mode: BuildMode) -> None: ...
    def ensure_path(self, path: StorePath) -> None: ...

    def add_temp_root(self, path: StorePath) -> None: ...
    def add_indirect_root(self, file_name: str) -> None: ...
    def sync_with_gc(self) -> None: ...
    def find_roots(self) -> dict[str, StorePath]: ...
    def collect_garbage(self, request: GCRequest) -> GCResult: ...

    def set_options(self, options: ClientOptions) -> None: ...

    def has_substitutes(self, path: StorePath) -> bool: ...
    def query_substitutable_paths(self, paths: list[StorePath]) -> list[StorePath]: ...
    def query_substitutable_path_infos(
        self, paths: list[StorePath]
    ) -> list[SubstitutablePathInfo]: ...

    def query_failed_paths(self) -> list[str]: ...
    def clear_failed_paths(self, paths: list[str]) -> None: ...
    def optimise_store(self) -> None: ...
    def verify_store(self, check_contents: bool, repair: bool) -> bool: ...
    def builtin_builders(self) -> list[str]: ...
    def substitute_urls(self) -> list[str]: ...
