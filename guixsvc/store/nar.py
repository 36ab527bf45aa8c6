"""NAR (Nix ARchive): streaming serialisation, a push parser and restore/null sinks.

NAR is the canonical serialisation of a store item: its SHA-256 is the item's NAR hash, it is
what `guix publish` serves, what ImportPaths/ExportPath carry and what AddToStore receives.  The
writer must be byte-identical to upstream (`nix/libutil/archive.cc`, spec store.md §5); the
parser must accept what the daemon accepts and reject what it rejects, and work incrementally on
socket buffers (it reports how many bytes belonged to the archive so the caller can hand the
rest to the next protocol message).

Memory stays bounded: `dump` reads files in 1 MiB chunks and batches small tokens, `NarParser`
hands file contents to its sink as slices of the buffers it is fed and only buffers at most one
token of structure.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from guixsvc.store.hashes import new_hasher
from guixsvc.store.safefs import ENTER, LEAVE, TreeChanged, open_nofollow, walk

__all__ = [
    "DEFAULT_MAX_TOKEN",
    "MAX_NAR_DEPTH",
    "MAX_NAR_ENTRIES",
    "MAX_NAR_PATH",
    "MAX_SYMLINK_TARGET",
    "NarError",
    "NarParser",
    "NarSink",
    "NullSink",
    "RestoreSink",
    "dump",
    "dump_regular",
    "hash_path",
    "regular_prefix",
    "regular_suffix",
    "restore",
]

NAR_VERSION_MAGIC = b"nix-archive-1"

DEFAULT_MAX_TOKEN = 64 * 1024
"""Largest non-content token (name, tag, executable argument) the parser accepts."""

MAX_SYMLINK_TARGET = 4096
"""Largest symlink target the parser accepts (Linux PATH_MAX)."""

MAX_NAR_DEPTH = 10_000
"""Deepest directory nesting an archive may have (the top directory is level 0).

