"""LocalStore: the store interface of `protocol.store_api` implemented on a local store.

This is where store items are made the way upstream makes them (spec/store.md §8): content goes
to a staging name inside the store (temp-rooted), is canonicalised, renamed into place under the
item's path lock, deduplicated, and registered in one database transaction.  A failure at any
point removes what was written, so nothing half-valid is ever left behind.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import itertools
import logging
import os
import pwd
import re
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from guixsvc.daemon.settings import Settings, SettingsError
from guixsvc.protocol.ops import (
    EXPORT_MAGIC,
    READ_CHUNK,
    AddToStoreRequest,
    BuildMode,
    ClientOptions,
    GCRequest,
)
from guixsvc.protocol.store_api import (
    GCResult,
    NarFeeder,
    PathInfo,
    ReadSource,
    Store,
    StoreError,
    SubstitutablePathInfo,
    WriteSink,
)
from guixsvc.protocol.wire import (
    Incomplete,
    ProtocolError,
    WireReader,
    encode_int,
    encode_string,
    encode_strings,
)
from guixsvc.store import base32, nar, roots
from guixsvc.store.canonical import MTIME_STORE, canonicalise
from guixsvc.store.config import StoreConfig
from guixsvc.store.db import InvalidPathError, StoreDatabase, ValidPathInfo, ensure_reserved
from guixsvc.store.derivation import (
    Derivation,
    DerivationError,
    check_derivation_outputs,
    parse_derivation,
    read_derivation,
)
from guixsvc.store.derived_path import DerivedPath
from guixsvc.store.hashes import UnknownHashType, new_hasher, parse_db_hash
from guixsvc.store.locks import PathLocks, delete_lock_file, lock_fd, open_lock_file
from guixsvc.store.optimise import DEDUPLICATION_MIN_SIZE, optimise_path, optimise_store
from guixsvc.store.paths import InvalidName, InvalidStorePath, StorePath, check_name
from guixsvc.store.safefs import remove_tree

log = logging.getLogger("guix-daemon")

LVL_ERROR, LVL_INFO, LVL_TALKATIVE, LVL_CHATTY, LVL_DEBUG = range(5)

Logger = Callable[[int, str], None]

_staging_counter = itertools.count()
_NS = 1_000_000_000
T = TypeVar("T")


def make_store_writable(store_dir: str) -> None:
    """Upstream's `makeStoreWritable`: when root finds the store on a read-only mount (the
    `gnu-store.mount` unit makes it so for everybody else), remount it writable in a private
    mount namespace of the daemon, inherited by every worker and build."""
    if os.getuid() != 0:
        return
    if not os.statvfs(store_dir).f_flag & os.ST_RDONLY:
        return
    from guixsvc.daemon.build import sandbox

    try:
        sandbox.unshare(sandbox.CLONE_NEWNS)
    except OSError as exc:
        raise StoreError(
            f"setting up a private mount namespace: {os.strerror(exc.errno or 0)}"
        ) from None
    try:
        sandbox.mount("none", store_dir, "none", sandbox.MS_REMOUNT | sandbox.MS_BIND)
    except OSError as exc:
        raise StoreError(
            f"remounting {store_dir} writable: {os.strerror(exc.errno or 0)}"
        ) from None


def initialise_store(config: StoreConfig, settings: Settings) -> None:
    """Create the store's directories and database (what upstream does when opening a store)."""
    os.makedirs(config.store_dir, exist_ok=True)
    make_store_writable(config.store_dir)
    for directory in (
        config.store_dir,
        os.path.join(config.store_dir, ".links"),
        os.path.join(config.state_dir, "profiles"),
        os.path.join(config.state_dir, "temproots"),
        os.path.join(config.state_dir, "gcroots"),
        config.db_dir,
    ):
        os.makedirs(directory, exist_ok=True)
    profiles_link = os.path.join(config.state_dir, "gcroots", "profiles")
    if not os.path.lexists(profiles_link):
        with contextlib.suppress(FileExistsError):
            os.symlink(os.path.join(config.state_dir, "profiles"), profiles_link)
    group = settings.get("build-users-group")
    if os.geteuid() == 0 and group:
        os.makedirs(os.path.join(config.state_dir, "profiles", "per-user"), 0o755, exist_ok=True)
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StoreError(
                f"the group `{group}' specified in `build-users-group' does not exist"
            ) from None
        st = os.stat(config.store_dir)
        if st.st_uid != 0 or st.st_gid != gid:
            os.chown(config.store_dir, 0, gid)
        if stat.S_IMODE(st.st_mode) != 0o1775:
            os.chmod(config.store_dir, 0o1775)
    db = StoreDatabase.open(config.db_dir)
    db.close()
    sweep_store(config)


