"""Worker-protocol constants and the request layout of every opcode.

One table says, for each opcode, which fields the client sends (spec/worker-protocol.md §5-§7), so
that the server state machine, the client and the tests agree on one definition.  Store paths in
requests are checked here, before "work mode", exactly where upstream's `readStorePath` would
reject them and close the connection.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guixsvc.protocol.wire import ProtocolError, WireReader
from guixsvc.store.derived_path import DerivedPath
from guixsvc.store.paths import InvalidStorePath, StoreDir, StorePath

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
PROTOCOL_VERSION = 0x164
EXPORT_MAGIC = 0x4558494E
#: The daemon's input buffer size: what it asks for with STDERR_READ.
READ_CHUNK = 32768


def major(version: int) -> int:
    return version & 0xFF00


def minor(version: int) -> int:
    return version & 0x00FF


class Stderr(enum.IntEnum):
    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470


class Op(enum.IntEnum):
    IS_VALID_PATH = 1
    HAS_SUBSTITUTES = 3
    QUERY_PATH_HASH = 4
    QUERY_REFERENCES = 5
    QUERY_REFERRERS = 6
    ADD_TO_STORE = 7
    ADD_TEXT_TO_STORE = 8
    BUILD_PATHS = 9
    ENSURE_PATH = 10
    ADD_TEMP_ROOT = 11
    ADD_INDIRECT_ROOT = 12
    SYNC_WITH_GC = 13
    FIND_ROOTS = 14
    EXPORT_PATH = 16
    QUERY_DERIVER = 18
    SET_OPTIONS = 19
    COLLECT_GARBAGE = 20
    QUERY_SUBSTITUTABLE_PATH_INFO = 21
    QUERY_DERIVATION_OUTPUTS = 22
    QUERY_ALL_VALID_PATHS = 23
    QUERY_FAILED_PATHS = 24
    CLEAR_FAILED_PATHS = 25
    QUERY_PATH_INFO = 26
    IMPORT_PATHS = 27
    QUERY_DERIVATION_OUTPUT_NAMES = 28
    QUERY_PATH_FROM_HASH_PART = 29
    QUERY_SUBSTITUTABLE_PATH_INFOS = 30
    QUERY_VALID_PATHS = 31
    QUERY_SUBSTITUTABLE_PATHS = 32
    QUERY_VALID_DERIVERS = 33
    OPTIMISE_STORE = 34
    VERIFY_STORE = 35
    BUILTIN_BUILDERS = 80
    SUBSTITUTE_URLS = 81


class BuildMode(enum.IntEnum):
    NORMAL = 0
    REPAIR = 1
    CHECK = 2


class GCAction(enum.IntEnum):
    RETURN_LIVE = 0
    RETURN_DEAD = 1
    DELETE_DEAD = 2
    DELETE_SPECIFIC = 3


@dataclass(frozen=True)
class ClientOptions:
    """The fields of SetOptions (opcode 19), decoded."""

    keep_failed: bool
    keep_going: bool
    fallback: bool
    verbosity: int
    max_build_jobs: int | None
    max_silent_time: int | None
    use_build_hook: bool
    build_verbosity: int
    log_type: int
    print_build_trace: bool
    build_cores: int | None
    use_substitutes: bool
    overrides: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class GCRequest:
    action: GCAction
    paths: list[StorePath]
    ignore_liveness: bool
    max_freed: int


@dataclass(frozen=True)
class AddToStoreRequest:
    """Header of AddToStore; a NAR follows on the wire."""

    name: str
    fixed: bool
    recursive: bool
    algo: str


# --- field readers ----------------------------------------------------------------------------


def read_store_path(reader: WireReader, store: StoreDir) -> StorePath:
    text = reader.read_string()
    try:
        return store.parse_lax(text)  # upstream's `readStorePath`: the hash part is unchecked
    except InvalidStorePath as exc:
        raise ProtocolError(str(exc)) from None


def read_store_paths(reader: WireReader, store: StoreDir) -> list[StorePath]:
    # read_list resumes where a partial list stopped (linear decoding, see WireReader).
    return reader.read_list(lambda r: read_store_path(r, store))


def _read_options(reader: WireReader, store: StoreDir, client_minor: int) -> tuple[Any, ...]:
    keep_failed = reader.read_int() != 0
    keep_going = reader.read_int() != 0
    fallback = reader.read_int() != 0
    verbosity = reader.read_int()
    max_jobs = max_silent = cores = None
    if client_minor < 0x61:
        max_jobs = reader.read_int()
        max_silent = reader.read_int()
    use_hook = reader.read_int() != 0 if client_minor >= 2 else True
    build_verbosity = log_type = 0
    trace = False
    if client_minor >= 4:
        build_verbosity = reader.read_int()
        log_type = reader.read_int()
        trace = reader.read_int() != 0
    if 6 <= client_minor < 0x61:
        cores = reader.read_int()
    use_subst = reader.read_int() != 0 if client_minor >= 10 else True
    overrides = reader.read_pairs() if client_minor >= 12 else []
    return (
        ClientOptions(
            keep_failed, keep_going, fallback, verbosity, max_jobs, max_silent, use_hook,
            build_verbosity, log_type, trace, cores, use_subst, overrides,
        ),
    )  # fmt: skip


def _read_gc(reader: WireReader, store: StoreDir, client_minor: int) -> tuple[Any, ...]:
    action = reader.read_int()
    paths = read_store_paths(reader, store)
    ignore = reader.read_int() != 0
    max_freed = reader.read_u64()
    reader.read_int()  # obsolete
    if client_minor >= 5:
        reader.read_int()
        reader.read_int()
    try:
        gc_action = GCAction(action)
    except ValueError:
        raise ProtocolError(f"invalid garbage collector action {action}") from None
    return (GCRequest(gc_action, paths, ignore, max_freed),)


def _read_build_paths(reader: WireReader, store: StoreDir, client_minor: int) -> tuple[Any, ...]:
    def item(r: WireReader) -> str:
        text = r.read_string()
        try:
            DerivedPath.parse(text, store)
        except InvalidStorePath as exc:
            raise ProtocolError(str(exc)) from None
        return text

    items = reader.read_list(item)  # resumable: linear decoding, see WireReader
    mode = BuildMode.NORMAL
    if client_minor >= 15:
        raw = reader.read_int()
        try:
            mode = BuildMode(raw)
        except ValueError:
            raise ProtocolError(f"invalid build mode {raw}") from None
    return items, mode


RequestReader = Callable[[WireReader, StoreDir, int], tuple[Any, ...]]


def _none(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    return ()


def _path(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    return (read_store_path(reader, store),)


def _paths(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    return (read_store_paths(reader, store),)


def _string(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    return (reader.read_string(),)


def _strings(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    return (reader.read_strings(),)


def _add_to_store(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    name = reader.read_string()
    fixed = reader.read_int() == 1
    recursive = reader.read_int() == 1
    algo = reader.read_string()
    return (AddToStoreRequest(name, fixed, recursive, algo),)


def _add_text(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    name = reader.read_string()
    contents = reader.read_bytes()
    refs = read_store_paths(reader, store)
    return (name, contents, refs)


def _export(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    path = read_store_path(reader, store)
    sign = reader.read_int() == 1
    return (path, sign)


def _verify(reader: WireReader, store: StoreDir, m: int) -> tuple[Any, ...]:
    check = reader.read_int() != 0
    repair = reader.read_int() != 0
    return (check, repair)


REQUEST_READERS: dict[Op, RequestReader] = {
    Op.IS_VALID_PATH: _string,
    Op.HAS_SUBSTITUTES: _path,
    Op.QUERY_PATH_HASH: _path,
    Op.QUERY_REFERENCES: _path,
    Op.QUERY_REFERRERS: _path,
    Op.ADD_TO_STORE: _add_to_store,
    Op.ADD_TEXT_TO_STORE: _add_text,
    Op.BUILD_PATHS: _read_build_paths,
    Op.ENSURE_PATH: _path,
    Op.ADD_TEMP_ROOT: _path,
    Op.ADD_INDIRECT_ROOT: _string,
    Op.SYNC_WITH_GC: _none,
    Op.FIND_ROOTS: _none,
    Op.EXPORT_PATH: _export,
    Op.QUERY_DERIVER: _path,
    Op.SET_OPTIONS: _read_options,
    Op.COLLECT_GARBAGE: _read_gc,
    Op.QUERY_SUBSTITUTABLE_PATH_INFO: _string,
    Op.QUERY_DERIVATION_OUTPUTS: _path,
    Op.QUERY_ALL_VALID_PATHS: _none,
    Op.QUERY_FAILED_PATHS: _none,
    Op.CLEAR_FAILED_PATHS: _strings,
    Op.QUERY_PATH_INFO: _path,
    Op.IMPORT_PATHS: _none,
    Op.QUERY_DERIVATION_OUTPUT_NAMES: _path,
    Op.QUERY_PATH_FROM_HASH_PART: _string,
    Op.QUERY_SUBSTITUTABLE_PATH_INFOS: _paths,
    Op.QUERY_VALID_PATHS: _paths,
    Op.QUERY_SUBSTITUTABLE_PATHS: _paths,
    Op.QUERY_VALID_DERIVERS: _path,
    Op.OPTIMISE_STORE: _none,
    Op.VERIFY_STORE: _verify,
    Op.BUILTIN_BUILDERS: _none,
    Op.SUBSTITUTE_URLS: _none,
}
