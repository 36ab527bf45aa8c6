"""The daemon's substituter: what upstream delegates to `guix substitute`, done in-process.

Upstream's daemon runs the Guile helper `guix substitute --query/--substitute`
(spec/build-env.md §12); its observable behaviour is what matters here: narinfos fetched from
the substitute URLs in order, cached on disk with upstream's TTLs and file format
(substitutes.md §7.7), authenticated against the ACL with the "equivalent narinfo" rule (§7.3),
nars downloaded, decompressed, unpacked and hashed in one streaming pass, and the item
registered with its references only once its hash and size match.  Anything that fails leaves
nothing in the store.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.client
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from guixsvc.pki import keys
from guixsvc.store import base32, nar
from guixsvc.store.compression import decompressor
from guixsvc.store.narinfo import Narinfo, NarinfoError, best_entries, parse_narinfo, select_hit
from guixsvc.store.paths import InvalidStorePath, StorePath
from guixsvc.store.safefs import remove_tree

if TYPE_CHECKING:
    from guixsvc.daemon.localstore import LocalStore

__all__ = ["FetchError", "HashMismatch", "NarinfoCache", "Substituter", "registered_size"]

#: TTLs of newer `guix substitute` (guix/substitutes.scm), in seconds.
POSITIVE_TTL = 36 * 3600
NEGATIVE_TTL = 2 * 60
TRANSIENT_TTL = 60
#: Guile's `time-monotonic` is TAI: Unix time plus the 37 leap seconds.
TAI_OFFSET = 37
USER_AGENT = "GNU Guile"
LOOKUP_THREADS = 8
_READ = 1 << 20

LVL_ERROR, LVL_INFO = 0, 1


class FetchError(Exception):
    """A download or verification failure; the message is what the client is told."""


class HashMismatch(FetchError):
    """The NAR's hash is not the narinfo's; ``status`` is `ALGO EXPECTED ACTUAL` (base32)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class TimedOut(FetchError):
    """`--max-silent-time` or `--timeout` ran out while fetching (upstream kills `guix
    substitute` then: the substitution fails without trying other URLs)."""


class _Clock:
    """Upstream applies `--timeout` and `--max-silent-time` to `guix substitute` as to a
    builder: from the start of the substitution, and since the last data received."""

    def __init__(self, name: str, silence: int, total: int) -> None:
        self.name = name
        self.silence = silence
        self.total = total
        self.start = time.monotonic()

    def limit(self, default: float) -> float:
        """The socket timeout for the next read."""
        limits = [default]
        if self.silence:
            limits.append(self.silence)
        if self.total:
            limits.append(self.start + self.total - time.monotonic())
        return max(min(limits), 0.001)

    def expired(self) -> TimedOut:
        """The error for a read that timed out after :meth:`limit`."""
        if self.total and time.monotonic() >= self.start + self.total - 0.001:
            return TimedOut(f"{self.name} timed out after {self.total} seconds")
        if self.silence:
            return TimedOut(f"{self.name} timed out after {self.silence} seconds of silence")
        return TimedOut(f"{self.name}: timed out")

    def check(self) -> None:
        if self.total and time.monotonic() >= self.start + self.total:
            raise TimedOut(f"{self.name} timed out after {self.total} seconds")


#: The largest NarSize the database can hold (SQLite integers are signed 64-bit).
_MAX_DB_SIZE = (1 << 63) - 1


def registered_size(info: Narinfo, actual: int) -> int:
    """The NAR size to register: upstream's daemon registers what the narinfo announced
    (`success HASH SIZE` from `guix substitute`), so does ours; the actual size when the
    narinfo has none (or one the database cannot hold)."""
    if info.nar_size is None or not 0 <= info.nar_size <= _MAX_DB_SIZE:
        return actual
    return info.nar_size


# --- on-disk narinfo cache ----------------------------------------------------------------------


def _scheme_string(text: str) -> str:
    """Guile's `write` of a string."""
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    )
    return f'"{escaped}"'


_STRING_RE = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "a": "\a", "0": "\0"}


