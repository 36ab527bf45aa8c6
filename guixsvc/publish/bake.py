"""The baking cache of `guix publish --cache` (spec/substitutes.md §4).

A narinfo asked for an item not yet in the cache answers 404 "baking" (or, under
`--cache-bypass-threshold`, a live answer) while a worker thread compresses the NAR for every
compression and then writes the narinfo; cached files are sent with sendfile, and narinfos of
items gone from the store expire after the TTL.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from aiohttp import web

from guixsvc.publish.base import NARINFO_TYPE, OCTET_TYPE
from guixsvc.publish.daemonpool import ItemInfo
from guixsvc.publish.narserve import NarProducer, NarStreaming, _RawFileResponse
from guixsvc.store import nar

BAKING_TTL = 300


class BakingCache(NarStreaming):
    """`--cache`: narinfos and NARs baked into files, served from there."""

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
