"""The daemon side of the worker protocol as a sans-I/O state machine, plus opcode handlers.

`ServerConnection` turns received bytes into events (`Handshake`, `Request`) and replies into
bytes; it never touches a socket.  `HANDLERS` maps each opcode to a few lines that call the
`Store` interface and encode the reply (spec/worker-protocol.md §5-§6).  A session loop
(`guixsvc.daemon.session`) owns the socket and feeds both.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guixsvc.protocol.ops import (
    PROTOCOL_VERSION,
    READ_CHUNK,
    REQUEST_READERS,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    AddToStoreRequest,
    BuildMode,
    ClientOptions,
    GCAction,
    GCRequest,
    Op,
    Stderr,
    minor,
)
from guixsvc.protocol.store_api import (
    NarFeeder,
    ReadSource,
    Store,
    StoreError,
    WriteSink,
)
from guixsvc.protocol.wire import (
    MAX_REQUEST,
    Incomplete,
    ProtocolError,
    WireReader,
    encode_bool,
    encode_int,
    encode_string,
    encode_strings,
)
from guixsvc.store.paths import InvalidStorePath, StoreDir, StorePath

_LAST = encode_int(Stderr.LAST)
_NEXT = encode_int(Stderr.NEXT)
_WRITE = encode_int(Stderr.WRITE)


@dataclass(frozen=True)
class Handshake:
    client_version: int
    cpu_affinity: int | None
    reserve_space: bool


@dataclass(frozen=True)
class Request:
    op: Op
    args: tuple[Any, ...]


class _State(enum.Enum):
    MAGIC = 1
    VERSION = 2
    READY = 3


class NeedData:
    """Sentinel: feed more bytes before asking for the next event."""


NEED_DATA = NeedData()
_OPS = {int(op): op for op in Op}


class ServerConnection:
    """Decodes what a client sends; encodes what the daemon answers."""

    def __init__(self, store_dir: StoreDir, version: int = PROTOCOL_VERSION) -> None:
        self.store_dir = store_dir
        self.version = version
        self.client_version = 0
        self.reader = WireReader()
        self.eof = False
        self._state = _State.MAGIC
        self._out: list[bytes] = []

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        if data:
            self.reader.feed(data)
        else:
            self.eof = True

    def next_event(self) -> Handshake | Request | NeedData:
        """The next complete event, or NEED_DATA.  Raises ProtocolError on malformed input."""
        reader = self.reader
        if not reader.available() or not reader.ready():
            # Between requests (nothing buffered), or the last attempt stopped at a field that
            # still lacks bytes: decoding again could not get further (linear decoding).
            if reader.pending() > MAX_REQUEST:
                raise ProtocolError(f"request is too large (more than {MAX_REQUEST} bytes)")
            if self.eof:
                raise EOFError
            return NEED_DATA
        reader.mark()
        try:
            if self._state is _State.MAGIC:
                if reader.read_u64() != WORKER_MAGIC_1:
                    raise ProtocolError("protocol mismatch")
                self._out.append(encode_int(WORKER_MAGIC_2) + encode_int(self.version))
                self._state = _State.VERSION
                reader.mark()
            if self._state is _State.VERSION:
                version = reader.read_int()
                cpu = None
                reserve = False
                if minor(version) >= 14 and reader.read_int():
                    cpu = reader.read_int()
                if minor(version) >= 11:
                    reserve = reader.read_int() != 0
                self.client_version = version
                self._state = _State.READY
                reader.compact()
                return Handshake(version, cpu, reserve)
            raw = reader.read_int()
            op = _OPS.get(raw)
            if op is None:
                raise ProtocolError(f"invalid operation {raw}")
            args = REQUEST_READERS[op](reader, self.store_dir, minor(self.client_version))
        except Incomplete:
            reader.rewind()
            if reader.pending() > MAX_REQUEST:
                raise ProtocolError(
                    f"request is too large (more than {MAX_REQUEST} bytes)"
                ) from None
            if self.eof:
                raise EOFError from None
            return NEED_DATA
        reader.compact()
        return Request(op, args)

    def read_chunk(self, limit: int) -> bytes | NeedData:
        """The client's answer to STDERR_READ: one string of 1..limit bytes (b"" if empty)."""
        reader = self.reader
        reader.mark()
        try:
            data = reader.read_bytes(limit)
        except Incomplete:
            reader.rewind()
            if self.eof:
                raise EOFError from None
            return NEED_DATA
        reader.compact()
        return data

    # -- output ------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def send(self, data: bytes) -> None:
        self._out.append(data)

    def last(self, reply: bytes = b"") -> None:
        self._out.append(_LAST + reply)

    def error(self, message: str, status: int = 1) -> None:
        out = encode_int(Stderr.ERROR) + encode_string(message)
        if minor(self.client_version) >= 8 and status:
            out += encode_int(status)
        self._out.append(out)

    def next(self, text: str | bytes) -> None:
        self._out.append(_NEXT + encode_string(text))

    def write(self, data: bytes) -> None:
        self._out.append(_WRITE + encode_string(data))

    def read_request(self, limit: int = READ_CHUNK) -> None:
        self._out.append(encode_int(Stderr.READ) + encode_int(limit))