def _rename_into_place(staged: str, dest: str) -> None:
    """`rename(staged, dest)`, removing whatever is at `dest` first if it is in the way.

    rename(2) replaces a file (or an empty directory, for a directory) atomically and never
    follows a symlink at `dest`; anything else (a non-empty directory, a file in place of a
    directory or the reverse) is removed and the rename tried again.
    """
    try:
        os.rename(staged, dest)
    except OSError:
        remove_tree(dest)
        os.rename(staged, dest)


_STAGING_RE = re.compile(r"(?:nix|\.tmp-link)-([0-9]+)-[0-9]+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_store(config: StoreConfig, log: logging.Logger | None = None) -> list[str]:
    """Remove what crashed workers left in the store; return the removed names.

    - staging entries (`nix-<pid>-<n>`, `.tmp-link-<pid>-<n>`) of processes that are gone;
    - `<path>.lock` and `<path>.chroot` of paths that are not valid, unless a live process has
      the lock or a temp root on the path; anything but a regular file named `*.lock` (a planted
      symlink or FIFO) is removed as well.
    Runs under the exclusive `gc.lock` (skipped if a collector or worker holds it), like upstream's
    collector which deletes the same things.  Errors are logged, never fatal.
    """
    logger = log or logging.getLogger("guixsvc.daemon")
    removed: list[str] = []
    lock = roots.GCLock(config.state_dir, exclusive=True)
    if not lock.acquire(wait=False):
        return removed
    snapshot: roots.TempRootsSnapshot | None = None
    db = StoreDatabase.open(config.db_dir)
    try:
        snapshot = roots.read_temp_roots(config.state_dir, config.store_dir)
        for name in os.listdir(config.store_dir):
            path = f"{config.store_dir}/{name}"
            try:
                if _sweep_one(config, db, snapshot.roots, name, path):
                    removed.append(name)
            except OSError as exc:
                logger.warning("warning: cannot remove stale `%s': %s", path, exc)
    finally:
        if snapshot is not None:
            snapshot.close()
        db.close()
        lock.release()
    for name in removed:
        logger.info("removed stale store entry `%s/%s'", config.store_dir, name)
    return removed


def _sweep_one(
    config: StoreConfig, db: StoreDatabase, temp_roots: set[str], name: str, path: str
) -> bool:
    m = _STAGING_RE.fullmatch(name)
    if m is not None:
        if path in temp_roots or _pid_alive(int(m.group(1))):
            return False
        remove_tree(path)
        return True
    for suffix in (".lock", ".chroot"):
        if name.endswith(suffix):
            base = path[: -len(suffix)]
            break
    else:
        return False
    if base in temp_roots or db.is_valid(base):
        return False
    if suffix == ".chroot":
        remove_tree(path)
        return True
    try:
        fd = open_lock_file(path, False)
    except OSError:
        remove_tree(path)  # a symlink, FIFO or directory planted under a lock file's name
        return True
    if fd is None:
        return False
    try:
        if not lock_fd(fd, "w", False):
            return False  # somebody is working on that path right now
        delete_lock_file(path, fd)
    finally:
        os.close(fd)
    return True


class _FlatSink:
    """NAR sink for flat AddToStore: keeps the contents of a top-level regular file only."""

    def __init__(self, dest: str, hasher: hashlib._Hash) -> None:
        self.dest = dest
        self.hasher = hasher
        self.regular = True
        self.fd: int | None = None

    def directory(self, path: str) -> None:
        if path == "":
            self.regular = False

    def symlink(self, path: str, target: bytes) -> None:
        if path == "":
            self.regular = False

    def file_start(self, path: str, executable: bool, size: int) -> None:
        if path == "":
            self.fd = os.open(
                self.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666
            )

    def file_data(self, chunk: memoryview | bytes) -> None:
        if self.fd is not None:
            self.hasher.update(chunk)
            os.write(self.fd, chunk)

    def file_end(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Source:
    """ImportPaths' stream, pulled through STDERR_READ into the protocol's WireReader."""

    def __init__(self, read: ReadSource) -> None:
        self.read = read
        self.reader = WireReader()

    def value(self, decode: Callable[[WireReader], T]) -> T:
        """Decode one value, asking the client for more bytes until it is complete."""
        reader = self.reader
        while True:
            reader.mark()
            try:
                result = decode(reader)
            except Incomplete:
                reader.rewind()
                reader.feed(self.read(READ_CHUNK))
                continue
            except ProtocolError as exc:  # bad archive data, not bad framing: recoverable
                raise StoreError(str(exc)) from None
            reader.compact()
            return result

    def feed_nar(self, parser: nar.NarParser, hasher: hashlib._Hash) -> None:
        while not parser.done:
            data = self.reader.take_all() or self.read(READ_CHUNK)
            used = parser.feed(data)
            hasher.update(data[:used])
            if used < len(data):
                self.reader.unread(data[used:])


class LocalStore:
    """One session's view of the local store (opened in the worker process)."""

    def __init__(
        self,
        config: StoreConfig,
        settings: Settings,
        message: Logger,
        *,
        trusted: bool,
        remote: bool,
        build_output: Callable[[bytes], None] | None = None,
        client_uid: int | None = None,
        db: StoreDatabase | None = None,
        client_fd: int | None = None,
    ) -> None:
        self.config = config
        #: The client's connection, watched while building: a client that hangs up interrupts
        #: its builds (upstream's SIGPOLL handler in nix-daemon.cc).
        self.client_fd = client_fd
        #: Sends builder output to the client verbatim (chunks, not lines).
        self.build_output = build_output or (lambda chunk: None)
        #: The connecting user's uid, None for TCP clients.
        self.client_uid = client_uid
        self.sd = config.store
        self.settings = settings
        self.message = message
        self.trusted = trusted
        self.remote = remote
        #: A worker's database handle outlives its sessions; a store opened alone owns one.
        self._owns_db = db is None
        self.db = db or StoreDatabase.open(
            config.db_dir,
            wal=settings.get_bool("use-sqlite-wal"),
            fsync=settings.get_bool("fsync-metadata"),
        )
        self._temp_roots: roots.TempRoots | None = None
        self._rooted: set[str] = set()
        self._drv_hashes: dict[str, bytes] = {}

    def close(self) -> None:
        if self._temp_roots is not None:
            self._temp_roots.close()
            self._temp_roots = None
        if self._owns_db:
            self.db.close()

    # -- session set-up ------------------------------------------------------------------------

    def reserve_space(self, reserve: bool) -> None:
        with contextlib.suppress(OSError):
            ensure_reserved(
                self.config.db_dir, reserve, self.settings.get_int("gc-reserved-space", 8 << 20)
            )

    def create_user_profile_dir(self, user: str) -> None:
        entry = pwd.getpwnam(user)
        directory = os.path.join(self.config.state_dir, "profiles", "per-user", user)
        os.makedirs(directory, 0o755, exist_ok=True)
        if os.geteuid() == 0:
            st = os.stat(directory)
            if st.st_uid != entry.pw_uid:
                os.chown(directory, entry.pw_uid, entry.pw_gid)

    def set_options(self, options: ClientOptions) -> None:
        try:
            users = self.settings.apply_client_options(
                options, trusted=self.trusted, remote=self.remote, peer_uid_known=not self.remote
            )
        except SettingsError as exc:
            raise ProtocolError(str(exc)) from None
        for user in users:
            try:
                self.create_user_profile_dir(user)
            except KeyError:
                log.info("user name %s not found", user)

    # -- helpers -------------------------------------------------------------------------------

    def _path(self, sp: StorePath) -> str:
        return self.sd.display(sp)

    def _parse(self, path: str) -> StorePath:
        # Lax: a client may have registered any name (upstream's register-items does).
        return self.sd.parse_lax(path)

    def _not_valid(self, sp: StorePath) -> StoreError:
        return StoreError(f"path `{self._path(sp)}' is not valid")

    def _new_staging_name(self) -> str:
        return f"{self.config.store_dir}/nix-{os.getpid()}-{next(_staging_counter)}"

    def _staging_path(self) -> str:
        staged = self._new_staging_name()
        self._roots().add(staged)
        remove_tree(staged)
        return staged

    def _roots(self) -> roots.TempRoots:
        if self._temp_roots is None:
            self._temp_roots = roots.TempRoots(self.config.state_dir)
        return self._temp_roots

    def _read_drv(self, path: str) -> Derivation:
        if not self.db.is_valid(path):
            raise StoreError(f"path `{path}' is not valid")
        try:
            return read_derivation(path)
        except DerivationError as exc:
            raise StoreError(str(exc)) from None

    def _register_derivation(self, sp: StorePath, contents: bytes) -> None:
        path = self._path(sp)
        try:
            drv = parse_derivation(contents)
            check_derivation_outputs(self.sd, sp, drv, self._read_drv, self._drv_hashes)
        except DerivationError as exc:
            raise StoreError(str(exc)) from None
        self.db.add_derivation_outputs(path, {n: o.path for n, o in drv.outputs.items()})

    def _install(
        self,
        sp: StorePath,
        staged: str,
        references: list[StorePath],
        *,
        nar_hash: bytes | None = None,
        nar_size: int | None = None,
        deriver: StorePath | None = None,
        canonical: bool = False,
        checked: bool = False,
        dedup: bool = True,
    ) -> None:
        """Move a staged item into place and register it, unless the path is already valid.

        The staged tree is removed in every case where it is not installed.  `canonical`: the
        staged item already has its canonical metadata (a file written with its final mode and
        mtime); `checked`: the caller rooted `sp` and found it invalid just before; `dedup`
        False: nothing in the item can be deduplicated (a regular file below upstream's
        `deduplicationMinSize`).
        """
        dest = self._path(sp)
        installed = False
        try:
            if not checked:
                self.add_temp_root(sp)
                if self.db.is_valid(dest):
                    return
            with PathLocks([dest]) as locks:
                # The lock file is not needed afterwards, whether the install succeeds or not:
                # a failure must not leave `<dest>.lock` behind in the store.
                locks.set_deletion(True)
                if self.db.is_valid(dest):
                    return
                if not canonical:
                    canonicalise(staged)
                _rename_into_place(staged, dest)
                installed = True
                try:
                    if nar_hash is None:
                        nar_hash, nar_size = nar.hash_path(dest)
                    if dedup and self.settings.get_bool("auto-optimise-store"):
                        optimise_path(self.config.store_dir, dest)
                    drv_contents = None
                    if sp.is_derivation and os.path.isfile(dest) and not os.path.islink(dest):
                        with open(dest, "rb") as f:
                            drv_contents = f.read()
                    info = ValidPathInfo(
                        path=dest,
                        nar_hash="sha256:" + nar_hash.hex(),
                        nar_size=nar_size,
                        references=frozenset(self._path(r) for r in references),
                        deriver=self._path(deriver) if deriver else None,
                    )
                    if drv_contents is None:
                        self.db.register_valid_paths([info])  # a transaction of its own
                    else:
                        with self.db.transaction():
                            self.db.register_valid_paths([info])
                            self._register_derivation(sp, drv_contents)
                except InvalidPathError as exc:
                    remove_tree(dest)
                    raise StoreError(str(exc)) from None
                except BaseException:
                    remove_tree(dest)
                    raise
                locks.set_deletion(True)
        finally:
            if not installed:
                remove_tree(staged)

    # -- queries -------------------------------------------------------------------------------

    def is_valid_path(self, path: StorePath) -> bool:
        return self.db.is_valid(self._path(path))

    def query_valid_paths(self, paths: list[StorePath]) -> list[StorePath]:
        return [self._parse(p) for p in self.db.valid_subset([self._path(p) for p in paths])]

    def query_path_info(self, path: StorePath) -> PathInfo:
        info = self.db.path_info(self._path(path))
        if info is None:
            raise self._not_valid(path)
        _, digest = parse_db_hash(info.nar_hash, info.path)
        return PathInfo(
            path=path,
            deriver=self._parse(info.deriver) if info.deriver else None,
            nar_hash=digest,
            references=sorted(self._parse(r) for r in info.references),
            registration_time=info.registration_time or 0,
            nar_size=info.nar_size or 0,
        )

    def query_referrers(self, path: StorePath) -> list[StorePath]:
        return [self._parse(p) for p in self.db.referrers(self._path(path))]

    def query_valid_derivers(self, path: StorePath) -> list[StorePath]:
        return [self._parse(p) for p in self.db.valid_derivers(self._path(path))]

    def query_derivation_outputs(self, drv: StorePath) -> dict[str, StorePath]:
        path = self._path(drv)
        if not self.db.is_valid(path):
            raise StoreError(f"path ‘{path}’ is not valid")
        return {n: self._parse(p) for n, p in self.db.derivation_outputs(path).items()}

    def query_path_from_hash_part(self, hash_part: str) -> StorePath | None:
        found = self.db.path_from_hash_part(f"{self.config.store_dir}/{hash_part}")
        return self._parse(found) if found else None

    def query_all_valid_paths(self) -> list[StorePath]:
        return [self._parse(p) for p in self.db.all_valid_paths()]

    # -- adding items ----------------------------------------------------------------------------

    def add_text_to_store(
        self, name: str, contents: bytes, references: list[StorePath]
    ) -> StorePath:
        try:
            sp = self.sd.make_text_path(name, hashlib.sha256(contents).digest(), references)
        except InvalidName as exc:
            raise StoreError(str(exc)) from None
        # Root first, then look: a collection between the two cannot delete what we return.
        dest = self._path(sp)
        if dest not in self._rooted:
            # The staging name's root goes in the same append (one lock window, one write).
            staged = self._new_staging_name()
            self._roots().add_many((dest, staged))
            self._rooted.add(dest)
        else:
            staged = None
        if self.db.is_valid(dest):
            return sp
        if staged is None:
            staged = self._new_staging_name()
            self._roots().add(staged)
        self._write_staged_file(staged, contents)
        archive = nar.dump_regular(contents)
        nar_hash, nar_size = hashlib.sha256(archive).digest(), len(archive)
        self._install(
            sp,
            staged,
            references,
            nar_hash=nar_hash,
            nar_size=nar_size,
            canonical=True,
            checked=True,
            dedup=len(contents) >= DEDUPLICATION_MIN_SIZE,
        )
        return sp

    def _write_staged_file(self, staged: str, contents: bytes) -> None:
        """Write `contents` to the (rooted) staging name with canonical metadata: mode 0444,
        owned by us, mtime 1 — what `canonicalise` would give it, set through the descriptor."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(staged, flags, 0o444)
        except FileExistsError:  # left by a dead process that had our pid
            remove_tree(staged)
            fd = os.open(staged, flags, 0o444)
        try:
            view = memoryview(contents)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, 0o444)  # whatever the umask
            now = int(time.time()) * _NS  # upstream keeps the atime's seconds
            os.utime(fd, ns=(now, MTIME_STORE * _NS))
        except BaseException:
            os.close(fd)
            remove_tree(staged)
            raise
        os.close(fd)

    def add_to_store(self, request: AddToStoreRequest, feed_nar: NarFeeder) -> StorePath:
        recursive, algo = request.recursive, request.algo
        if not request.fixed:
            recursive, algo = True, "sha256"
        problem: StoreError | None = None
        try:
            check_name(request.name)
            content_hasher = new_hasher(algo)
        except (InvalidName, UnknownHashType) as exc:
            problem = StoreError(str(exc))
        if problem is not None:
            self._consume_nar(feed_nar, nar.NullSink())
            raise problem
        staged = self._staging_path()
        try:
            nar_hasher = hashlib.sha256()
            if recursive:
                with nar.RestoreSink(staged) as sink:
                    nar_size = self._consume_nar(feed_nar, sink, content_hasher, nar_hasher)
                nar_digest = nar_hasher.digest()
            else:
                flat = _FlatSink(staged, content_hasher)
                try:
                    self._consume_nar(feed_nar, flat)
                finally:
                    flat.file_end()
                if not flat.regular or not os.path.exists(staged):
                    raise StoreError("regular file expected")
                nar_digest, nar_size = nar.hash_path(staged)
            sp = self.sd.make_fixed_output_path(
                recursive, algo, content_hasher.digest(), request.name
            )
        except BaseException:
            remove_tree(staged)
            raise
        self._install(sp, staged, [], nar_hash=nar_digest, nar_size=nar_size)
        return sp

    def _consume_nar(
        self,
        feed_nar: NarFeeder,
        sink: nar.NarSink,
        *hashers: hashlib._Hash,
    ) -> int:
        parser = nar.NarParser(sink)
        total = 0

        def consume(chunk: memoryview) -> int:
            nonlocal total
            used = parser.feed(chunk)
            if hashers:
                part = chunk[:used]
                for h in hashers:
                    h.update(part)
            total += used
            return used

        try:
            feed_nar(consume, lambda: parser.done)
        except nar.NarError as exc:
            # The rest of the archive is still on the wire: the session cannot continue.
            raise ProtocolError(str(exc)) from None
        return total

    # -- export / import -------------------------------------------------------------------------

    def export_path(self, path: StorePath, sign: bool, sink: WriteSink) -> None:
        dest = self._path(path)
        info = self.db.path_info(dest)
        if info is None:
            raise self._not_valid(path)
        nar_hasher = hashlib.sha256()
        record = hashlib.sha256()
        for chunk in nar.dump(dest):
            nar_hasher.update(chunk)
            record.update(chunk)
            sink(chunk)
        _, stored = parse_db_hash(info.nar_hash, dest)
        actual = nar_hasher.digest()
        if actual != stored and any(stored):
            raise StoreError(
                f"hash of path `{dest}' has changed from `{base32.encode(stored)}' to "
                f"`{base32.encode(actual)}'!"
            )
        trailer = b"".join((
            encode_int(EXPORT_MAGIC),
            encode_string(dest),
            encode_strings(sorted(info.references)),
            encode_string(info.deriver or ""),
        ))  # fmt: skip
        record.update(trailer)
        sink(trailer)
        if sign:
            sink(encode_int(1) + encode_string(self._sign(record.digest())))
        else:
            sink(encode_int(0))

    def _sign(self, digest: bytes) -> bytes:
        """What `guix authenticate sign` returns for the daemon's signing key."""
        from guixsvc.pki import keys  # loaded only when signing

        key_file = self.config.signing_key_secret
        try:
            keys.check_secrecy(key_file)
            return keys.sign_hash(key_file, digest)
        except keys.PkiError as exc:
            raise StoreError(str(exc).rstrip("\n")) from None

    def import_paths(self, read: ReadSource) -> list[StorePath]:
        source = _Source(read)
        imported: list[StorePath] = []
        while True:
            marker = source.value(WireReader.read_u64)
            if marker == 0:
                return imported
            if marker != 1:
                raise StoreError(
                    "input doesn't look like something created by `nix-store --export'"
                )
            imported.append(self._import_one(source))

    def _import_one(self, source: _Source) -> StorePath:
        staged = self._staging_path()
        try:
            record = hashlib.sha256()
            with nar.RestoreSink(staged) as sink:
                parser = nar.NarParser(sink)
                try:
                    source.feed_nar(parser, record)
                except nar.NarError as exc:
                    raise StoreError(str(exc)) from None
            if source.value(WireReader.read_u64) != EXPORT_MAGIC:
                raise StoreError("normalized archive cannot be imported; wrong format")
            dest = source.value(WireReader.read_string)
            refs = source.value(WireReader.read_strings)
            deriver = source.value(WireReader.read_string)
            # The signed hash covers the record up to the deriver: the NAR bytes as received,
            # then the trailer, whose encoding is canonical (zero padding is enforced).
            record.update(
                encode_int(EXPORT_MAGIC)
                + encode_string(dest)
                + encode_strings(refs)
                + encode_string(deriver)
            )
            digest = record.digest()
            if source.value(WireReader.read_u64) != 1:
                raise StoreError(f"imported archive of `{dest}' lacks a signature")
            signature = source.value(lambda r: r.read_bytes(1 << 16))
            self._check_signature(signature, digest)
            try:
                sp = self._parse(dest)
                ref_paths = [self._parse(r) for r in refs]
                deriver_path = self._parse(deriver) if deriver else None
            except InvalidStorePath as exc:
                raise StoreError(str(exc)) from None
            if deriver_path and not self.db.is_valid(self._path(deriver_path)):
                deriver_path = None
        except BaseException:
            remove_tree(staged)
            raise
        self._install(sp, staged, ref_paths, deriver=deriver_path)
        return sp

    def _check_signature(self, signature: bytes, digest: bytes) -> None:
        from guixsvc.pki import keys  # libgcrypt is loaded only when verifying

        try:
            acl = keys.current_acl(self.config.conf_dir)
        except (OSError, keys.PkiError):
            acl = keys.Acl([])
        try:
            signed = keys.verify_signature(signature, acl)
        except keys.SignatureError as exc:
            raise StoreError(str(exc)) from None
        if signed != digest:
            raise StoreError(
                "signed hash doesn't match actual contents of imported archive; archive could "
                "be corrupt, or someone is trying to import a Trojan horse"
            )

    # -- building (owned by guixsvc.daemon.build) ------------------------------------------------

    def _outputs_valid(self, item: str) -> bool:
        derived = DerivedPath.parse(item)
        path = derived.path
        if not derived.is_derivation:
            return self.db.is_valid(path)
        if not self.db.is_valid(path):
            return False
        outputs = self.db.derivation_outputs(path)
        names = derived.outputs or list(outputs)
        return all(n in outputs and self.db.is_valid(outputs[n]) for n in names)

    def build_paths(self, items: list[str], mode: BuildMode) -> None:
        if mode == BuildMode.REPAIR and not self.trusted:
            raise ProtocolError("repairing is a privileged operation")
        missing = [i for i in items if not self._outputs_valid(i)]
        if mode == BuildMode.NORMAL and not missing:
            return
        from guixsvc.daemon.build import worker  # loaded only when something is built

        worker.build_paths(self, items, mode)

    def ensure_path(self, path: StorePath) -> None:
        if self.db.is_valid(self._path(path)):
            return
        if self.substitute(path):
            return
        raise StoreError(f"path `{self._path(path)}' does not exist and cannot be created")

    # -- substitutes (owned by guixsvc.daemon.substituter) ---------------------------------------

    def may_substitute(self) -> bool:
        """Substitutes are enabled and some server (configured or discovered) may have them."""
        return bool(self.settings.substitute_urls()) or self.settings.discovers()

    def substitute(self, path: StorePath, *, repair: bool = False) -> bool:
        """Try to make `path` valid from a substitute; True when it is valid afterwards."""
        if not self.may_substitute():
            return False
        from guixsvc.daemon import substituter

        return substituter.for_store(self).substitute(path)

    def has_substitutes(self, path: StorePath) -> bool:
        if not self.may_substitute():
            return False
        from guixsvc.daemon import substituter

        return bool(substituter.for_store(self).have([path]))

    def query_substitutable_paths(self, paths: list[StorePath]) -> list[StorePath]:
        if not paths or not self.may_substitute():
            return []
        from guixsvc.daemon import substituter

        return substituter.for_store(self).have(paths)

    def query_substitutable_path_infos(self, paths: list[StorePath]) -> list[SubstitutablePathInfo]:
        if not paths or not self.may_substitute():
            return []
        from guixsvc.daemon import substituter

        sub = substituter.for_store(self)
        return [
            SubstitutablePathInfo(
                path=p,
                deriver=hit.deriver,
                references=hit.references,
                download_size=sub.download_size(hit),
                nar_size=hit.narinfo.nar_size or 0,
            )
            for p, hit in sub.infos(paths)
        ]

    def substitute_urls(self) -> list[str]:
        return self.settings.substitute_urls()

    def builtin_builders(self) -> list[str]:
        return ["download"]

    # -- roots and GC ------------------------------------------------------------------------------

    def add_temp_root(self, path: StorePath) -> None:
        full = self._path(path)
        if full not in self._rooted:  # a session's roots only grow: once is enough
            self._roots().add(full)
            self._rooted.add(full)

    def add_indirect_root(self, file_name: str) -> None:
        roots.add_indirect_root(
            self.config.state_dir, os.path.abspath(os.path.join("/", file_name))
        )

    def sync_with_gc(self) -> None:
        roots.sync_with_gc(self.config.state_dir)

    def find_roots(self) -> dict[str, StorePath]:
        found = roots.find_roots(self.config.state_dir, self.config.store_dir, self.db.is_valid)
        return {link: self._parse(path) for link, path in found.items()}

    def collect_garbage(self, request: GCRequest) -> GCResult:
        # Owned by guixsvc.daemon.collector.
        from guixsvc.daemon.collector import collect_garbage

        return collect_garbage(self, request)

    # -- maintenance -------------------------------------------------------------------------------

    def query_failed_paths(self) -> list[str]:
        return self.db.failed_paths()

    def clear_failed_paths(self, paths: list[str]) -> None:
        self.db.clear_failed_paths(paths)

    def optimise_store(self) -> None:
        freed, linked = optimise_store(self.config.store_dir, self.db.all_valid_paths())
        self.message(
            LVL_INFO, f"{freed / (1024 * 1024):.2f} MiB freed by hard-linking {linked} files"
        )

    def _forget_vanished(self, path: str) -> bool:
        """Invalidate a valid path that disappeared, unless something still refers to it."""
        if [r for r in self.db.referrers(path) if r != path]:
            self.message(LVL_ERROR, f"path `{path}' disappeared, but it still has valid referrers!")
            return False
        self.message(LVL_ERROR, f"path `{path}' disappeared, removing from database...")
        self.db.invalidate_path(path)
        return True

    def _repair(self, path: str) -> bool:
        """Substitute or rebuild a damaged valid path (upstream `repairPath`)."""
        from guixsvc.daemon.build import worker

        try:
            worker.repair_path(self, path)
        except StoreError as exc:
            self.message(LVL_ERROR, f"error: {exc}")
            return False
        return True

    def verify_store(self, check_contents: bool, repair: bool) -> bool:
        if repair and not self.trusted:
            raise StoreError("you are not privileged to repair paths")
        errors = False
        self.message(LVL_ERROR, "reading the store...")
        self.message(LVL_INFO, "checking path existence...")  # as upstream's verifyStore
        # Repairing builds or substitutes, which takes temp roots (and so the GC lock): it is
        # done after the existence check has released the lock.
        to_repair: list[str] = []
        with roots.GCLock(self.config.state_dir, exclusive=True):
            for path in self.db.all_valid_paths():
                if os.path.lexists(path):
                    continue
                if repair:
                    to_repair.append(path)
                elif not self._forget_vanished(path):
                    errors = True
        for path in to_repair:
            if not self._repair(path):
                with roots.GCLock(self.config.state_dir, exclusive=True):
                    if not self._forget_vanished(path):
                        errors = True
        if check_contents:
            self.message(LVL_INFO, "checking hashes...")
            for path in self.db.all_valid_paths():
                info = self.db.path_info(path)
                assert info is not None
                _, stored = parse_db_hash(info.nar_hash, path)
                actual, size = nar.hash_path(path)
                if not any(stored) or not info.nar_size:
                    self.db.update_path_info(path, "sha256:" + actual.hex(), size)
                elif actual != stored:
                    self.message(
                        LVL_ERROR,
                        f"path `{path}' was modified! expected hash `{stored.hex()}', "
                        f"got `{actual.hex()}'",
                    )
                    if not repair or not self._repair(path):
                        errors = True
        return errors


if TYPE_CHECKING:
    # The type checker (`make lint`) proves that LocalStore implements the protocol's store
    # interface: a missing method or a different signature fails here.
    def _implements_store_api(store: LocalStore) -> Store:
        return store
