"""The daemon behind `guix publish`: a few blocking `DaemonClient` connections on threads.

The server's event loop must never block, and a `DaemonClient` is one blocking connection, so
queries run on a small thread pool with one connection per thread (reconnecting once when the
daemon restarted).  `ItemInfo` is what the routes need of a QueryPathInfo answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from guixsvc.protocol.client import DaemonClient

T = TypeVar("T")


@dataclass(frozen=True)
class ItemInfo:
    """What a narinfo needs from the daemon's QueryPathInfo."""

    path: str
    deriver: str | None
    nar_hash: bytes
    references: tuple[str, ...]
    registration_time: int
    nar_size: int


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
