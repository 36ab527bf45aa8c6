"""What every part of a `guix publish` server shares: its state, daemon queries, narinfos.

`PublishServer` is assembled from layers (this base, NAR streaming in `narserve`, the baking
cache in `bake`, the router in `routes`, running in `server`); this one holds the options, keys,
pools and caches, and the helpers all routes use: compression choice, 404 answers, item
lookups through the daemon and narinfo rendering (memoised per item and compressions).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from guixsvc.pki import keys
from guixsvc.protocol.client import DaemonClient, DaemonError, default_socket
from guixsvc.publish.daemonpool import DaemonPool, ItemInfo
from guixsvc.publish.memo import NarinfoMemo
from guixsvc.publish.metrics import LineLog, Metrics
from guixsvc.publish.options import PublishOptions
from guixsvc.store.config import StoreConfig
from guixsvc.store.narinfo import render_narinfo

NARINFO_TYPE = "application/x-nix-narinfo;charset=utf-8"
NAR_TYPE = "application/x-nix-archive;charset=ISO-8859-1"
OCTET_TYPE = "application/octet-stream;charset=ISO-8859-1"
TEXT_TYPE = "text/plain;charset=utf-8"
_COMPRESSED_EXT = (".gz", ".bz2", ".xz", ".lz", ".lzma", ".tgz", ".tbz2", ".zip")


class PublishBase:
    """The state of one `guix publish` instance and the helpers of its routes."""

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
