"""The `guix publish` HTTP server: routes, narinfo signing, nar streaming, the baking cache.

Behaviour follows spec/substitutes.md §1-§4 so that `guix substitute` (and Nix-style tools)
cannot tell it from upstream.  The server is one aiohttp event loop; everything that blocks
runs in thread pools: daemon RPCs (a few `DaemonClient` connections, one per thread), nar
serialisation and compression (chunk by chunk, so a nar is never whole in memory), and baking.
Cached nars are sent with `sendfile` (aiohttp's FileResponse, which also serves HTTP ranges),
and so are the contents of big files in uncompressed nars (`narstream`).  Narinfo answers are
remembered by hash part (`memo`); `cli` runs one such server process per core.  uvloop is used
when installed.
Beyond upstream: HTTP Range on uncompressed nars, `/metrics` (Prometheus text) and `/health`;
`/` is our own landing page (key, commands and NixOS snippet for this server's URL), and
`/signing-key.pub` serves the key narinfos are signed with (upstream: `<conf>/signing-key.pub`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import html
import itertools
import os
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

from aiohttp import web

from guixsvc import __version__
from guixsvc.pki import keys
from guixsvc.protocol.client import DaemonClient, DaemonError, default_socket
from guixsvc.publish.cli import PublishOptions
from guixsvc.publish.memo import NarinfoMemo, item_signature
from guixsvc.publish.narstream import FileRegion, nar_parts, send_file_region
from guixsvc.store import base32, nar
from guixsvc.store.compression import compressor
from guixsvc.store.config import StoreConfig
from guixsvc.store.narinfo import render_narinfo
from guixsvc.store.paths import InvalidName, InvalidStorePath, StorePath, check_name

T = TypeVar("T")

NARINFO_TYPE = "application/x-nix-narinfo;charset=utf-8"
NAR_TYPE = "application/x-nix-archive;charset=ISO-8859-1"
OCTET_TYPE = "application/octet-stream;charset=ISO-8859-1"
TEXT_TYPE = "text/plain;charset=utf-8"
BAKING_TTL = 300
_BASE32_RE = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]*")
_COMPRESSED_EXT = (".gz", ".bz2", ".xz", ".lz", ".lzma", ".tgz", ".tbz2", ".zip")
_NAR_CHUNK = 1 << 20

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(frozen=True)
class ItemInfo:
    """What a narinfo needs from the daemon's QueryPathInfo."""

    path: str
    deriver: str | None
    nar_hash: bytes
    references: tuple[str, ...]
    registration_time: int
    nar_size: int


