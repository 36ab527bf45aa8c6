"""A minimal client for Nix's worker protocol (Debian's nix-daemon 2.8, protocol 1.34).

The benchmark compares our daemon with the C++ nix-daemon on the operations the two protocols
share.  To keep the client-side cost equal, this is a subclass of our own `DaemonClient`: the
socket, buffered reads, `call()` and the ops whose layout is identical in both protocols
(IsValidPath, AddTextToStore) are literally the same code.  Only what differs is overridden:

- handshake: the client version is the lower of ours and the daemon's; after the obsolete CPU
  affinity and reserve-space fields the daemon sends its version string (minor >= 33);
- STDERR_ERROR carries a structured error (minor >= 26) and activities may be reported
  (STDERR_START_ACTIVITY / STOP_ACTIVITY / RESULT, minor >= 20);
- QueryPathInfo replies start with a "valid" flag (minor >= 17) and end with ultimate, sigs
  and ca (minor >= 16);
- AddToStore (minor >= 25) sends name, content-address method ("fixed:r:sha256"), references
  and repair, then the NAR as length-prefixed frames ending with an empty one, and answers with
  a whole ValidPathInfo.  Below 25 the daemon takes Guix's layout (inline NAR), which is what
  `DaemonClient.add_nar_to_store` sends, so `version=0x118` gives that legacy path.
"""

from __future__ import annotations

from collections.abc import Iterable

from guixsvc.protocol.client import ClientPathInfo, DaemonClient, DaemonError
from guixsvc.protocol.ops import WORKER_MAGIC_1, WORKER_MAGIC_2, Op, Stderr, major, minor
from guixsvc.protocol.wire import ProtocolError, encode_int, encode_string

#: Nix 2.8's PROTOCOL_VERSION (1.34).
NIX_PROTOCOL_VERSION = 0x122

STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54


class NixClient(DaemonClient):
    """One connection to a nix-daemon; same methods as `DaemonClient` for the shared ops."""

    nix_version: str = ""

    def __init__(self, uri: str, *, version: int = NIX_PROTOCOL_VERSION) -> None:
        super().__init__(uri, version=version, reserve_space=False)

    def _handshake(self, reserve_space: bool) -> None:
        self.sock.sendall(encode_int(WORKER_MAGIC_1))
        if self.read_int() != WORKER_MAGIC_2:
            raise ProtocolError("protocol mismatch")
        self.daemon_version = self.read_int()
        if major(self.daemon_version) != major(NIX_PROTOCOL_VERSION):
            raise ProtocolError("Nix daemon protocol version not supported")
        # The daemon interprets every later message by the version the client announces.
        self.version = min(self.version, self.daemon_version)
        out = encode_int(self.version)
        if minor(self.version) >= 14:
            out += encode_int(0)  # no CPU affinity
        if minor(self.version) >= 11:
            out += encode_int(1 if reserve_space else 0)
        self.sock.sendall(out)
        if minor(self.version) >= 33:
            self.nix_version = self.read_string()
        self.process_stderr()

    def _read_fields(self) -> None:
        for _ in range(self.read_int()):
            if self.read_int() == 0:
                self.read_int()
            else:
                self.read_bytes()

    def process_stderr(self, sink=None, source=None) -> None:  # type: ignore[no-untyped-def]
        while True:
            code = self.read_int()
            if code == Stderr.LAST:
                return
            if code == Stderr.NEXT:
                text = self.read_string()
                if self.log:
                    self.log(text)
            elif code == Stderr.ERROR:
                if minor(self.version) >= 26:
                    self.read_string()  # "Error"
                    self.read_int()  # level
                    self.read_string()  # name
                    message = self.read_string()
                    self.read_int()  # position (always 0)
                    for _ in range(self.read_int()):  # traces
                        self.read_int()
                        self.read_string()
                    raise DaemonError(message, 1)
                message = self.read_string()
                raise DaemonError(message, self.read_int())
            elif code == STDERR_START_ACTIVITY:
                self.read_int(), self.read_int(), self.read_int()  # id, level, type
                text = self.read_string()
                self._read_fields()
                self.read_int()  # parent
                if self.log and text:
                    self.log(text)
            elif code == STDERR_STOP_ACTIVITY:
                self.read_int()
            elif code == STDERR_RESULT:
                self.read_int(), self.read_int()
                self._read_fields()
            elif code == Stderr.WRITE and sink is not None:
                sink(self.read_bytes())
            elif code == Stderr.READ and source is not None:
                self.sock.sendall(encode_string(source(self.read_int())))
            else:
                raise ProtocolError(f"unexpected message {code:#x} from the daemon")

    def _read_path_info(self, path: str) -> ClientPathInfo:
        deriver = self.read_string() or None
        nar_hash = self.read_string()
        refs = self.read_strings()
        reg_time = self.read_int()
        size = self.read_int()
        if minor(self.version) >= 16:
            self.read_int()  # ultimate
            self.read_strings()  # signatures
            self.read_string()  # content address
        return ClientPathInfo(path, deriver, nar_hash, refs, reg_time, size)

    def query_path_info(self, path: str) -> ClientPathInfo:
        self.call(Op.QUERY_PATH_INFO, encode_string(path))
        if minor(self.version) >= 17 and not self.read_int():
            raise DaemonError(f"path '{path}' is not valid")
        return self._read_path_info(path)

    def add_nar_to_store(
        self, name: str, chunks: Iterable[bytes], *, recursive: bool = True, algo: str = "sha256"
    ) -> str:
        if minor(self.version) < 25:
            return super().add_nar_to_store(name, chunks, recursive=recursive, algo=algo)
        method = f"fixed:{'r:' if recursive else ''}{algo}"
        header = b"".join((
            encode_int(Op.ADD_TO_STORE), encode_string(name), encode_string(method),
            encode_int(0), encode_int(0),
        ))  # fmt: skip
        self.sock.sendall(header)
        for chunk in chunks:
            if chunk:
                self.sock.sendmsg([encode_int(len(chunk)), chunk])
        self.sock.sendall(encode_int(0))
        self.process_stderr()
        path = self.read_string()
        self._read_path_info(path)
        return path
