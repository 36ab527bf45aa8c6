"""The `guix publish` HTTP server: routes, narinfo signing, nar streaming, the baking cache.

Behaviour follows spec/substitutes.md §1-§4 so that `guix substitute` (and Nix-style tools)
cannot tell it from upstream.  The server is one aiohttp event loop; everything that blocks
runs in thread pools: daemon RPCs (a few `DaemonClient` connections, one per thread), nar
serialisation and compression (chunk by chunk, so a nar is never whole in memory), and baking.
Cached nars are sent with `sendfile` (aiohttp's FileResponse, which also serves HTTP ranges),
and so are the contents of big files in uncompressed nars (`narstream`).  Narinfo answers are
remembered by hash part (`memo`); `cli` runs one such server process per core.  uvloop is
used when installed.
The class is assembled in layers, each a module: `base` (state, helpers), `narserve` (NAR
streaming), `bake` (the baking cache), `routes` (the router), and this one, which runs it;
`metrics`, `daemonpool`, `landing` and `options` hold the rest.
Beyond upstream: HTTP Range on uncompressed nars, `/metrics` (Prometheus text) and `/health`;
`/` is our own landing page (key, commands and NixOS snippet for this server's URL), and
`/signing-key.pub` serves the key narinfos are signed with (upstream: `<conf>/signing-key.pub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from guixsvc.publish.routes import Routes


class PublishServer(Routes):
    """One `guix publish` instance."""

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
