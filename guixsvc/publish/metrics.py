"""`/metrics` counters and the request log of `guix publish`.

Split out of the server so the bookkeeping every route does (Prometheus counters, latency
histograms, the request log whose lines several server processes write to one pipe) is read
and tested apart from the routes.
"""

from __future__ import annotations

import bisect
import itertools
import os
from typing import Any

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


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