def _unscheme(body: str) -> str:
    def repl(m: re.Match[str]) -> str:
        c = m.group(1)
        if c.startswith("x"):
            return chr(int(c[1:].rstrip(";"), 16))
        return _ESCAPES.get(c, c)

    return re.sub(r"\\(x[0-9a-fA-F]+;|.)", repl, body)


class NarinfoCache:
    """`<cache>/<base32(sha256(url))>/<hash-part>` files as `cache-narinfo!` writes them."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @staticmethod
    def url_key(url: str) -> str:
        digest = hashlib.sha256(url.encode("utf-8")).digest()
        return base64.b32encode(digest).decode("ascii").lower().rstrip("=")

    def file(self, url: str, hash_part: str) -> str:
        return os.path.join(self.directory, self.url_key(url), hash_part)

    def get(self, url: str, hash_part: str) -> tuple[bool, bytes | None]:
        """(found, narinfo text or None for a negative entry)."""
        try:
            with open(self.file(url, hash_part), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            return False, None
        date = re.search(r"\(date (\d+)\)", text)
        ttl = re.search(r"\(ttl (\d+)\)", text)
        if not date or not ttl or "(version 2)" not in text:
            return False, None
        if int(date.group(1)) + int(ttl.group(1)) < time.time() + TAI_OFFSET:
            return False, None
        value = text[text.find("(value ") + 7 :]
        if value.startswith("#f"):
            return True, None
        m = _STRING_RE.match(value)
        if not m:
            return False, None
        return True, _unscheme(m.group(1)).encode("utf-8")

    def put(self, url: str, hash_part: str, body: bytes | None, ttl: int) -> None:
        value = "#f" if body is None else _scheme_string(body.decode("utf-8", "replace"))
        now = int(time.time()) + TAI_OFFSET
        text = (
            f"(narinfo (version 2) (cache-uri {_scheme_string(url)}) (date {now}) "
            f"(ttl {ttl}) (value {value}))"
        )
        path = self.file(url, hash_part)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.rename(tmp, path)


# --- HTTP -------------------------------------------------------------------------------------


class _Connections:
    """Keep-alive connections, one set per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str, int | None], http.client.HTTPConnection] = (
            getattr(self._local, "pool", None) or {}
        )
        self._local.pool = pool
        key = (scheme, host, port)
        conn = pool.get(key)
        if conn is None:
            conn = _connect(scheme, host, port)
            pool[key] = conn
        return conn

    def drop(self, scheme: str, host: str, port: int | None) -> None:
        pool = getattr(self._local, "pool", {})
        conn = pool.pop((scheme, host, port), None)
        if conn is not None:
            conn.close()