# --- opcode handlers ---------------------------------------------------------------------------


class SessionIO:
    """What handlers need from the session besides the store: streaming payloads."""

    feed_nar: NarFeeder
    read: ReadSource
    write: WriteSink


def _paths(store_dir: StoreDir, paths: list[StorePath]) -> bytes:
    return encode_strings(sorted(store_dir.display(p) for p in paths))


def _opt_path(store_dir: StoreDir, path: StorePath | None) -> bytes:
    return encode_string(store_dir.display(path) if path else "")


Handler = Callable[[Store, StoreDir, SessionIO, tuple[Any, ...]], bytes]
HANDLERS: dict[Op, Handler] = {}


def handler(op: Op) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[op] = fn
        return fn

    return register


@handler(Op.IS_VALID_PATH)
def _is_valid_path(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    try:
        path = sd.parse_lax(a[0])
    except InvalidStorePath as exc:
        raise StoreError(str(exc)) from None
    return encode_bool(store.is_valid_path(path))


@handler(Op.QUERY_VALID_PATHS)
def _query_valid_paths(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, store.query_valid_paths(a[0]))


@handler(Op.QUERY_PATH_INFO)
def _query_path_info(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    info = store.query_path_info(a[0])
    return b"".join((
        _opt_path(sd, info.deriver),
        encode_string(info.nar_hash.hex()),
        _paths(sd, info.references),
        encode_int(info.registration_time & 0xFFFFFFFF),
        encode_int(info.nar_size),
    ))  # fmt: skip


@handler(Op.QUERY_PATH_HASH)
def _query_path_hash(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_string(store.query_path_info(a[0]).nar_hash.hex())


@handler(Op.QUERY_REFERENCES)
def _query_references(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, store.query_path_info(a[0]).references)


@handler(Op.QUERY_DERIVER)
def _query_deriver(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _opt_path(sd, store.query_path_info(a[0]).deriver)


@handler(Op.QUERY_REFERRERS)
def _query_referrers(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, store.query_referrers(a[0]))


@handler(Op.QUERY_VALID_DERIVERS)
def _query_valid_derivers(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, store.query_valid_derivers(a[0]))


@handler(Op.QUERY_DERIVATION_OUTPUTS)
def _query_drv_outputs(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, list(store.query_derivation_outputs(a[0]).values()))


@handler(Op.QUERY_DERIVATION_OUTPUT_NAMES)
def _query_drv_output_names(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_strings(sorted(store.query_derivation_outputs(a[0])))


@handler(Op.QUERY_PATH_FROM_HASH_PART)
def _query_from_hash_part(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    if len(a[0]) != 32:
        raise StoreError("invalid hash part")
    return _opt_path(sd, store.query_path_from_hash_part(a[0]))


@handler(Op.QUERY_ALL_VALID_PATHS)
def _query_all_valid(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, store.query_all_valid_paths())


@handler(Op.ADD_TO_STORE)
def _add_to_store(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    request: AddToStoreRequest = a[0]
    return encode_string(sd.display(store.add_to_store(request, io.feed_nar)))


@handler(Op.ADD_TEXT_TO_STORE)
def _add_text_to_store(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    name, contents, refs = a
    return encode_string(sd.display(store.add_text_to_store(name, contents, refs)))


@handler(Op.EXPORT_PATH)
def _export_path(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    store.export_path(a[0], a[1], io.write)
    return encode_int(1)


@handler(Op.IMPORT_PATHS)
def _import_paths(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_strings([sd.display(p) for p in store.import_paths(io.read)])


@handler(Op.BUILD_PATHS)
def _build_paths(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    items, mode = a
    store.build_paths(items, BuildMode(mode))
    return encode_int(1)


@handler(Op.FIND_ROOTS)
def _find_roots(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    roots = sorted(store.find_roots().items())
    return encode_int(len(roots)) + b"".join(
        encode_string(link) + encode_string(sd.display(path)) for link, path in roots
    )


@handler(Op.SET_OPTIONS)
def _set_options(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    options: ClientOptions = a[0]
    store.set_options(options)
    return b""


@handler(Op.COLLECT_GARBAGE)
def _collect_garbage(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    request: GCRequest = a[0]
    if request.ignore_liveness:
        raise StoreError("you are not allowed to ignore liveness")
    result = store.collect_garbage(request)
    paths = result.paths if request.action != GCAction.RETURN_LIVE else sorted(result.paths)
    return encode_strings(paths) + encode_int(result.bytes_freed) + encode_int(0)


@handler(Op.HAS_SUBSTITUTES)
def _has_substitutes(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_bool(store.has_substitutes(a[0]))


@handler(Op.QUERY_SUBSTITUTABLE_PATHS)
def _query_substitutable(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return _paths(sd, store.query_substitutable_paths(a[0]))


@handler(Op.QUERY_SUBSTITUTABLE_PATH_INFOS)
def _query_subst_infos(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    infos = sorted(store.query_substitutable_path_infos(a[0]), key=lambda i: i.path)
    return encode_int(len(infos)) + b"".join(
        encode_string(sd.display(i.path))
        + _opt_path(sd, i.deriver)
        + _paths(sd, i.references)
        + encode_int(i.download_size)
        + encode_int(i.nar_size)
        for i in infos
    )


@handler(Op.QUERY_SUBSTITUTABLE_PATH_INFO)
def _query_subst_info(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    try:
        path = sd.parse_lax(a[0])
    except InvalidStorePath:
        return encode_int(0)
    infos = store.query_substitutable_path_infos([path])
    if not infos:
        return encode_int(0)
    i = infos[0]
    return b"".join((
        encode_int(1),
        _opt_path(sd, i.deriver),
        _paths(sd, i.references),
        encode_int(i.download_size),
        encode_int(i.nar_size),
    ))  # fmt: skip


@handler(Op.QUERY_FAILED_PATHS)
def _query_failed(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_strings(sorted(store.query_failed_paths()))


@handler(Op.VERIFY_STORE)
def _verify(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_bool(store.verify_store(a[0], a[1]))


@handler(Op.BUILTIN_BUILDERS)
def _builtin_builders(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_strings(store.builtin_builders())


@handler(Op.SUBSTITUTE_URLS)
def _substitute_urls(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
    return encode_strings(store.substitute_urls())


def _acknowledged(action: Callable[[Store, tuple[Any, ...]], None]) -> Handler:
    """A handler for the opcodes whose only reply is the integer 1."""

    def run(store: Store, sd: StoreDir, io: SessionIO, a: tuple[Any, ...]) -> bytes:
        action(store, a)
        return encode_int(1)

    return run


HANDLERS.update({
    Op.ENSURE_PATH: _acknowledged(lambda store, a: store.ensure_path(a[0])),
    Op.ADD_TEMP_ROOT: _acknowledged(lambda store, a: store.add_temp_root(a[0])),
    Op.ADD_INDIRECT_ROOT: _acknowledged(lambda store, a: store.add_indirect_root(a[0])),
    Op.SYNC_WITH_GC: _acknowledged(lambda store, a: store.sync_with_gc()),
    Op.CLEAR_FAILED_PATHS: _acknowledged(lambda store, a: store.clear_failed_paths(a[0])),
    Op.OPTIMISE_STORE: _acknowledged(lambda store, a: store.optimise_store()),
})  # fmt: skip

assert set(HANDLERS) == set(Op), set(Op) - set(HANDLERS)
