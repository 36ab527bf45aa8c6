"""A blocking client for the worker protocol, for our own tools (`guixsvc gc`, publish) and tests.

It speaks what the Guile client speaks (protocol 0x163 by default, SetOptions layout of
spec/worker-protocol.md §7) so that what our tests exercise is what real clients send.
`GUIX_DAEMON_SOCKET` is honoured like upstream (file name, `file://`, `unix://`, `guix://`).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast
from urllib.parse import urlsplit

from guixsvc.protocol.ops import (
    PROTOCOL_VERSION,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    BuildMode,
    GCAction,
    Op,
    Stderr,
    major,
    minor,
)
from guixsvc.protocol.wire import (
    ProtocolError,
    encode_int,
    encode_pairs,
    encode_string,
    encode_strings,
)
from guixsvc.store import nar

DEFAULT_PORT = 44146
CLIENT_VERSION = 0x163


class DaemonError(Exception):
    """The daemon answered STDERR_ERROR."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ClientPathInfo:
    path: str
    deriver: str | None
    nar_hash: str  # base16
    references: list[str]
    registration_time: int
    nar_size: int


def default_socket() -> str:
    if "GUIX_DAEMON_SOCKET" in os.environ:
        return os.environ["GUIX_DAEMON_SOCKET"]
    state = os.environ.get("GUIX_STATE_DIRECTORY", "/var/guix")
    return os.path.join(state, "daemon-socket", "socket")