class _ProxiedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP through a proxy: requests name the absolute URL (and `Host` its server)."""

    def __init__(self, proxy_host: str, proxy_port: int, origin: str) -> None:
        super().__init__(proxy_host, proxy_port, timeout=30)
        self.origin = origin

    def putrequest(self, method: str, url: str, *args: object, **kwargs: object) -> None:
        if url.startswith("/"):
            url = self.origin + url
        super().putrequest(method, url, *args, **kwargs)  # type: ignore[arg-type]


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The proxy `http_proxy`/`https_proxy` name for this server unless `no_proxy` exempts it:
    the environment upstream's `guix substitute` honours (NixOS passes networking.proxy)."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return parts.hostname or "localhost", parts.port or (443 if parts.scheme == "https" else 80)


def _connect(scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
    proxy = _proxy_for(scheme, host)
    if scheme == "https":
        if proxy is None:
            return http.client.HTTPSConnection(
                host, port, timeout=30, context=ssl.create_default_context()
            )
        # A CONNECT tunnel; TLS (and its host name check) is with the server itself.
        conn = http.client.HTTPSConnection(
            proxy[0], proxy[1], timeout=30, context=ssl.create_default_context()
        )
        conn.set_tunnel(host, port)
        return conn
    if proxy is None:
        return http.client.HTTPConnection(host, port, timeout=30)
    return _ProxiedHTTPConnection(
        proxy[0], proxy[1], f"http://{host}" + (f":{port}" if port else "")
    )


def _max_age(headers: http.client.HTTPMessage) -> int | None:
    m = re.search(r"max-age=(\d+)", headers.get("Cache-Control", ""))
    return int(m.group(1)) if m else None


@dataclass
class _Hit:
    narinfo: Narinfo
    references: list[StorePath]
    deriver: StorePath | None


class Substituter:
    """Narinfo lookups and substitutions for one daemon session."""

    def __init__(
        self,
        store: LocalStore,
        message: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self.sd = store.sd
        self.message = message or (lambda level, text: None)
        env = os.environ
        xdg = env.get("XDG_CACHE_HOME")
        directory = (
            os.path.join(xdg, "guix", "substitute")
            if xdg
            else os.path.join(store.config.state_dir, "substitute", "cache")
        )
        self.cache = NarinfoCache(directory)
        self.conns = _Connections()
        self.unauthenticated = (
            env.get("GUIX_ALLOW_UNAUTHENTICATED_SUBSTITUTES", "").lower() == "yes"
        )
        self._acl: keys.Acl | None = None
        self._hits: dict[str, _Hit | None] = {}

    # -- configuration -----------------------------------------------------------------------

    def urls(self) -> list[str]:
        urls = self.store.settings.substitute_urls()
        if self.store.settings.discovers():  # prepended even to an empty list, as upstream
            urls = self._discovered() + urls
        return urls

    def _discovered(self) -> list[str]:
        path = os.path.join(self.store.config.state_dir, "discover", "publish")
        try:
            with open(path) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            return []
        lines.reverse()
        if len(lines) > 50:
            lines = random.sample(lines, 50)
        return lines

    def acl(self) -> keys.Acl:
        if self._acl is None:
            try:
                self._acl = keys.current_acl(self.store.config.conf_dir)
            except (OSError, keys.PkiError, ValueError):
                self._acl = keys.Acl()
        return self._acl

    # -- narinfo lookups ------------------------------------------------------------------------

    def _fetch_narinfo(self, cache_url: str, hash_part: str) -> bytes | None:
        """One narinfo from one server (through the disk cache); None when absent."""
        found, cached = self.cache.get(cache_url, hash_part)
        if found:
            return cached
        url = cache_url.rstrip("/") + "/" + hash_part + ".narinfo"
        parts = urlsplit(url)
        if parts.scheme == "file":
            try:
                with open(unquote(parts.path), "rb") as f:
                    return f.read()
            except OSError:
                return None
        if parts.scheme not in ("http", "https"):
            return None
        host, port = parts.hostname or "localhost", parts.port
        target = parts.path or "/"
        for attempt in (0, 1):
            conn = self.conns.get(parts.scheme, host, port)
            try:
                conn.request("GET", target, headers={"User-Agent": USER_AGENT})
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                self.conns.drop(parts.scheme, host, port)
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.conns.drop(parts.scheme, host, port)
            age = _max_age(resp.headers)
            if resp.status == 200:
                self.cache.put(cache_url, hash_part, body, age if age is not None else POSITIVE_TTL)
                return body
            if resp.status in (404, 202):
                self.cache.put(cache_url, hash_part, None, age if age is not None else NEGATIVE_TTL)
            else:
                self.cache.put(cache_url, hash_part, None, TRANSIENT_TTL)
            return None
        return None

    def _parse_hit(self, path: StorePath, info: Narinfo) -> _Hit | None:
        if info.store_path != self.sd.display(path):
            return None
        try:
            refs = [self.sd.parse(f"{self.sd.path}/{r}") for r in info.references]
        except InvalidStorePath:
            return None
        return _Hit(info, refs, self._deriver(info.deriver))

    def _deriver(self, deriver: str | None) -> StorePath | None:
        """The narinfo's deriver, or None when it names no store item: the deriver is only
        information, and upstream substitutes an item whose narinfo has an odd one (a full file
        name, as tests/guix-daemon.sh writes) rather than dropping it."""
        if not deriver:
            return None
        full = deriver if deriver.startswith(self.sd.path + "/") else f"{self.sd.path}/{deriver}"
        try:
            return self.sd.parse(full)
        except InvalidStorePath:
            return None

    def lookup(self, paths: Iterable[StorePath]) -> dict[StorePath, _Hit]:
        """`lookup-narinfos/diverse`: the usable narinfo of each path that has one."""
        # A name without a nix-base32 hash part (upstream accepts `<store>/guix-XXXXXX` on the
        # wire) has no narinfo anywhere.
        todo = [p for p in dict.fromkeys(paths) if p.is_strict and p.base_name not in self._hits]
        candidates: dict[StorePath, list[Narinfo]] = {p: [] for p in todo}
        remaining = list(todo)
        acl = self.acl()
        for cache_url in self.urls():
            if not remaining:
                break

            def one(p: StorePath, url: str = cache_url) -> tuple[StorePath, Narinfo | None]:
                try:
                    body = self._fetch_narinfo(url, p.hash_part)
                except (OSError, http.client.HTTPException) as exc:
                    raise _ServerDown(url, exc) from None
                if body is None:
                    return p, None
                try:
                    info = parse_narinfo(body, url)
                except NarinfoError:
                    return p, None
                if os.path.dirname(info.store_path) != self.sd.path:
                    return p, None
                return p, info

            try:
                with ThreadPoolExecutor(min(LOOKUP_THREADS, len(remaining))) as pool:
                    results = list(pool.map(one, remaining))
            except _ServerDown as exc:
                host = urlsplit(exc.url).hostname or exc.url
                self.message(LVL_ERROR, _server_down_warning(host, exc.reason))
                continue
            still = []
            for p, info in results:
                if info is not None:
                    candidates[p].append(info)
                if info is None or not (self.unauthenticated or info.is_valid(acl)):
                    still.append(p)
            remaining = still
        hits: dict[StorePath, _Hit] = {}
        for p, infos in candidates.items():
            chosen = infos[0] if (self.unauthenticated and infos) else select_hit(infos, acl)
            hit = self._parse_hit(p, chosen) if chosen is not None else None
            self._hits[p.base_name] = hit
        for p in dict.fromkeys(paths):
            hit = self._hits.get(p.base_name)
            if hit is not None:
                hits[p] = hit
        return hits

    # -- the query operations ----------------------------------------------------------------

    def have(self, paths: list[StorePath]) -> list[StorePath]:
        hits = self.lookup(paths)
        return [p for p in paths if p in hits]

    def infos(self, paths: list[StorePath]) -> list[tuple[StorePath, _Hit]]:
        hits = self.lookup(paths)
        return [(p, hits[p]) for p in paths if p in hits]

    @staticmethod
    def download_size(hit: _Hit) -> int:
        entries = best_entries(hit.narinfo)
        return (entries[0].file_size or 0) if entries else 0

    # -- substitution -------------------------------------------------------------------------

    def substitute(self, path: StorePath, _active: set[StorePath] | None = None) -> bool:
        """Make ``path`` valid from a substitute, its references first.  False (with a message
        to the client) when there is no substitute or it fails verification."""
        store = self.store
        if store.is_valid_path(path):
            return True
        active = _active if _active is not None else set()
        if path in active:
            return False
        active.add(path)
        hit = self.lookup([path]).get(path)
        if hit is None:
            return False
        for ref in hit.references:
            if ref != path and not store.is_valid_path(ref) and not self.substitute(ref, active):
                self.message(LVL_ERROR, f"cannot substitute reference `{self.sd.display(ref)}'")
                return False
        display = self.sd.display(path)
        self.message(LVL_INFO, f"fetching path `{display}'...")
        self.trace(f"@ substituter-started {display} substitute")
        settings = store.settings
        clock = _Clock(
            f"substitution of `{display}'",
            _setting(settings, "build-max-silent-time"),
            _setting(settings, "build-timeout"),
        )
        errors: list[str] = []
        for entry in best_entries(hit.narinfo):
            staged = store._staging_path()
            try:
                self.trace(f"@ download-started {display} {entry.url} {entry.file_size or '-'}")
                digest, size = self._download(entry.url, entry.compression, staged, clock)
                self.trace(f"@ download-succeeded {display} {entry.url} {size}")
                self._check(hit.narinfo, display, digest, size)
            except FetchError as exc:
                store_delete(staged)
                errors.append(str(exc))
                self.message(LVL_ERROR, str(exc))
                if isinstance(exc, HashMismatch):
                    # Upstream's daemon reads `hash-mismatch ALGO EXPECTED ACTUAL` from `guix
                    # substitute` and traces it, then the failure with that status line.
                    self.trace(f"@ hash-mismatch {display} {exc.status}")
                    self.trace(f"@ substituter-failed {display} hash-mismatch {exc.status} {exc}")
                    break
                if isinstance(exc, TimedOut):
                    self.trace(f"@ substituter-failed {display} timeout")
                    break
                self.trace(f"@ substituter-failed {display} 1 {exc}")
                continue
            except BaseException:
                store_delete(staged)
                raise
            store._install(
                path, staged, hit.references, deriver=hit.deriver, nar_hash=digest,
                nar_size=registered_size(hit.narinfo, size),
            )  # fmt: skip
            if not store.is_valid_path(path):
                return False
            self.trace(f"@ substituter-succeeded {display}")
            return True
        if not errors:
            self.message(LVL_ERROR, f"no supported download for `{display}'")
            self.trace(f"@ substituter-failed {display} 1 no supported download")
        return False

    def trace(self, text: str) -> None:
        """A build trace line (`--print-build-trace` / `#:print-build-trace`)."""
        if self.store.settings.print_build_trace:
            self.message(LVL_ERROR, text)

    def _check(self, info: Narinfo, display: str, digest: bytes, size: int) -> None:
        """The NAR hash against the narinfo's `NarHash`.  Like upstream (`guix substitute`
        compares the hash only), `NarSize` is not checked against the download."""
        if not info.nar_hash:
            raise FetchError(f"no NarHash in the narinfo of `{display}'")
        algo, _, expected_text = info.nar_hash.partition(":")
        if algo != "sha256":
            raise FetchError(f"unknown hash algorithm in `{info.nar_hash}'")
        try:
            expected = (
                bytes.fromhex(expected_text)
                if len(expected_text) == 64
                else base32.decode(expected_text)
            )
        except ValueError:
            raise FetchError(f"bad hash from substituter: {info.nar_hash}") from None
        if expected != digest:
            raise HashMismatch(
                f"hash mismatch for substituted item `{display}'",
                f"sha256 {base32.encode(expected)} {base32.encode(digest)}",
            )

    def _open(
        self, url: str, clock: _Clock | None = None
    ) -> tuple[Iterator[bytes], Callable[[], None], bool]:
        """A stream of body chunks of ``url`` (redirects followed), its closer, and whether the
        body has an end of its own (a file, a Content-Length, chunking).  Upstream's `guix
        publish -C 0` streams NARs made on the fly with none of these on a kept-alive
        connection: the end of the NAR structure is the only end there is."""
        for _ in range(6):
            parts = urlsplit(url)
            if parts.scheme == "file":
                try:
                    f = open(unquote(parts.path), "rb")  # noqa: SIM115 - closed by the caller
                except OSError as exc:
                    raise FetchError(f"download from '{url}' failed: {exc.strerror}") from None
                return iter(functools.partial(f.read, _READ), b""), f.close, True
            if parts.scheme not in ("http", "https"):
                raise FetchError(f"{url}: unsupported URL scheme")
            host, port = parts.hostname or "localhost", parts.port
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn = self.conns.get(parts.scheme, host, port)
            try:
                if clock is not None:
                    clock.check()
                    _set_timeout(conn, clock.limit(_CONNECT_TIMEOUT))
                conn.request("GET", target or "/", headers={"User-Agent": USER_AGENT})
                resp = conn.getresponse()
            except TimeoutError:
                self.conns.drop(parts.scheme, host, port)
                if clock is not None and (clock.silence or clock.total):
                    raise clock.expired() from None
                raise FetchError(f"download from '{url}' failed: timed out") from None
            except (OSError, http.client.HTTPException) as exc:
                self.conns.drop(parts.scheme, host, port)
                raise FetchError(f"download from '{url}' failed: {exc}") from None
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                url = urljoin(url, resp.getheader("Location", ""))
                continue
            if resp.status != 200:
                resp.read()
                raise FetchError(f"download from '{url}' failed: {resp.status}, \"{resp.reason}\"")

            def chunks(
                r: http.client.HTTPResponse = resp, c: http.client.HTTPConnection = conn
            ) -> Iterator[bytes]:
                while True:
                    if clock is not None:
                        clock.check()
                        _set_timeout(c, clock.limit(_READ_TIMEOUT))
                    try:
                        data = r.read1(_READ)
                    except TimeoutError:
                        if clock is not None and (clock.silence or clock.total):
                            raise clock.expired() from None
                        raise
                    if not data:
                        return
                    yield data

            def done(
                r: http.client.HTTPResponse = resp, s: str = parts.scheme, h: str = host,
                p: int | None = port,
            ) -> None:  # fmt: skip
                if not r.isclosed():
                    self.conns.drop(s, h, p)

            return chunks(), done, resp.length is not None or bool(resp.chunked)
        raise FetchError(f"download from '{url}' failed: too many redirects")

    def _download(
        self, url: str, compression: str, staged: str, clock: _Clock | None = None
    ) -> tuple[bytes, int]:
        """Download, decompress and unpack into ``staged``; the nar's SHA-256 and size."""
        try:
            decomp = decompressor(compression)
        except ValueError as exc:
            raise FetchError(str(exc)) from None
        hasher = hashlib.sha256()
        size = 0
        body, close, framed = self._open(url, clock)
        try:
            with nar.RestoreSink(staged) as sink:
                parser = nar.NarParser(sink)

                def feed(data: bytes) -> None:
                    nonlocal size
                    if not data:
                        return
                    if parser.done:
                        raise FetchError(f"trailing data after the nar from '{url}'")
                    used = parser.feed(data)
                    hasher.update(memoryview(data)[:used])
                    size += used
                    if used != len(data):
                        raise FetchError(f"trailing data after the nar from '{url}'")

                try:
                    for chunk in body:
                        feed(decomp.decompress(chunk))
                        if parser.done and not framed:
                            break  # the connection is dropped by close(), unread
                    else:
                        feed(decomp.flush())
                except (OSError, http.client.HTTPException) as exc:
                    raise FetchError(f"download from '{url}' failed: {exc}") from None
                except (nar.NarError, ValueError) as exc:
                    raise FetchError(f"corrupt substitute from '{url}': {exc}") from None
                except Exception as exc:  # decompressor-specific errors (zstd, lzip)
                    if isinstance(exc, FetchError):
                        raise
                    raise FetchError(f"corrupt substitute from '{url}': {exc}") from None
                if not parser.done:
                    raise FetchError(f"download from '{url}' failed: truncated nar")
        finally:
            close()
        return hasher.digest(), size


#: Without --timeout/--max-silent-time: how long to wait for a server to answer / send more.
_CONNECT_TIMEOUT = 30.0
_READ_TIMEOUT = 30.0


def _set_timeout(conn: http.client.HTTPConnection, seconds: float) -> None:
    conn.timeout = seconds
    if conn.sock is not None:
        conn.sock.settimeout(seconds)


def _setting(settings: object, name: str) -> int:
    try:
        return max(int(settings.get(name) or 0), 0)  # type: ignore[attr-defined]
    except ValueError:
        return 0


def _server_down_warning(host: str, reason: BaseException) -> str:
    """Upstream's call-with-connection-error-handling (guix/substitutes.scm) words."""
    if isinstance(reason, socket.gaierror):
        text = f"host not found: {reason.strerror}"
    elif isinstance(reason, OSError) and reason.strerror:
        text = f"connection failed: {reason.strerror}"
    else:
        text = f"connection failed: {reason}"
    return f"guix substitute: warning: {host}: {text}"


class _ServerDown(Exception):
    def __init__(self, url: str, reason: BaseException) -> None:
        super().__init__(url)
        self.url = url
        self.reason = reason


def store_delete(path: str) -> None:
    with contextlib.suppress(OSError):
        remove_tree(path)


def for_store(store: LocalStore) -> Substituter:
    """The session's substituter (one per LocalStore, so its lookups are shared)."""
    sub = getattr(store, "_substituter", None)
    if sub is None:
        sub = Substituter(store, store.message)
        store._substituter = sub  # type: ignore[attr-defined]
    return sub
