"""One client connection, served in its own worker process.

The loop owns the socket: it feeds received bytes to `protocol.server.ServerConnection`, runs
the opcode handler against the `LocalStore`, and sends what the connection produced.  It also
provides the streaming payloads (the inline NAR of AddToStore, STDERR_READ for ImportPaths,
STDERR_WRITE for ExportPath) and upstream's error rules: errors inside "work mode" are reported
and the session goes on; malformed requests are reported and end the session
(spec/worker-protocol.md §4.2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import sqlite3
from collections.abc import Callable

from guixsvc.daemon.localstore import LocalStore
from guixsvc.daemon.settings import Settings
from guixsvc.protocol.ops import Op
from guixsvc.protocol.server import (
    HANDLERS,
    NEED_DATA,
    Handshake,
    Request,
    ServerConnection,
    SessionIO,
)
from guixsvc.protocol.store_api import StoreError
from guixsvc.protocol.wire import ProtocolError
from guixsvc.store.config import StoreConfig
from guixsvc.store.db import StoreDatabase

log = logging.getLogger("guix-daemon")

RECV_SIZE = 64 * 1024
#: ExportPath output is buffered like upstream's TunnelSink before going out as STDERR_WRITE.
WRITE_BUFFER = 64 * 1024


class _ClientGone(Exception):
    pass


class Session(SessionIO):
    def __init__(
        self,
        sock: socket.socket,
        config: StoreConfig,
        settings: Settings,
        creds: tuple[int, int, int] | None,
        *,
        remote: bool,
        db: StoreDatabase | None = None,
    ) -> None:
        self.sock = sock
        self.db = db
        self.config = config
        self.settings = settings
        self.remote = remote
        self.peer_pid, self.peer_uid, self.peer_gid = creds if creds else (-1, -1, -1)
        self.trusted = self.peer_uid in (0, os.getuid()) and not remote
        self.conn = ServerConnection(config.store)
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self.store: LocalStore | None = None

    # -- socket plumbing -----------------------------------------------------------------------

    def _recv_view(self) -> memoryview:
        """Receive into the session's reusable buffer (a fresh 256 KiB bytes object per
        request costs an mmap/munmap pair); the view is valid until the next receive."""
        try:
            n = self.sock.recv_into(self._rbuf)
        except ConnectionResetError:
            n = 0
        return self._rview[:n]

    def _recv(self) -> None:
        data = self._recv_view()
        self.conn.receive_data(data if data else b"")

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                raise _ClientGone from None

    def log_to_client(self, level: int, text: str) -> None:
        if level <= self.settings.verbosity:
            self.conn.next(text if text.endswith("\n") else text + "\n")
            self._flush()

    def log_build_output(self, chunk: bytes) -> None:
        """Builder output goes to the client as it came, a chunk per STDERR_NEXT."""
        self.conn.next(chunk)
        self._flush()

    # -- SessionIO -------------------------------------------------------------------------------

    def feed_nar(self, consume: Callable[[memoryview], int], done: Callable[[], bool]) -> None:
        reader = self.conn.reader
        data = memoryview(reader.take_all())
        while True:
            if data:
                used = consume(data)
                if used < len(data):
                    reader.unread(bytes(data[used:]))
            if done():
                return
            data = self._recv_view()
            if not data:
                raise _ClientGone

    def read(self, limit: int) -> bytes:
        self.conn.read_request(limit)
        self._flush()
        while True:
            chunk = self.conn.read_chunk(limit)
            if chunk is not NEED_DATA:
                break
            self._recv()
        assert isinstance(chunk, bytes)
        if not chunk:
            raise StoreError("unexpected end-of-file")
        return chunk

    def write(self, data: bytes) -> None:
        self._pending_write.append(data)
        self._pending_size += len(data)
        if self._pending_size >= WRITE_BUFFER:
            self._drain_writes()

    def _drain_writes(self) -> None:
        if self._pending_write:
            self.conn.write(b"".join(self._pending_write))
            self._pending_write.clear()
            self._pending_size = 0
            self._flush()

    # -- the loop ------------------------------------------------------------------------------

    def _journal_fields(self) -> dict[str, object]:
        return {"GUIX_CLIENT_PID": self.peer_pid, "GUIX_CLIENT_UID": self.peer_uid}

    def run(self) -> None:
        self._pending_write: list[bytes] = []
        self._pending_size = 0
        if self.peer_pid >= 0:
            try:
                user = pwd.getpwuid(self.peer_uid).pw_name
            except KeyError:
                user = str(self.peer_uid)
            log.info(
                "accepted connection from pid %d, user %s%s",
                self.peer_pid,
                user,
                " (trusted)" if self.trusted else "",
                extra=self._journal_fields(),
            )
        try:
            self._serve()
        except (_ClientGone, EOFError):
            pass
        finally:
            if self.store is not None:
                self.store.close()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _serve(self) -> None:
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                if self.store is not None:  # after the handshake the client can read errors
                    conn.error(str(exc))
                    self._flush()
                log.info("closing connection: %s", exc)
                return
            if event is NEED_DATA:
                if conn.eof:
                    return
                self._flush()  # e.g. the handshake reply the client waits for
                self._recv()
                continue
            if isinstance(event, Handshake):
                if not self._open_store(event):
                    return
                continue
            assert isinstance(event, Request)
            if not self._perform(event):
                return

    def _open_store(self, handshake: Handshake) -> bool:
        if handshake.cpu_affinity is not None:
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(0, {handshake.cpu_affinity})
        try:
            self.store = LocalStore(
                self.config,
                self.settings,
                self.log_to_client,
                trusted=self.trusted,
                remote=self.remote,
                build_output=self.log_build_output,
                client_uid=self.peer_uid if self.peer_uid >= 0 else None,
                db=self.db,
                client_fd=self.sock.fileno(),
            )
            self.store.reserve_space(handshake.reserve_space)
            if self.peer_uid >= 0:
                with contextlib.suppress(KeyError, OSError):
                    self.store.create_user_profile_dir(pwd.getpwuid(self.peer_uid).pw_name)
        except (StoreError, OSError, sqlite3.Error) as exc:
            self.conn.error(str(exc))
            self._flush()
            return False
        self.conn.last()
        self._flush()
        return True

    def _perform(self, request: Request) -> bool:
        """Run one request; False when the connection must be closed."""
        assert self.store is not None
        op = request.op
        if op == Op.COLLECT_GARBAGE and self.remote:
            self.conn.error("Garbage collection is disabled for remote hosts.")
            self._flush()
            return False
        self._pending_write.clear()
        self._pending_size = 0
        try:
            reply = HANDLERS[op](self.store, self.config.store, self, request.args)
        except StoreError as exc:
            self._drain_writes()
            self.conn.error(str(exc), exc.status)
        except (_ClientGone, EOFError):
            raise
        except ProtocolError as exc:
            self.conn.error(str(exc))
            self._flush()
            return False
        except (OSError, sqlite3.Error, ValueError) as exc:
            log.debug(
                "error in %s: %s", op.name, exc, exc_info=True,
                extra={**self._journal_fields(), "GUIX_OPERATION": op.name},
            )  # fmt: skip
            self._drain_writes()
            self.conn.error(_describe(exc))
        else:
            self._drain_writes()
            self.conn.last(reply)
        self._flush()
        return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}" if exc.strerror else str(exc)
    return str(exc)
