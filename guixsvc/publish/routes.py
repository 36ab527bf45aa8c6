"""The routes of `guix publish`: one dispatch over the request path, and the handlers.

aiohttp's low-level server hands every request to `Routes.handle`, which times it for
`/metrics` and dispatches on the decoded path the way upstream's `make-request-handler`
does (Guile's `split-and-decode-uri-path`); NARs and the cache come from the layers below.
"""

from __future__ import annotations

import os
import re
import time
from urllib.parse import unquote

from aiohttp import web

from guixsvc.protocol.client import DaemonError
from guixsvc.publish.bake import BakingCache
from guixsvc.publish.base import OCTET_TYPE, TEXT_TYPE
from guixsvc.publish.landing import render_landing_page, request_base_url
from guixsvc.publish.memo import item_signature
from guixsvc.publish.narserve import _RawFileResponse
from guixsvc.store import base32
from guixsvc.store.paths import InvalidName, InvalidStorePath, StorePath, check_name

_BASE32_RE = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]*")


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


class Routes(BakingCache):
    """The request handler: routes and their handlers."""

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