Upstream has no explicit bound (its recursive parser and path-based restore fail somewhere past
PATH_MAX); legitimate store items stay far below, and the bound keeps one archive from costing
more than linear memory and bounded time in the parser and the restore sink."""

MAX_NAR_PATH = 65_536
"""Longest path (in characters, components joined with `/`) of a node inside an archive."""

MAX_NAR_ENTRIES = 16_000_000
"""Most directory entries (files, directories and symlinks below the top) an archive may have."""

_READ_CHUNK = 1 << 20  # file contents are read this many bytes at a time
_SMALL_FILE = 64 * 1024  # files up to this size are batched with the surrounding tokens
_FLUSH = 256 * 1024  # batched output is yielded once it reaches this size
_MAX_OPEN_DIRS = 64  # directory fds a RestoreSink keeps open at most (plus the top one)

_ZEROS = bytes(8)


class NarError(ValueError):
    """A malformed archive, or a file that cannot be archived (upstream messages)."""


def _bad(msg: str) -> NarError:
    return NarError(f"bad archive: {msg}")


def _pad_len(n: int) -> int:
    return (8 - n % 8) % 8


def _str(data: bytes) -> bytes:
    """A protocol string: u64 LE length, the bytes, zero padding to a multiple of 8."""
    n = len(data)
    return n.to_bytes(8, "little") + data + _ZEROS[: _pad_len(n)]


# Pre-serialised token sequences.
_HEADER = _str(NAR_VERSION_MAGIC)
_OPEN = _str(b"(")
_CLOSE = _str(b")")
_REGULAR = _OPEN + _str(b"type") + _str(b"regular")
_EXECUTABLE = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _str(b"type") + _str(b"symlink") + _str(b"target")
_DIRECTORY = _OPEN + _str(b"type") + _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")
_CLOSE2 = _CLOSE + _CLOSE


# --------------------------------------------------------------------------------------------
# Writing


def dump_regular(data: bytes, executable: bool = False) -> bytes:
    """The NAR of a single regular file with contents `data`."""
    return b"".join(
        (
            _HEADER,
            _REGULAR,
            _EXECUTABLE if executable else b"",
            _CONTENTS,
            len(data).to_bytes(8, "little"),
            data,
            _ZEROS[: _pad_len(len(data))],
            _CLOSE,
        )
    )


def regular_prefix(executable: bool, size: int) -> bytes:
    """The NAR bytes of a single regular file before its contents."""
    return (
        _HEADER
        + _REGULAR
        + (_EXECUTABLE if executable else b"")
        + _CONTENTS
        + size.to_bytes(8, "little")
    )


def regular_suffix(size: int) -> bytes:
    """The NAR bytes of a single regular file after its `size` bytes of contents."""
    return _ZEROS[: _pad_len(size)] + _CLOSE


def _read_exactly(fd: int, size: int, path: bytes) -> Iterator[bytes]:
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, _READ_CHUNK))
        if not chunk:
            raise NarError(f"unexpected end-of-file reading `{os.fsdecode(path)}'")
        left -= len(chunk)
        yield chunk


@dataclass(frozen=True)
class FileRegion:
    """`size` bytes of the open file `fd` from `offset`, a big file's contents inside a NAR.

    The descriptor belongs to `nar_parts` and stays open only until the generator is resumed."""

    fd: int
    size: int
    path: str
    offset: int = 0


def nar_parts(
    path: str | os.PathLike[str] | bytes,
) -> Generator[bytes | FileRegion, None, None]:
    """The NAR of `path` as framing bytes and, for regular files above 64 KiB, file regions.

    Put together (regions read in full) the parts are exactly `dump(path)`; `guix publish`
    hands the regions to the kernel with `sendfile`.  Small tokens and small files are batched
    into chunks of about 256 KiB.  The tree is walked by `safefs.walk`: relative to directory
    descriptors, never following a symlink, without recursion, so neither depth nor path length
    is limited; a file replaced or resized during the walk raises TreeChanged."""
    buf = bytearray(_HEADER)
    for node in walk(os.fsdecode(path), sort=True):
        kind, depth = node.kind, node.depth
        if kind == LEAVE:
            buf += _CLOSE2 if depth else _CLOSE
            if len(buf) >= _FLUSH:
                yield bytes(buf)
                buf.clear()
            continue
        if depth:
            buf += _ENTRY
            buf += _str(os.fsencode(node.name))
            buf += _NODE
        st = node.st
        mode = st.st_mode
        if kind == ENTER:
            buf += _DIRECTORY
        elif stat.S_ISREG(mode):
            size = st.st_size
            buf += _REGULAR
            if mode & stat.S_IXUSR:
                buf += _EXECUTABLE
            buf += _CONTENTS
            buf += size.to_bytes(8, "little")
            if size:
                fd = open_nofollow(node.name, node.parent_fd)
                try:
                    fst = os.fstat(fd)
                    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_size != size:
                        raise TreeChanged(node.path)
                    if size <= _SMALL_FILE:
                        for chunk in _read_exactly(fd, size, os.fsencode(node.path)):
                            buf += chunk
                    else:
                        yield bytes(buf)
                        buf.clear()
                        yield FileRegion(fd, size, node.path)
                finally:
                    os.close(fd)
                buf += _ZEROS[: _pad_len(size)]
            buf += _CLOSE2 if depth else _CLOSE
        elif stat.S_ISLNK(mode):
            buf += _SYMLINK
            buf += _str(os.readlink(os.fsencode(node.name), dir_fd=node.parent_fd))
            buf += _CLOSE2 if depth else _CLOSE
        else:
            raise NarError(f"file `{node.path}' has an unsupported type")
        if len(buf) >= _FLUSH:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def dump(path: str | os.PathLike[str] | bytes) -> Iterator[bytes]:
    """Serialise the file system object at `path` as a NAR, as a stream of byte chunks.

    Directory entries are sorted bytewise; big files' contents are read in chunks of 1 MiB (see
    `nar_parts` for the walk and batching).  Raises NarError for file types NAR cannot represent
    (`file `X' has an unsupported type`) and OSError for I/O errors.
    """
    for part in nar_parts(path):
        if isinstance(part, FileRegion):
            yield from _read_exactly(part.fd, part.size, os.fsencode(part.path))
        else:
            yield part


def hash_path(path: str | os.PathLike[str] | bytes, algo: str = "sha256") -> tuple[bytes, int]:
    """Digest of the NAR serialisation of `path` and the NAR's size (upstream `hashPath`)."""
    hasher = new_hasher(algo)
    size = 0
    for chunk in dump(path):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.digest(), size


# --------------------------------------------------------------------------------------------
# Sinks


class NarSink(Protocol):
    """Receives the file system objects of an archive, in archive order.

    `path` is the relative path inside the archive: `""` for the top node, `"a/b"` for
    nested nodes, decoded from bytes with `os.fsdecode` (use `os.fsencode` to get the bytes
    back).  Components are already validated (non-empty, not `.`/`..`, no `/` or NUL) and
    sorted.  A regular file is `file_start`, any number of `file_data`, `file_end`.

    A sink may also define `file_executable()`: it is called between `file_start` and
    `file_end` in the rare (lenient) case where `executable` follows `contents` in the
    archive; sinks without it get `file_start(..., executable=False, ...)` in that case.
    """

    def directory(self, path: str) -> None: ...

    def symlink(self, path: str, target: bytes) -> None: ...

    def file_start(self, path: str, executable: bool, size: int) -> None: ...

    def file_data(self, chunk: memoryview | bytes) -> None: ...

    def file_end(self) -> None: ...


class NullSink:
    """A sink that discards everything (for validating or hashing a NAR)."""

    def directory(self, path: str) -> None:
        pass

    def symlink(self, path: str, target: bytes) -> None:
        pass

    def file_start(self, path: str, executable: bool, size: int) -> None:
        pass

    def file_data(self, chunk: memoryview | bytes) -> None:
        pass

    def file_end(self) -> None:
        pass


class _OpenDir:
    __slots__ = ("dev", "fd", "ino", "name")

    def __init__(self, name: str, fd: int) -> None:
        self.name = name  # last component of the directory's path inside the archive
        self.fd = fd  # -1 while closed
        st = os.fstat(fd)
        self.dev, self.ino = st.st_dev, st.st_ino


class RestoreSink:
    """Creates the archive's tree at `dest`, which must not exist (upstream `RestoreSink`).

    Directories are created with mode 0777 and files with `O_CREAT|O_EXCL` and mode 0666 (both
    minus the umask); executable files then get `+x` for user, group and others, as upstream
    does with `fchmod`.  Everything below `dest` is created relative to file descriptors of
    directories this sink created and opened with `O_NOFOLLOW`, so a symlink in the archive (or
    one planted concurrently) is never followed.  Use as a context manager, or call `close()`.
    """

    def __init__(self, dest: str | os.PathLike[str] | bytes) -> None:
        self.dest = os.fsencode(dest)
        # Chain of directories from the top to the current one (names only, so memory stays
        # linear in the depth).  To bound the number of descriptors in very deep trees, only
        # the top one and the last _MAX_OPEN_DIRS are kept open; a closed one is reopened
        # through `..` of its child (checked to be the same inode) when the walk climbs back.
        self._dirs: list[_OpenDir] = []
        self._fd = -1

    # context management ----------------------------------------------------------------------

    def close(self) -> None:
        """Close every file descriptor still open."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        while self._dirs:
            fd = self._dirs.pop().fd
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> RestoreSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # helpers ---------------------------------------------------------------------------------

    def _locate(self, path: str) -> tuple[int | None, bytes, str]:
        """Directory fd (None for the top node), name relative to it, and a display name.

        Events come in pre-order from NarParser, so the parent of `path` is the directory at
        depth `path.count("/")` of the current chain.
        """
        if path == "":
            return None, self.dest, os.fsdecode(self.dest)
        parent_depth = path.count("/")
        name = path[path.rfind("/") + 1 :]
        dirs = self._dirs
        while len(dirs) > parent_depth + 1:
            child = dirs.pop()
            try:
                if dirs[-1].fd < 0:
                    self._reopen_parent(child)
            finally:
                os.close(child.fd)
        if len(dirs) != parent_depth + 1:
            raise NarError(f"cannot restore `{path}': its parent is not a restored directory")
        display = os.fsdecode(self.dest) + "/" + path
        return dirs[-1].fd, os.fsencode(name), display

    def _reopen_parent(self, child: _OpenDir) -> None:
        parent = self._dirs[-1]
        fd = os.open(
            "..", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=child.fd
        )
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (parent.dev, parent.ino):
            os.close(fd)
            raise NarError(f"directory `{os.fsdecode(self.dest)}' was modified during restore")
        parent.fd = fd

    def _push_dir(self, name: str, fd: int) -> None:
        dirs = self._dirs
        dirs.append(_OpenDir(name, fd))
        victim = len(dirs) - 1 - _MAX_OPEN_DIRS
        if victim >= 1 and dirs[victim].fd >= 0:
            os.close(dirs[victim].fd)
            dirs[victim].fd = -1

    # NarSink ---------------------------------------------------------------------------------

    def directory(self, path: str) -> None:
        dir_fd, name, display = self._locate(path)
        try:
            os.mkdir(name, 0o777, dir_fd=dir_fd)
            fd = os.open(
                name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"creating directory `{display}'") from exc
        self._push_dir(path[path.rfind("/") + 1 :], fd)

    def symlink(self, path: str, target: bytes) -> None:
        dir_fd, name, display = self._locate(path)
        try:
            os.symlink(target, name, dir_fd=dir_fd)
        except OSError as exc:
            raise OSError(
                exc.errno, f"creating symlink from `{display}' to `{os.fsdecode(target)}'"
            ) from exc

    def file_start(self, path: str, executable: bool, size: int) -> None:
        dir_fd, name, display = self._locate(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(name, flags, 0o666, dir_fd=dir_fd)
        except OSError as exc:
            raise OSError(exc.errno, f"creating file `{display}'") from exc
        if executable:
            self.file_executable()
        if size >= _READ_CHUNK:
            try:
                os.posix_fallocate(self._fd, 0, size)
            except OSError as exc:  # only an optimisation
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise OSError(
                        exc.errno, f"preallocating file of {size} bytes for `{display}'"
                    ) from exc

    def file_executable(self) -> None:
        st = os.fstat(self._fd)
        os.fchmod(self._fd, stat.S_IMODE(st.st_mode) | 0o111)

    def file_data(self, chunk: memoryview | bytes) -> None:
        fd = self._fd
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def file_end(self) -> None:
        os.close(self._fd)
        self._fd = -1


# --------------------------------------------------------------------------------------------
# Parsing

# Byte-level modes of the parser.
_M_LEN = 0  # reading the 8-byte length of a string token
_M_STR = 1  # reading a string token's bytes and padding
_M_SIZE = 2  # reading the 8-byte size of file contents
_M_DATA = 3  # passing file contents to the sink
_M_PAD = 4  # reading the padding after file contents

# Grammar states: what the next string token must be.
_S_HEADER = 0  # "nix-archive-1"
_S_OPEN = 1  # "(" opening a node
_S_TYPE_TAG = 2  # "type"
_S_TYPE = 3  # "regular" / "directory" / "symlink"
_S_FIELD = 4  # a field of the current node, or ")"
_S_EXEC_ARG = 5  # the (ignored) string after "executable"
_S_TARGET = 6  # symlink target
_S_ENTRY_OPEN = 7  # "(" after "entry"
_S_ENTRY_NAME_TAG = 8  # "name"
_S_ENTRY_NAME = 9  # the entry name
_S_ENTRY_NODE_TAG = 10  # "node"
_S_ENTRY_CLOSE = 11  # ")" closing an entry

# Node types.
_T_UNKNOWN = 0
_T_REGULAR = 1
_T_DIRECTORY = 2
_T_SYMLINK = 3

_TYPES = {b"regular": _T_REGULAR, b"directory": _T_DIRECTORY, b"symlink": _T_SYMLINK}


class _Node:
    __slots__ = ("contents", "executable", "name_len", "prev_name", "target", "type")

    def __init__(self, name_len: int) -> None:
        self.name_len = name_len  # characters this node adds to the parser's current path
        self.type = _T_UNKNOWN
        self.executable = False
        self.contents = False  # "contents" seen (regular files)
        self.target = False  # "target" seen (symlinks)
        self.prev_name = b""  # last entry name (directories)


def _show(token: bytes) -> str:
    return os.fsdecode(token)


class NarParser:
    """Push parser for NAR streams.

    Call `feed(data)` with successive pieces of input; each call returns the number of bytes of
    `data` that belong to the archive (all of them until the archive's last `)` is inside
    `data`).  Once `done` is true, further `feed` calls consume nothing.  Call `finish()` at
    end of input: it raises NarError("unexpected end-of-file") if the archive is incomplete.

    File contents are passed to the sink as memoryview slices of the fed data (valid only for
    the duration of the `file_data` call), never buffered; at most one structural token is
    buffered between calls.  Tokens other than contents are limited to `max_token` bytes and
    symlink targets to `MAX_SYMLINK_TARGET` bytes.

    Checks follow upstream's `parseDump`: the header, one `type` per node, known fields only,
    valid entry names (`NAR contains invalid file name `N'`), strictly increasing names per
    directory (`NAR directory is not sorted`), zero padding.  Like the daemon, `executable` and
    `contents` may come in either order inside a regular-file node, and the string after
    `executable` is ignored.  Structures upstream would silently accept but no writer produces
    (nodes without a type, symlinks without a target, entries without a name or node, several
    `contents` fields) are rejected.
    """

    def __init__(self, sink: NarSink, max_token: int = DEFAULT_MAX_TOKEN) -> None:
        self.sink = sink
        self.max_token = max_token
        self._fast_limit = min(max_token, MAX_SYMLINK_TARGET)
        self.done = False
        self.bytes_consumed = 0
        self._error: NarError | None = None
        self._mode = _M_LEN
        self._want = 8  # bytes the current fixed-size read needs
        self._buf = bytearray()  # partial fixed-size read
        self._str_len = 0  # length of the string token being read
        self._left = 0  # file content bytes still to pass through
        self._data_size = 0  # size of the current file's contents
        self._state = _S_HEADER
        self._stack: list[_Node] = []
        self._path = ""  # path of the innermost open node ("" for the top), "a/b" below
        self.entries = 0  # directory entries seen so far
        self._entry_name = b""
        self._late_exec = getattr(sink, "file_executable", None)

    # public ----------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume bytes of `data` up to the end of the archive; return how many."""
        if self._error is not None:
            raise self._error
        if self.done:
            return 0
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        end = len(view)
        pos = 0
        try:
            while pos < end and not self.done:
                if self._mode == _M_DATA:
                    k = min(self._left, end - pos)
                    self.sink.file_data(view[pos : pos + k])
                    pos += k
                    self._left -= k
                    if self._left == 0:
                        self._end_data()
                    continue
                buf = self._buf
                if self._mode == _M_LEN and not buf and end - pos >= 8 and self._state != _S_HEADER:
                    # Fast path: a whole small token is available; no intermediate state.
                    # Anything unusual (long, header) takes the general path for its checks.
                    n = int.from_bytes(view[pos : pos + 8], "little")
                    if n <= self._fast_limit:
                        start = pos + 8
                        stop = start + n + (-n & 7)
                        if stop <= end:
                            if (
                                stop > start + n
                                and view[start + n : stop] != _ZEROS[: stop - start - n]
                            ):
                                raise NarError("non-zero padding")
                            tok = view[start : start + n].tobytes()
                            pos = stop
                            self._token(tok)
                            continue
                want = self._want
                if not buf and end - pos >= want:
                    chunk: bytes = view[pos : pos + want].tobytes()
                    pos += want
                else:
                    take = min(want - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < want:
                        break
                    chunk = bytes(buf)
                    buf.clear()
                self._got(chunk)
        except NarError as exc:
            self._error = exc
            self.bytes_consumed += pos
            raise
        except BaseException:
            self.bytes_consumed += pos
            raise
        self.bytes_consumed += pos
        return pos

    def finish(self) -> None:
        """Declare the end of input; raise NarError if the archive is incomplete."""
        if self._error is not None:
            raise self._error
        if not self.done:
            self._error = NarError("unexpected end-of-file")
            raise self._error

    # byte level ------------------------------------------------------------------------------

    def _got(self, chunk: bytes) -> None:
        mode = self._mode
        if mode == _M_LEN:
            n = int.from_bytes(chunk, "little")
            if self._state == _S_HEADER and n != len(NAR_VERSION_MAGIC):
                raise _bad("input doesn't look like a normalized archive")
            if n >> 32:
                raise NarError("implementation cannot deal with > 32-bit integers")
            limit = MAX_SYMLINK_TARGET if self._state == _S_TARGET else self.max_token
            if n > limit:
                raise _bad(f"string of {n} bytes is too long")
            if n == 0:
                self._token(b"")
            else:
                self._mode = _M_STR
                self._str_len = n
                self._want = n + _pad_len(n)
        elif mode == _M_STR:
            n = self._str_len
            if chunk[n:].count(0) != len(chunk) - n:
                if self._state == _S_HEADER:  # upstream turns any header error into this
                    raise _bad("input doesn't look like a normalized archive")
                raise NarError("non-zero padding")
            self._mode = _M_LEN
            self._want = 8
            self._token(chunk[:n])
        elif mode == _M_SIZE:
            size = int.from_bytes(chunk, "little")
            self._data_size = size
            node = self._stack[-1]
            self.sink.file_start(self._path, node.executable, size)
            if size:
                self._mode = _M_DATA
                self._left = size
            else:
                self._mode = _M_LEN
                self._want = 8
        else:  # _M_PAD
            if chunk.count(0) != len(chunk):
                raise NarError("non-zero padding")
            self._mode = _M_LEN
            self._want = 8

    def _end_data(self) -> None:
        pad = _pad_len(self._data_size)
        if pad:
            self._mode = _M_PAD
            self._want = pad
        else:
            self._mode = _M_LEN
            self._want = 8

    # grammar level ---------------------------------------------------------------------------

    def _token(self, tok: bytes) -> None:
        state = self._state
        if state == _S_FIELD:
            self._field(tok)
        elif state == _S_OPEN:
            if tok != b"(":
                raise _bad("expected open tag")
            self._state = _S_TYPE_TAG
        elif state == _S_TYPE_TAG:
            # Upstream allows fields in any order but every other field depends on the type,
            # so the first field has to be "type" for a node to be meaningful.
            if tok == b"type":
                self._state = _S_TYPE
            elif tok == b")":
                raise _bad("node without a type")
            else:
                raise _bad(f"unknown field {_show(tok)}")
        elif state == _S_TYPE:
            self._set_type(tok)
        elif state == _S_ENTRY_OPEN:
            if tok != b"(":
                raise _bad("expected open tag")
            self._state = _S_ENTRY_NAME_TAG
        elif state == _S_ENTRY_NAME_TAG:
            if tok == b"name":
                self._state = _S_ENTRY_NAME
            elif tok in (b"node", b")"):
                raise _bad("entry name missing")
            else:
                raise _bad(f"unknown field {_show(tok)}")
        elif state == _S_ENTRY_NAME:
            self._entry(tok)
        elif state == _S_ENTRY_NODE_TAG:
            if tok == b"node":
                name = _show(self._entry_name)
                if len(self._stack) > MAX_NAR_DEPTH:
                    raise _bad(f"directory tree deeper than {MAX_NAR_DEPTH} levels")
                self.entries += 1
                if self.entries > MAX_NAR_ENTRIES:
                    raise _bad(f"more than {MAX_NAR_ENTRIES} entries")
                old = self._path
                self._path = name if old == "" else old + "/" + name
                if len(self._path) > MAX_NAR_PATH:
                    raise _bad(f"file name longer than {MAX_NAR_PATH} bytes")
                self._stack.append(_Node(len(self._path) - len(old)))
                self._state = _S_OPEN
            elif tok == b")":
                raise _bad("entry node missing")
            else:
                raise _bad(f"unknown field {_show(tok)}")
        elif state == _S_ENTRY_CLOSE:
            if tok != b")":
                raise _bad(f"unknown field {_show(tok)}")
            self._state = _S_FIELD
        elif state == _S_EXEC_ARG:
            self._state = _S_FIELD
        elif state == _S_TARGET:
            node = self._stack[-1]
            node.target = True
            self.sink.symlink(self._path, tok)
            self._state = _S_FIELD
        else:  # _S_HEADER
            if tok != NAR_VERSION_MAGIC:
                raise _bad("input doesn't look like a normalized archive")
            self._stack.append(_Node(0))
            self._state = _S_OPEN

    def _set_type(self, tok: bytes) -> None:
        node = self._stack[-1]
        t = _TYPES.get(tok)
        if t is None:
            raise _bad(f"unknown file type {_show(tok)}")
        node.type = t
        if t == _T_DIRECTORY:
            self.sink.directory(self._path)
        self._state = _S_FIELD

    def _field(self, tok: bytes) -> None:
        node = self._stack[-1]
        t = node.type
        if tok == b")":
            self._close_node(node)
        elif tok == b"type":
            raise _bad("multiple type fields")
        elif t == _T_REGULAR and tok == b"contents":
            if node.contents:
                raise _bad("multiple contents fields")
            node.contents = True
            self._mode = _M_SIZE  # a u64 size, then the contents, then padding
            self._want = 8
        elif t == _T_REGULAR and tok == b"executable":
            if node.contents and not node.executable and self._late_exec is not None:
                self._late_exec()
            node.executable = True
            self._state = _S_EXEC_ARG
        elif t == _T_DIRECTORY and tok == b"entry":
            self._state = _S_ENTRY_OPEN
        elif t == _T_SYMLINK and tok == b"target":
            if node.target:
                raise _bad("multiple target fields")
            self._state = _S_TARGET
        else:
            raise _bad(f"unknown field {_show(tok)}")

    def _entry(self, name: bytes) -> None:
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise NarError(f"NAR contains invalid file name `{_show(name)}'")
        parent = self._stack[-1]
        if name <= parent.prev_name:
            raise NarError("NAR directory is not sorted")
        parent.prev_name = name
        self._entry_name = name
        self._state = _S_ENTRY_NODE_TAG

    def _close_node(self, node: _Node) -> None:
        t = node.type
        if t == _T_REGULAR:
            if not node.contents:
                self.sink.file_start(self._path, node.executable, 0)
            self.sink.file_end()
        elif t == _T_SYMLINK and not node.target:
            raise _bad("symlink without a target")
        self._stack.pop()
        if node.name_len:
            self._path = self._path[: len(self._path) - node.name_len]
        if self._stack:
            self._state = _S_ENTRY_CLOSE
        else:
            self.done = True


def restore(chunks: Iterable[bytes | memoryview], dest: str | os.PathLike[str] | bytes) -> int:
    """Restore the NAR given as `chunks` at `dest`; return the NAR size.

    Raises NarError if the input is malformed, truncated, or has bytes after the archive.
    """
    with RestoreSink(dest) as sink:
        parser = NarParser(sink)
        for chunk in chunks:
            used = parser.feed(chunk)
            if used != len(chunk):
                raise NarError("bad archive: trailing data after the archive")
        parser.finish()
        return parser.bytes_consumed