class Metrics:
    """Counters for `/metrics`, in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.bytes: dict[str, int] = {}
        self.cache: dict[str, int] = {"hit": 0, "miss": 0}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.buckets.get(route)
        if counts is None:
            counts = self.buckets[route] = [0] * (len(_LATENCY_BUCKETS) + 1)
        counts[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # cumulated in render
        self.sums[route] = self.sums.get(route, 0.0) + seconds

    def sent(self, route: str, n: int) -> None:
        self.bytes[route] = self.bytes.get(route, 0) + n

    def render(self) -> str:
        out = [
            "# HELP guix_publish_requests_total HTTP requests by route and status.",
            "# TYPE guix_publish_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'guix_publish_requests_total{{route="{route}",status="{status}"}} {n}')
        out += [
            "# HELP guix_publish_sent_bytes_total Response body bytes by route.",
            "# TYPE guix_publish_sent_bytes_total counter",
        ]
        for route, n in sorted(self.bytes.items()):
            out.append(f'guix_publish_sent_bytes_total{{route="{route}"}} {n}')
        out += [
            "# HELP guix_publish_cache_total Nar and narinfo cache lookups (--cache).",
            "# TYPE guix_publish_cache_total counter",
        ]
        for result, n in sorted(self.cache.items()):
            out.append(f'guix_publish_cache_total{{result="{result}"}} {n}')
        out += [
            "# HELP guix_publish_request_seconds Request handling latency.",
            "# TYPE guix_publish_request_seconds histogram",
        ]
        for route, per_bucket in sorted(self.buckets.items()):
            counts = list(itertools.accumulate(per_bucket))
            name = "guix_publish_request_seconds"
            for bound, n in zip(_LATENCY_BUCKETS, counts, strict=False):
                out.append(f'{name}_bucket{{route="{route}",le="{bound}"}} {n}')
            out.append(f'{name}_bucket{{route="{route}",le="+Inf"}} {counts[-1]}')
            out.append(f'{name}_sum{{route="{route}"}} {self.sums[route]:.6f}')
            out.append(f'{name}_count{{route="{route}"}} {counts[-1]}')
        return "\n".join(out) + "\n"


class LineLog:
    """The request log: buffered, flushed by the server every half second, and written to the
    underlying descriptor in pieces of whole lines of at most PIPE_BUF bytes, so the lines of
    several server processes sharing one stdout (a pipe to the journal) never interleave."""

    PIECE = 4096

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._parts: list[str] = []

    def write(self, text: str) -> None:
        self._parts.append(text)

    def flush(self) -> None:
        if not self._parts:
            return
        data = "".join(self._parts).encode("utf-8", "surrogateescape")
        self._parts.clear()
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.stream.write(data.decode("utf-8", "surrogateescape"))
            self.stream.flush()
            return
        self.stream.flush()
        view = memoryview(data)
        while view:
            cut = len(view)
            if cut > self.PIECE:
                nl = data.rfind(b"\n", len(data) - len(view), len(data) - len(view) + self.PIECE)
                cut = nl + 1 - (len(data) - len(view)) if nl >= 0 else self.PIECE
            written = os.write(fd, view[:cut])
            view = view[written:]


class DaemonPool:
    """Blocking daemon RPCs run on a few threads, each with its own connection."""

    def __init__(self, uri: str, size: int = 4) -> None:
        self.uri = uri
        self.executor = ThreadPoolExecutor(size, thread_name_prefix="daemon")
        self._local = threading.local()

    def _client(self) -> DaemonClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = DaemonClient(self.uri)
        return client

    def _call(self, fn: Callable[[DaemonClient], T]) -> T:
        for attempt in (0, 1):
            try:
                return fn(self._client())
            except (OSError, EOFError):
                client = getattr(self._local, "client", None)
                self._local.client = None
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[[DaemonClient], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._call, fn)

    def run_sync(self, fn: Callable[[DaemonClient], T]) -> T:
        return self._call(fn)


class NarProducer:
    """Serialise and compress one store item, a chunk per `next_chunk` call (run in a thread)."""

    def __init__(self, path: str, kind: str, level: int, skip: int = 0) -> None:
        self._dump: Iterator[bytes] = nar.dump(path)
        self._comp = compressor(kind, level)
        self._skip = skip
        self._done = False

    def next_chunk(self) -> bytes | None:
        if self._done:
            return None
        out: list[bytes] = []
        size = 0
        for chunk in self._dump:
            if self._skip:
                if len(chunk) <= self._skip:
                    self._skip -= len(chunk)
                    continue
                chunk = chunk[self._skip :]
                self._skip = 0
            data = self._comp.compress(chunk)
            if data:
                out.append(data)
                size += len(data)
            if size >= _NAR_CHUNK:
                return b"".join(out)
        self._done = True
        out.append(self._comp.flush())
        return b"".join(out)

    def close(self) -> None:
        close = getattr(self._dump, "close", None)
        if close is not None:
            close()


def _split_path(raw: str) -> list[str] | None:
    """Guile's split-and-decode-uri-path; None for a component we refuse (``/``, ``..``)."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    parts = []
    for comp in path.split("/"):
        if not comp:
            continue
        dec = unquote(comp, errors="strict") if "%" in comp else comp
        if "/" in dec or "\0" in dec or dec in (".", ".."):
            return None
        parts.append(dec)
    return parts


# -- the landing page ----------------------------------------------------------------------

# A Host header we are willing to print into shell commands and Nix code: a DNS name or an
# IPv4 address, or a bracketed IPv6 address, with an optional port.
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)


def request_base_url(request: web.Request) -> str:
    """This server's URL as the client that sent `request` reaches it: the scheme and host of
    the request (or of `X-Forwarded-Proto`/`X-Forwarded-Host`, set by a reverse proxy), else
    the address the connection came in on.  Only hosts matching `_HOST_RE` are used."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else request.scheme
    for host in (
        request.headers.get("X-Forwarded-Host", "").split(",")[0].strip(),
        request.headers.get("Host", "").strip(),
    ):
        if host and _HOST_RE.fullmatch(host):
            return f"{scheme}://{host}"
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        address = str(sockname[0])
        if ":" in address:
            address = f"[{address}]"
        return f"{scheme}://{address}:{sockname[1]}"
    return f"{scheme}://localhost"


def _key_file_name(url: str) -> str:
    """A file name for this server's key that is also a valid Nix path literal."""
    host = url.split("://", 1)[-1]
    return "substitutes-" + re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip("-") + ".pub"


def _compression_text(kind: str, level: int) -> str:
    return "none (uncompressed)" if kind == "none" else f"{kind} (level {level})"


