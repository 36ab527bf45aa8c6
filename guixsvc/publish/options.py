"""`PublishOptions`: what `guix publish`'s command line sets, read by the server.

Its own module so that the server does not import the command line (`cli` imports the
server to run it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

DEFAULT_PORT = 8080
DEFAULT_BYPASS = 10 * 1024 * 1024


@dataclass
class PublishOptions:
    port: int = DEFAULT_PORT
    listen: str | None = None
    address: tuple[str, int] | None = None
    family: int = socket.AF_INET
    user: str | None = None
    advertise: bool = False
    compressions: list[tuple[str, int]] = field(default_factory=list)
    cache: str | None = None
    bypass_threshold: int = DEFAULT_BYPASS
    workers: int = os.cpu_count() or 1
    ttl: int | None = None
    negative_ttl: int | None = None
    nar_path: tuple[str, ...] = ("nar",)
    public_key: str | None = None
    private_key: str | None = None
    warnings: list[str] = field(default_factory=list)
