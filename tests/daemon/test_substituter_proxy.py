"""The substituter's downloads honour `http_proxy`/`https_proxy`/`no_proxy`, as upstream's
`guix substitute` does: on NixOS the module passes `networking.proxy` to guix-daemon's
environment, and substitutes must come through it."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from guixsvc.daemon import substituter


class _Proxy(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Host")))
        body = b"StoreDir: /gnu/store\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    _Proxy.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def test_http_goes_through_http_proxy(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", proxy)
    conn = substituter._Connections().get("http", "substitutes.invalid", 8080)
    conn.request("GET", "/nix-cache-info")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"StoreDir: /gnu/store\n"
    # The proxy got the absolute URL, and the Host header names the real server.
    assert _Proxy.seen == [
        ("http://substitutes.invalid:8080/nix-cache-info", "substitutes.invalid:8080")
    ]


def test_no_proxy_and_unset_go_direct(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = substituter._Connections().get("http", "substitutes.invalid", None)
    assert (direct.host, direct.port) == ("substitutes.invalid", 80)
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("no_proxy", "substitutes.invalid")
    exempt = substituter._Connections().get("http", "substitutes.invalid", None)
    assert (exempt.host, exempt.port) == ("substitutes.invalid", 80)
    assert _Proxy.seen == []


def test_https_tunnels_through_https_proxy(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", proxy)
    conn = substituter._Connections().get("https", "ci.guix.example", None)
    proxy_port = int(proxy.rsplit(":", 1)[1])
    # Connected to the proxy, CONNECT to the server (TLS and its name check with the server).
    assert (conn.host, conn.port) == ("127.0.0.1", proxy_port)
    assert conn._tunnel_host == "ci.guix.example"  # type: ignore[attr-defined]
    # http_proxy alone does not apply to https.
    monkeypatch.delenv("https_proxy")
    monkeypatch.setenv("http_proxy", proxy)
    conn = substituter._Connections().get("https", "ci.guix.example", None)
    assert conn.host == "ci.guix.example"