def render_landing_page(
    *,
    url: str,
    store_dir: str,
    public_key: str,
    compressions: list[tuple[str, int]],
    host: str,
) -> str:
    """The page `GET /` answers: what an administrator needs to point a machine here.  Plain
    HTML without scripts, styles or external resources, so that it reads the same in lynx or
    w3m as in a graphical browser.  Every interpolated value is escaped."""
    e = html.escape
    key_file = _key_file_name(url)
    comps = ", ".join(_compression_text(k, level) for k, level in compressions)
    trust = (
        f"curl -fsS -o {key_file} {url}/signing-key.pub\nsudo guix archive --authorize < {key_file}"
    )
    use = (
        "# for one command:\n"
        f"guix build --substitute-urls='{url}' hello\n"
        "# for every command, in the daemon (Guix's official servers kept after this one):\n"
        f"guix-daemon --substitute-urls='{url} https://bordeaux.guix.gnu.org"
        " https://ci.guix.gnu.org'\n"
        "# what this server has for a package, and how fast it answers:\n"
        f"guix weather --substitute-urls='{url}' hello"
    )
    guix_system = (
        f";; config.scm, with the key saved next to it as {key_file} (see above).\n"
        "(modify-services %base-services\n"
        "  (guix-service-type config =>\n"
        "    (guix-configuration\n"
        "      (inherit config)\n"
        f'      (substitute-urls (cons "{url}" %default-substitute-urls))\n'
        f'      (authorized-keys (cons (local-file "{key_file}")\n'
        "                             %default-authorized-guix-keys)))))"
    )
    nixos = (
        f"# configuration.nix, with the key saved next to it as {key_file} (see above).\n"
        "# Setting these lists drops Guix's official servers; to keep them, write\n"
        "#   options.services.guix.substituters.urls.default ++ [ ... ]\n"
        "# (likewise for authorizedKeys), with `options` among the module's arguments.\n"
        f'services.guix.substituters.urls = [ "{url}" ];\n'
        f"services.guix.substituters.authorizedKeys = [ ./{key_file} ];"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>Guix substitutes from {e(host)}</title></head>\n<body>\n"
        f"<h1>Guix substitutes from {e(host)}</h1>\n"
        f"<p>This is guixsvc publish {e(__version__)}, serving signed binaries (substitutes) "
        f"of the store <code>{e(store_dir)}</code> at <code>{e(url)}</code>.  Guix clients "
        "use them instead of building when they trust the key below and list this URL among "
        "their substitute servers.  A client only benefits when its store directory is also "
        f"<code>{e(store_dir)}</code>.</p>\n"
        f"<p>Archives are offered compressed with: {e(comps)}.</p>\n"
        "<h2>Signing key</h2>\n"
        "<p>Every narinfo served here is signed with this public key "
        '(<a href="signing-key.pub">download it as signing-key.pub</a>):</p>\n'
        f'<pre id="signing-key">{e(public_key)}</pre>\n'
        "<h2>Trusting this server</h2>\n"
        "<p>On the client, fetch the key and add it to the access-control list "
        "(<code>/etc/guix/acl</code>; this needs root):</p>\n"
        f"<pre>{e(trust)}</pre>\n"
        "<h2>Using it</h2>\n"
        f"<pre>{e(use)}</pre>\n"
        "<h2>On Guix System</h2>\n"
        f"<pre>{e(guix_system)}</pre>\n"
        "<h2>On NixOS</h2>\n"
        f"<pre>{e(nixos)}</pre>\n"
        "<h2>For machines and monitoring</h2>\n<ul>\n"
        '<li><a href="nix-cache-info">nix-cache-info</a>: the store directory and priority, '
        "for Nix-style clients</li>\n"
        '<li><a href="metrics">metrics</a>: request counts, bytes and latencies '
        "(Prometheus text format)</li>\n"
        '<li><a href="health">health</a>: whether the daemon behind this server answers '
        "(JSON)</li>\n"
        '<li><a href="signing-key.pub">signing-key.pub</a>: the public key above</li>\n'
        "</ul>\n</body></html>\n"
    )


