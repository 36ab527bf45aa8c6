"""Sending NARs from `guix publish`: made on the fly (compressed chunk by chunk) or sent
with sendfile (uncompressed NARs' big files, `narstream`; cached files, `_RawFileResponse`).

A NAR is never whole in memory: `NarProducer` serialises and compresses one chunk per call on
the I/O threads, and uncompressed NARs also answer HTTP ranges.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from guixsvc.publish.base import NAR_TYPE, PublishBase
from guixsvc.publish.daemonpool import ItemInfo
from guixsvc.publish.narstream import FileRegion, nar_parts, send_file_region
from guixsvc.store import nar
from guixsvc.store.compression import compressor

_NAR_CHUNK = 1 << 20


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


class NarStreaming(PublishBase):
    """Streaming one store item's NAR as the answer to a request."""

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
        else:
            # Chunked, then closed: upstream's `guix substitute` leaves the final CRLF of a
            # chunked body unread, so a request it sent next on this connection would fail
            # on its side and be sent again on a fresh one (wasted, and a traceback here).
            response.force_close()
        sent = 0
        try:
            await response.prepare(request)
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
        sent = 0
        part = first
        try:
            await response.prepare(request)
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