def connect(uri: str) -> socket.socket:
    """Open a stream socket to the daemon named by a GUIX_DAEMON_SOCKET-style value."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "unix"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(parts.path if parts.scheme else uri)
        return sock
    if parts.scheme == "guix":
        sock = socket.create_connection((parts.hostname or "localhost", parts.port or DEFAULT_PORT))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    # Upstream (`connect-to-daemon`, guix/store.scm) has no module for other schemes and
    # raises a store-connection error with ENOTSUP for the URI.
    raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP), uri)


class DaemonClient:
    """One connection to the daemon.  Methods mirror `(guix store)` procedures."""

    def __init__(
        self,
        uri: str | None = None,
        *,
        version: int = CLIENT_VERSION,
        reserve_space: bool = True,
        log: Callable[[str], object] | None = None,
    ) -> None:
        self.sock = connect(uri or default_socket())
        self.rfile = cast(BinaryIO, self.sock.makefile("rb", buffering=65536))
        self.version = version
        self.log = log
        self._handshake(reserve_space)

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise EOFError("unexpected end-of-file from the daemon")
        return data

    def read_int(self) -> int:
        return int.from_bytes(self._read_exact(8), "little")

    def read_bytes(self) -> bytes:
        n = self.read_int()
        data = self._read_exact(n + (-n) % 8)
        return data[:n]

    def read_string(self) -> str:
        return self.read_bytes().decode("utf-8", "surrogateescape")

    def read_strings(self) -> list[str]:
        return [self.read_string() for _ in range(self.read_int())]

    def _handshake(self, reserve_space: bool) -> None:
        self.sock.sendall(encode_int(WORKER_MAGIC_1))
        if self.read_int() != WORKER_MAGIC_2:
            raise ProtocolError("build daemon handshake failed")
        self.daemon_version = self.read_int()
        if major(self.daemon_version) != major(PROTOCOL_VERSION):
            raise ProtocolError("build daemon handshake failed")
        out = encode_int(self.version)
        if minor(self.version) >= 14:
            out += encode_int(0)
        if minor(self.version) >= 11:
            out += encode_int(1 if reserve_space else 0)
        self.sock.sendall(out)
        self.process_stderr()

    def process_stderr(
        self,
        sink: Callable[[bytes], None] | None = None,
        source: Callable[[int], bytes] | None = None,
    ) -> None:
        while True:
            code = self.read_int()
            if code == Stderr.LAST:
                return
            if code == Stderr.NEXT:
                text = self.read_string()
                if self.log:
                    self.log(text)
            elif code == Stderr.WRITE:
                data = self.read_bytes()
                if sink is None:
                    raise ProtocolError("unexpected STDERR_WRITE")
                sink(data)
            elif code == Stderr.READ:
                limit = self.read_int()
                if source is None:
                    raise ProtocolError("unexpected STDERR_READ")
                self.sock.sendall(encode_string(source(limit)))
            elif code == Stderr.ERROR:
                message = self.read_string()
                status = self.read_int() if minor(self.daemon_version) >= 8 else 1
                raise DaemonError(message, status)
            else:
                raise ProtocolError("invalid error code")

    def call(self, op: Op, *fields: bytes, **stderr: Callable) -> None:
        self.sock.sendall(encode_int(op) + b"".join(fields))
        self.process_stderr(**stderr)

    # -- operations ------------------------------------------------------------------------------

    def set_options(
        self,
        *,
        keep_failed: bool = False,
        keep_going: bool = False,
        fallback: bool = False,
        verbosity: int = 0,
        use_substitutes: bool = True,
        overrides: Iterable[tuple[str, str]] = (),
    ) -> None:
        fields = [
            encode_int(keep_failed), encode_int(keep_going), encode_int(fallback),
            encode_int(verbosity), encode_int(0), encode_int(0), encode_int(0), encode_int(1),
            encode_int(use_substitutes), encode_pairs(list(overrides)),
        ]  # fmt: skip
        self.call(Op.SET_OPTIONS, *fields)

    def is_valid_path(self, path: str) -> bool:
        self.call(Op.IS_VALID_PATH, encode_string(path))
        return self.read_int() != 0

    def query_valid_paths(self, paths: Iterable[str]) -> list[str]:
        self.call(Op.QUERY_VALID_PATHS, encode_strings(paths))
        return self.read_strings()

    def query_path_info(self, path: str) -> ClientPathInfo:
        self.call(Op.QUERY_PATH_INFO, encode_string(path))
        deriver = self.read_string() or None
        nar_hash = self.read_string()
        refs = self.read_strings()
        reg_time = self.read_int()
        size = self.read_int()
        return ClientPathInfo(path, deriver, nar_hash, refs, reg_time, size)

    def query_path_hash(self, path: str) -> str:
        self.call(Op.QUERY_PATH_HASH, encode_string(path))
        return self.read_string()

    def _path_query(self, op: Op, path: str) -> list[str]:
        self.call(op, encode_string(path))
        return self.read_strings()

    def query_references(self, path: str) -> list[str]:
        return self._path_query(Op.QUERY_REFERENCES, path)

    def query_referrers(self, path: str) -> list[str]:
        return self._path_query(Op.QUERY_REFERRERS, path)

    def query_valid_derivers(self, path: str) -> list[str]:
        return self._path_query(Op.QUERY_VALID_DERIVERS, path)

    def query_derivation_outputs(self, drv: str) -> list[str]:
        return self._path_query(Op.QUERY_DERIVATION_OUTPUTS, drv)

    def query_derivation_output_names(self, drv: str) -> list[str]:
        return self._path_query(Op.QUERY_DERIVATION_OUTPUT_NAMES, drv)

    def query_deriver(self, path: str) -> str | None:
        self.call(Op.QUERY_DERIVER, encode_string(path))
        return self.read_string() or None

    def query_path_from_hash_part(self, hash_part: str) -> str | None:
        self.call(Op.QUERY_PATH_FROM_HASH_PART, encode_string(hash_part))
        return self.read_string() or None

    def query_all_valid_paths(self) -> list[str]:
        self.call(Op.QUERY_ALL_VALID_PATHS)
        return self.read_strings()

    def add_text_to_store(
        self, name: str, text: bytes | str, references: Iterable[str] = ()
    ) -> str:
        self.call(
            Op.ADD_TEXT_TO_STORE,
            encode_string(name),
            encode_string(text),
            encode_strings(references),
        )
        return self.read_string()

    def add_nar_to_store(
        self, name: str, chunks: Iterable[bytes], *, recursive: bool = True, algo: str = "sha256"
    ) -> str:
        """AddToStore with a NAR given as byte chunks (sent inline, as the Guile client does)."""
        header = b"".join((
            encode_int(Op.ADD_TO_STORE), encode_string(name), encode_int(1),
            encode_int(1 if recursive else 0), encode_string(algo),
        ))  # fmt: skip
        self.sock.sendall(header)
        for chunk in chunks:
            self.sock.sendall(chunk)
        self.process_stderr()
        return self.read_string()

    def add_to_store(
        self, name: str, file_name: str, *, recursive: bool = True, algo: str = "sha256"
    ) -> str:
        return self.add_nar_to_store(name, nar.dump(file_name), recursive=recursive, algo=algo)

    def export_path(self, path: str, sign: bool = True) -> bytes:
        chunks: list[bytes] = []
        self.call(Op.EXPORT_PATH, encode_string(path), encode_int(sign), sink=chunks.append)
        self.read_int()
        return b"".join(chunks)

    def export_paths(self, paths: Iterable[str], sign: bool = True) -> Iterator[bytes]:
        """The multi-path export stream (what `guix archive --export` writes)."""
        for path in paths:
            yield encode_int(1)
            yield self.export_path(path, sign)
        yield encode_int(0)

    def import_paths(self, stream: BinaryIO) -> list[str]:
        def source(limit: int) -> bytes:
            return stream.read(limit)

        self.call(Op.IMPORT_PATHS, source=source)
        return self.read_strings()

    def build_paths(self, items: Iterable[str], mode: BuildMode = BuildMode.NORMAL) -> None:
        self.call(Op.BUILD_PATHS, encode_strings(items), encode_int(mode))
        self.read_int()

    def ensure_path(self, path: str) -> None:
        self.call(Op.ENSURE_PATH, encode_string(path))
        self.read_int()

    def add_temp_root(self, path: str) -> None:
        self.call(Op.ADD_TEMP_ROOT, encode_string(path))
        self.read_int()

    def add_indirect_root(self, file_name: str) -> None:
        self.call(Op.ADD_INDIRECT_ROOT, encode_string(file_name))
        self.read_int()

    def sync_with_gc(self) -> None:
        self.call(Op.SYNC_WITH_GC)
        self.read_int()

    def find_roots(self) -> dict[str, str]:
        self.call(Op.FIND_ROOTS)
        return {self.read_string(): self.read_string() for _ in range(self.read_int())}

    def collect_garbage(
        self, action: GCAction, paths: Iterable[str] = (), max_freed: int = 2**64 - 1
    ) -> tuple[list[str], int]:
        self.call(
            Op.COLLECT_GARBAGE, encode_int(action), encode_strings(paths), encode_int(0),
            encode_int(max_freed), encode_int(0), encode_int(0), encode_int(0),
        )  # fmt: skip
        paths_out = self.read_strings()
        freed = self.read_int()
        self.read_int()
        return paths_out, freed

    def query_failed_paths(self) -> list[str]:
        self.call(Op.QUERY_FAILED_PATHS)
        return self.read_strings()

    def clear_failed_paths(self, paths: Iterable[str]) -> None:
        self.call(Op.CLEAR_FAILED_PATHS, encode_strings(paths))
        self.read_int()

    def optimise_store(self) -> None:
        self.call(Op.OPTIMISE_STORE)
        self.read_int()

    def verify_store(self, check_contents: bool = False, repair: bool = False) -> bool:
        """True when errors remain (the raw reply; the Guile client negates it)."""
        self.call(Op.VERIFY_STORE, encode_int(check_contents), encode_int(repair))
        return self.read_int() != 0

    def builtin_builders(self) -> list[str]:
        self.call(Op.BUILTIN_BUILDERS)
        return self.read_strings()

    def substitute_urls(self) -> list[str]:
        self.call(Op.SUBSTITUTE_URLS)
        return self.read_strings()

    def has_substitutes(self, path: str) -> bool:
        self.call(Op.HAS_SUBSTITUTES, encode_string(path))
        return self.read_int() != 0

    def query_substitutable_paths(self, paths: Iterable[str]) -> list[str]:
        self.call(Op.QUERY_SUBSTITUTABLE_PATHS, encode_strings(paths))
        return self.read_strings()