class PublishServer:
    """One `guix publish` instance."""

    def __init__(
        self,
        opts: PublishOptions,
        config: StoreConfig,
        *,
        secret: keys.Key,
        public: keys.Key,
        daemon_uri: str | None = None,
    ) -> None:
        self.opts = opts
        self.config = config
        self.store = config.store
        self.secret = secret
        self.public = public
        self.host = socket.gethostname()
        self.daemon = DaemonPool(daemon_uri or default_socket())
        self.io = ThreadPoolExecutor(max(4, (os.cpu_count() or 1) * 2), thread_name_prefix="nar")
        self.bakers = ThreadPoolExecutor(opts.workers, thread_name_prefix="bake")
        self.baking: set[str] = set()
        self.baking_lock = threading.Lock()
        self.last_sweep = 0.0
        self.metrics = Metrics()
        self.narinfo_cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self.memo = NarinfoMemo(config.db_dir)
        self._narinfo_headers = {"Content-Type": NARINFO_TYPE, **self._cache_control(opts.ttl)}
        self.log = LineLog(sys.stdout)

    # -- helpers ---------------------------------------------------------------------------

    def effective(self, kind: str) -> tuple[str, int]:
        """`effective-compression`: the configured entry of that type, else level 3."""
        for k, level in self.opts.compressions:
            if k == kind:
                return k, level
        return kind, (0 if kind == "none" else 3)

    def actual_compressions(self, path: str) -> list[tuple[str, int]]:
        if path.endswith(_COMPRESSED_EXT):
            return [("none", 0)]
        return list(self.opts.compressions)

    def _cache_control(self, ttl: int | None) -> dict[str, str]:
        return {} if ttl is None else {"Cache-Control": f"max-age={ttl}"}

    def not_found(
        self, request: web.Request, phrase: str = "Resource not found", ttl: int | None = None,
        baking: bool = False,
    ) -> web.Response:  # fmt: skip
        headers = {"Content-Type": TEXT_TYPE, **self._cache_control(ttl)}
        if baking:
            headers["X-Baking"] = "1"
        self.log.write(f"-> {request.method} {request.path}: 404{' (baking)' if baking else ''}\n")
        return web.Response(status=404, body=f"{phrase}: {request.path}".encode(), headers=headers)

    async def item_info(self, path: str) -> ItemInfo | None:
        def query(c: DaemonClient) -> ItemInfo | None:
            try:
                info = c.query_path_info(path)
            except DaemonError:
                return None
            return ItemInfo(
                path, info.deriver, bytes.fromhex(info.nar_hash), tuple(info.references),
                info.registration_time, info.nar_size,
            )  # fmt: skip

        return await self.daemon.run(query)

    async def hash_to_path(self, hash_part: str) -> str | None:
        if len(hash_part) != 32:
            return None

        def query(c: DaemonClient) -> str | None:
            try:
                return c.query_path_from_hash_part(hash_part)
            except DaemonError:
                return None

        return await self.daemon.run(query)

    def narinfo_text(
        self, info: ItemInfo, compressions: list[tuple[str, int | None]]
    ) -> bytes:  # fmt: skip
        key = (info.path, info.registration_time, info.nar_hash, tuple(compressions))
        text = self.narinfo_cache.get(key)
        if text is not None:
            self.narinfo_cache.move_to_end(key)
            return text
        text = render_narinfo(
            path=info.path, nar_hash=info.nar_hash, nar_size=info.nar_size,
            references=info.references, deriver=info.deriver, compressions=compressions,
            nar_path=self.opts.nar_path, secret_key=self.secret, public_key=self.public,
            host=self.host,
        )  # fmt: skip
        self.narinfo_cache[key] = text
        if len(self.narinfo_cache) > 20000:
            self.narinfo_cache.popitem(last=False)
        return text

    def live_compressions(self, info: ItemInfo) -> list[tuple[str, int | None]]:
        kinds = self.actual_compressions(info.path)
        if len(kinds) == 1 and kinds[0][0] == "none":
            return [("none", info.nar_size)]
        return [(k, None) for k, _ in kinds]

    async def narinfo_response(self, info: ItemInfo, ttl: int | None) -> web.Response:
        loop = asyncio.get_running_loop()
        comps = self.live_compressions(info)
        key = (info.path, info.registration_time, info.nar_hash, tuple(comps))
        text = self.narinfo_cache.get(key)
        if text is None:
            text = await loop.run_in_executor(self.io, self.narinfo_text, info, comps)
        headers = {"Content-Type": NARINFO_TYPE, **self._cache_control(ttl)}
        return web.Response(body=text, headers=headers)

    # -- routes ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        route = "other"
        status = 500
        try:
            route, response = await self.dispatch(request)
            status = response.status
            return response
        finally:
            self.metrics.observe(route, status, time.perf_counter() - start)

    async def dispatch(self, request: web.Request) -> tuple[str, web.StreamResponse]:
        if request.method != "GET":
            return "other", self.not_found(request)
        self.log.write(f"GET {request.path}\n")
        try:
            parts = _split_path(request.raw_path)
        except UnicodeDecodeError:
            parts = None
        if parts is None:
            return "other", self.not_found(request)
        n = len(parts)
        nar_path = list(self.opts.nar_path)
        k = len(nar_path)
        if parts == ["nix-cache-info"]:
            body = f"StoreDir: {self.config.store_dir}\nWantMassQuery: 0\nPriority: 100\n"
            return "nix-cache-info", web.Response(
                body=body.encode(), headers={"Content-Type": TEXT_TYPE}
            )
        if parts in ([], ["index.html"]):
            return "home", self.landing_page(request)
        if parts == ["signing-key.pub"]:
            return "signing-key", await self.signing_key(request)
        if parts == ["health"]:
            return "health", await self.health()
        if parts == ["metrics"]:
            return "metrics", web.Response(
                body=self.metrics.render().encode(),
                headers={"Content-Type": "text/plain; version=0.0.4;charset=utf-8"},
            )
        if n == 1 and parts[0].endswith(".narinfo"):
            hash_part = parts[0][: -len(".narinfo")]
            if _BASE32_RE.fullmatch(hash_part):
                return "narinfo", await self.narinfo(request, hash_part)
        if n == 4 and parts[0] == "file" and parts[2] == "sha256":
            return "file", await self.content_addressed(request, parts[1], parts[3])
        if n == 2 and parts[0] == "log":
            return "log", await self.log_file(request, parts[1])
        if n == k + 2 and parts[:k] == nar_path and parts[k] in ("gzip", "lzip", "zstd"):
            return "nar", await self.nar(request, parts[k], parts[k + 1])
        if n == k + 1 and parts[:k] == nar_path:
            return "nar", await self.nar(request, "none", parts[k])
        return "other", self.not_found(request)

    def public_key_text(self) -> str:
        """The key narinfos are signed with, as `guix archive --generate-key` writes it."""
        return self.public.to_bytes().decode("latin-1")

    async def signing_key(self, request: web.Request) -> web.StreamResponse:
        # Upstream reads <conf>/signing-key.pub at each request, whatever --public-key says;
        # we serve the key this server signs with, so the page and the download agree.
        return web.Response(
            body=self.public_key_text().encode(),
            headers={"Content-Type": "text/plain;charset=UTF-8"},
        )

    def landing_page(self, request: web.Request) -> web.Response:
        page = render_landing_page(
            url=request_base_url(request),
            store_dir=self.config.store_dir,
            public_key=self.public_key_text(),
            compressions=self.opts.compressions,
            host=self.host,
        )
        return web.Response(body=page.encode(), headers={"Content-Type": "text/html;charset=UTF-8"})

    async def health(self) -> web.Response:
        try:
            await self.daemon.run(lambda c: c.query_valid_paths([]))
        except (OSError, EOFError, DaemonError) as exc:
            return web.json_response({"status": "error", "daemon": str(exc)}, status=503)
        return web.json_response({"status": "ok", "store": self.config.store_dir})

    async def narinfo(self, request: web.Request, hash_part: str) -> web.StreamResponse:
        if self.opts.cache is not None:
            return await self.narinfo_cached(request, hash_part)
        memo = self.memo
        body = memo.get(hash_part)
        if body is not None:
            if body is memo.MISSING:
                return self.not_found(request, "", self.opts.negative_ttl)
            return web.Response(body=body, headers=self._narinfo_headers)
        db_sig = memo.before_query()
        path = await self.hash_to_path(hash_part)
        item_sig = item_signature(path) if path else None
        info = await self.item_info(path) if path else None
        if info is None:
            memo.put_missing(hash_part, db_sig)
            return self.not_found(request, "", self.opts.negative_ttl)
        response = await self.narinfo_response(info, self.opts.ttl)
        assert isinstance(response.body, bytes)
        memo.put(hash_part, info.path, response.body, item_sig)
        return response

    def _parse_item(self, item: str) -> str | None:
        try:
            sp = StorePath.from_base_name(item)
        except (InvalidStorePath, InvalidName, ValueError):
            return None
        return self.store.display(sp)

    async def nar(self, request: web.Request, kind: str, item: str) -> web.StreamResponse:
        path = self._parse_item(item)
        if path is None:
            return self.not_found(request)
        if self.opts.cache is not None:
            return await self.nar_cached(request, kind, path)
        info = await self.item_info(path)
        if info is None:
            return self.not_found(request)
        kind, level = self.effective(kind)
        return await self.stream_nar(request, info, kind, level)

    def _range(self, request: web.Request, total: int) -> tuple[int, int] | bool | None:
        """The single byte range asked for: (start, end inclusive), None for the whole body,
        False when unsatisfiable."""
        header = request.headers.get("Range")
        if not header:
            return None
        m = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", header)
        if not m or (not m.group(1) and not m.group(2)):
            return None
        if m.group(1):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else total - 1
        else:
            start, end = max(0, total - int(m.group(2))), total - 1
        end = min(end, total - 1)
        if start > end or start >= total:
            return False
        return start, end

    async def stream_nar(
        self, request: web.Request, info: ItemInfo, kind: str, level: int
    ) -> web.StreamResponse:
        headers = {"Content-Type": NAR_TYPE}
        skip, length, status = 0, None, 200
        if kind == "none":
            headers["Accept-Ranges"] = "bytes"
            length = info.nar_size
            rng = self._range(request, info.nar_size)
            if rng is False:
                return web.Response(
                    status=416, headers={"Content-Range": f"bytes */{info.nar_size}"}
                )
            if isinstance(rng, tuple):
                skip, length, status = rng[0], rng[1] - rng[0] + 1, 206
                headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{info.nar_size}"
        loop = asyncio.get_running_loop()
        if kind == "none" and status == 200 and request.transport is not None:
            return await self.send_nar_plain(request, info, headers)
        try:
            producer = await loop.run_in_executor(
                self.io, NarProducer, info.path, kind, level, skip
            )
        except OSError:
            return self.not_found(request)
        response = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        sent = 0
        try:
            while length is None or sent < length:
                chunk = await loop.run_in_executor(self.io, producer.next_chunk)
                if chunk is None:
                    break
                if length is not None and sent + len(chunk) > length:
                    chunk = chunk[: length - sent]
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client went away: normal (upstream's `guix substitute` leaves the final CRLF
            # of a chunked body unread and drops the connection; downloads get interrupted).
            self.log.write(f"-> {request.method} {request.path}: client went away\n")
        finally:
            await loop.run_in_executor(self.io, producer.close)
            self.metrics.sent("nar", sent)
        return response

    async def send_nar_plain(
        self, request: web.Request, info: ItemInfo, headers: dict[str, str]
    ) -> web.StreamResponse:
        """A whole uncompressed NAR: framing and small files written, big files' contents
        sent with sendfile (`narstream`)."""
        loop = asyncio.get_running_loop()
        parts = nar_parts(info.path)
        try:
            first = await loop.run_in_executor(self.io, next, parts, None)
        except (OSError, nar.NarError):
            parts.close()
            return self.not_found(request)
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = info.nar_size
        await response.prepare(request)
        sent = 0
        part = first
        try:
            while part is not None:
                if isinstance(part, FileRegion):
                    transport = request.transport
                    if transport is None:
                        raise ConnectionResetError("connection lost")
                    await send_file_region(transport, part)
                    sent += part.size
                else:
                    await response.write(part)
                    sent += len(part)
                part = await loop.run_in_executor(self.io, next, parts, None)
            await response.write_eof()
        except ConnectionError:
            self.log.write(f"-> {request.method} {request.path}: client went away\n")
        except (OSError, nar.NarError) as exc:
            # Headers are out: all we can do is cut the connection short.
            sys.stderr.write(f"guix publish: warning: '{info.path}': {exc}\n")
            if request.transport is not None:
                request.transport.close()
        finally:
            await loop.run_in_executor(self.io, parts.close)
            self.metrics.sent("nar", sent)
        return response

    async def content_addressed(
        self, request: web.Request, name: str, hash_text: str
    ) -> web.StreamResponse:
        try:
            check_name(name)
            digest = base32.decode(hash_text)
        except (InvalidName, ValueError):
            return self.not_found(request)
        if len(digest) != 32:
            return self.not_found(request)
        sp = self.store.make_fixed_output_path(False, "sha256", digest, name)
        path = self.store.display(sp)
        info = await self.item_info(path)
        if info is None or not os.path.isfile(path) or os.path.islink(path):
            return self.not_found(request)
        self.metrics.sent("file", os.path.getsize(path))
        return _RawFileResponse(path, headers={"Content-Type": OCTET_TYPE})

    async def log_file(self, request: web.Request, item: str) -> web.StreamResponse:
        path = self._parse_item(item)
        if path is None:
            return self.not_found(request)
        candidates = [item] if item.endswith(".drv") else []
        if not candidates:
            derivers = await self.daemon.run(lambda c: c.query_valid_derivers(path))
            candidates = [d.rsplit("/", 1)[-1] for d in derivers]
        for drv in candidates:
            base = os.path.join(self.config.log_dir, "drvs", drv[:2], drv[2:])
            for suffix, headers in (
                (".gz", {"Content-Type": "text/plain;charset=UTF-8", "Content-Encoding": "gzip"}),
                (".bz2", {"Content-Type": "application/x-bzip2;charset=ISO-8859-1"}),
                ("", {"Content-Type": "text/plain;charset=UTF-8"}),
            ):
                if os.path.isfile(base + suffix):
                    return _RawFileResponse(base + suffix, headers=headers)
        return self.not_found(request)

    # -- cache mode (spec/substitutes.md §4) -------------------------------------------------

    def _cache_file(self, kind: str, base: str, ext: str) -> str:
        assert self.opts.cache is not None
        return os.path.join(self.opts.cache, kind, base + ext)

    def _hash_mapping(self, hash_part: str) -> str:
        assert self.opts.cache is not None
        return os.path.join(self.opts.cache, "hashes", hash_part)

    async def narinfo_cached(self, request: web.Request, hash_part: str) -> web.StreamResponse:
        if len(hash_part) != 32:
            return self.not_found(request, "", self.opts.negative_ttl)
        try:
            with open(self._hash_mapping(hash_part)) as f:
                path: str | None = f.read()
        except OSError:
            path = await self.hash_to_path(hash_part)
            if path is None:
                return self.not_found(request, ttl=self.opts.negative_ttl)
            _write_atomic(self._hash_mapping(hash_part), path.encode())
        assert path is not None
        base = path.rsplit("/", 1)[-1]
        main_kind = self.actual_compressions(path)[0][0]
        cached = self._cache_file(main_kind, base, ".narinfo")
        try:
            with open(cached, "rb") as f:
                text = f.read()
            with contextlib.suppress(OSError):
                st = os.stat(cached)
                os.utime(cached, ns=(time.time_ns(), st.st_mtime_ns))
            self.metrics.cache["hit"] += 1
            return web.Response(
                body=text,
                headers={"Content-Type": NARINFO_TYPE, **self._cache_control(self.opts.ttl)},
            )
        except OSError:
            pass
        info = await self.item_info(path)
        if info is None:
            return self.not_found(request, "", self.opts.negative_ttl)
        self.metrics.cache["miss"] += 1
        self.schedule_bake(info)
        if info.nar_size < self.opts.bypass_threshold:
            return await self.narinfo_response(info, BAKING_TTL)
        return self.not_found(request, "We're baking it", BAKING_TTL, baking=True)

    async def nar_cached(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        kind, level = self.effective(kind)
        cached = self._cache_file(kind, path.rsplit("/", 1)[-1], ".nar")
        if os.path.isfile(cached):
            self.metrics.cache["hit"] += 1
            headers = {"Content-Type": OCTET_TYPE, **self._cache_control(self.opts.ttl)}
            self.metrics.sent("nar", os.path.getsize(cached))
            return _RawFileResponse(cached, headers=headers)
        self.metrics.cache["miss"] += 1
        info = await self.item_info(path)
        if info is None or info.nar_size >= self.opts.bypass_threshold:
            return self.not_found(request)
        return await self.stream_nar(request, info, kind, min(level, 2))

    def schedule_bake(self, info: ItemInfo) -> None:
        with self.baking_lock:
            if info.path in self.baking:
                return
            self.baking.add(info.path)
        future = self.bakers.submit(self.bake, info)
        future.add_done_callback(lambda _: self.baking.discard(info.path))
        if self.opts.ttl is not None and time.time() - self.last_sweep >= self.opts.ttl:
            self.last_sweep = time.time()
            self.bakers.submit(self.sweep)

    def bake(self, info: ItemInfo) -> None:
        """`bake-narinfo+nar`: compress the nar for every compression, then write the narinfo
        with each file's size into the main type's directory and hard-link it elsewhere."""
        base = info.path.rsplit("/", 1)[-1]
        comps = self.actual_compressions(info.path)
        main = self._cache_file(comps[0][0], base, ".narinfo")
        if os.path.exists(main):
            return
        sizes: list[tuple[str, int | None]] = []
        try:
            for kind, level in comps:
                target = self._cache_file(kind, base, ".nar")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp.{os.getpid()}"
                producer = NarProducer(info.path, kind, level)
                try:
                    with open(tmp, "wb") as out:
                        while (chunk := producer.next_chunk()) is not None:
                            out.write(chunk)
                finally:
                    producer.close()
                os.chmod(tmp, 0o644 & ~_umask())
                os.rename(tmp, target)
                sizes.append((kind, os.path.getsize(target)))
            text = self.narinfo_text(info, sizes)
            _write_atomic(main, text)
            for kind, _ in comps[1:]:
                other = self._cache_file(kind, base, ".narinfo")
                with contextlib.suppress(FileExistsError):
                    os.link(main, other)
        except (OSError, nar.NarError) as exc:
            sys.stderr.write(f"guix publish: warning: failed to bake '{info.path}': {exc}\n")

    def sweep(self) -> None:
        """Expire narinfos whose item is gone and whose atime is older than the TTL."""
        assert self.opts.cache is not None and self.opts.ttl is not None
        now = time.time()
        for kind in ("none", "gzip", "lzip", "zstd"):
            directory = os.path.join(self.opts.cache, kind)
            with contextlib.suppress(OSError):
                for name in os.listdir(directory):
                    if not name.endswith(".narinfo"):
                        continue
                    base = name[: -len(".narinfo")]
                    file = os.path.join(directory, name)
                    try:
                        if os.path.lexists(os.path.join(self.config.store_dir, base)):
                            continue
                        if os.stat(file).st_atime + self.opts.ttl > now:
                            continue
                    except OSError:
                        continue
                    for victim in (
                        file, os.path.join(directory, base + ".nar"),
                        self._hash_mapping(base[:32]),
                    ):  # fmt: skip
                        with contextlib.suppress(OSError):
                            os.unlink(victim)
        with contextlib.suppress(OSError):
            _write_atomic(
                os.path.join(self.opts.cache, "last-expiry-cleanup"), str(int(now) + 37).encode()
            )

    # -- running ---------------------------------------------------------------------------

    def make_server(self) -> web.Server:
        """aiohttp's low-level server: every request goes to `handle` (our own dispatch),
        without an Application's router and middleware machinery."""
        return web.Server(self.handle, access_log=None)  # type: ignore[arg-type]

    async def serve(self, sock: socket.socket, stop: asyncio.Event | None = None) -> None:
        runner = web.ServerRunner(self.make_server(), handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock, shutdown_timeout=1.0)
        await site.start()
        self.log.flush()
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        flusher = asyncio.create_task(self._flush_log(stop))
        advertiser = await self._advertise() if self.opts.advertise else None
        try:
            await stop.wait()
        finally:
            flusher.cancel()
            if advertiser is not None:
                await advertiser.close()
            await runner.cleanup()
            self.log.flush()

    async def _advertise(self) -> Any:
        """`--advertise`: register `_guix_publish._tcp` on `--port` with avahi-daemon."""
        from guixsvc import avahi

        def warn(text: str) -> None:
            sys.stderr.write(f"guix publish: warning: {text}\n")
            sys.stderr.flush()

        advertiser = avahi.Advertiser(avahi.service_name(), self.opts.port, log=warn)
        try:
            await advertiser.start()
        except avahi.AvahiError as exc:
            warn(f"cannot advertise on the local network: {exc}")
            return None
        return advertiser

    async def _flush_log(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            with contextlib.suppress(OSError, ValueError):
                self.log.flush()

    def run(self, sock: socket.socket) -> None:
        if self.opts.cache is not None:
            for kind, _ in self.opts.compressions:
                os.makedirs(os.path.join(self.opts.cache, kind), exist_ok=True)
            os.makedirs(os.path.join(self.opts.cache, "hashes"), exist_ok=True)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(self.serve(sock))
        self.io.shutdown(wait=False, cancel_futures=True)
        self.bakers.shutdown(wait=False, cancel_futures=True)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (optional dependency: faster transports and
    sendfile), unless `GUIXSVC_PUBLISH_LOOP=asyncio`; None means asyncio's default loop."""
    if os.environ.get("GUIXSVC_PUBLISH_LOOP") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


class _RawFileResponse(web.FileResponse):
    """A FileResponse (sendfile, ranges) that never swaps in a ``.gz``/``.br`` sibling file
    because of Accept-Encoding: next to a store item such a sibling is another store item."""

    def _get_file_path_stat_encoding(self, accept_encoding: str) -> Any:
        return super()._get_file_path_stat_encoding("")

    async def _sendfile(self, request: web.BaseRequest, fobj: Any, offset: int, count: int) -> Any:
        # aiohttp's own path needs the loop's native sendfile, which uvloop lacks (it then
        # copies through Python); `send_file_region` works on either loop.
        writer = await web.StreamResponse.prepare(self, request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        await send_file_region(transport, FileRegion(fobj.fileno(), count, str(self._path), offset))
        await web.StreamResponse.write_eof(self)
        return writer


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644 & ~_umask())
    os.rename(tmp, path)
