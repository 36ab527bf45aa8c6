"""`GET /` of `guixsvc publish`: the page an administrator reads when pointing a machine at the
server.  A real server on loopback; the key shown is checked against the key file and used to
verify a narinfo, the commands shown are run (`guixsvc archive --authorize`), and a headless
Chromium renders the page (when Debian's chromium is installed)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.pki import keys
from guixsvc.publish.landing import render_landing_page
from guixsvc.store.narinfo import parse_narinfo
from tests.substitutes.helpers import Node, start_node, start_publish, stop_node

_PRE_KEY = re.compile(r'<pre id="signing-key">(.*?)</pre>', re.S)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str, str]]:
    base = tmp_path_factory.mktemp("landing")
    node = start_node(base / "n", base / "n" / "store", None)
    try:
        keys.generate_key_files(str(node.conf))
        with node.client() as c:
            item = c.add_text_to_store("landing", "hello")
        _, url = start_publish(node, None, "-C", "zstd:3", "-C", "gzip:3")
        yield node, url, item
    finally:
        stop_node(node)


def test_page_shows_the_signing_key_and_verifies_narinfos(server: tuple[Node, str, str]) -> None:
    node, url, item = server
    status, headers, page = get(f"{url}/")
    assert status == 200 and headers["Content-Type"] == "text/html;charset=UTF-8"
    match = _PRE_KEY.search(page)
    assert match, page
    shown = html.unescape(match.group(1))
    assert shown == (node.conf / "signing-key.pub").read_text()
    # The key as shown is the one narinfos are signed with.
    status, _, narinfo = get(f"{url}/{os.path.basename(item)[:32]}.narinfo")
    assert status == 200
    acl = keys.Acl([keys.Key.parse(shown)])
    assert parse_narinfo(narinfo.encode(), url).is_valid(acl)
    assert get(f"{url}/index.html")[2] == page
    # None of upstream's home-page sentences.
    for upstream in ("Knock yourselves out", "speaking.  Welcome", "GNU Guix Substitute Server"):
        assert upstream not in page


def test_signing_key_download_is_authorizable(
    server: tuple[Node, str, str], tmp_path: Path
) -> None:
    node, url, _ = server
    status, headers, body = get(f"{url}/signing-key.pub")
    assert status == 200 and headers["Content-Type"] == "text/plain;charset=UTF-8"
    assert body == (node.conf / "signing-key.pub").read_text()
    # The page's `guix archive --authorize < KEY`, with our archive command on a fresh ACL.
    env = dict(os.environ, GUIX_CONFIGURATION_DIRECTORY=str(tmp_path))
    subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", "archive", "--authorize"],
        input=body.encode(), env=env, check=True, timeout=60,
    )  # fmt: skip
    acl = keys.Acl.load(tmp_path / "acl")
    status, _, narinfo = get(f"{url}/{os.path.basename(server[2])[:32]}.narinfo")
    assert parse_narinfo(narinfo.encode(), url).is_valid(acl)


def test_url_comes_from_the_host_header(server: tuple[Node, str, str]) -> None:
    node, url, _ = server
    _, _, page = get(f"{url}/", {"Host": "cache.example.org:8181"})
    base = "http://cache.example.org:8181"
    assert f"--substitute-urls=&#x27;{base}&#x27;" in page
    assert f"curl -fsS -o substitutes-cache.example.org-8181.pub {base}/signing-key.pub" in page
    assert "sudo guix archive --authorize &lt; substitutes-cache.example.org-8181.pub" in page
    assert f"services.guix.substituters.urls = [ &quot;{base}&quot; ];" in page
    assert (
        "services.guix.substituters.authorizedKeys = [ ./substitutes-cache.example.org-8181.pub ];"
        in page
    )
    assert f"(substitute-urls (cons &quot;{base}&quot; %default-substitute-urls))" in page
    assert "(authorized-keys (cons (local-file &quot;substitutes-cache.example.org-8181.pub" in page
    assert f"<code>{node.store}</code>" in page
    assert "zstd (level 3), gzip (level 3)" in page
    for link in ("nix-cache-info", "metrics", "health", "signing-key.pub"):
        assert f'<a href="{link}">' in page
        assert get(f"{url}/{link}")[0] == 200
    # Behind a TLS-terminating proxy.
    _, _, page = get(
        f"{url}/", {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "guix.example.net"}
    )
    assert "[ &quot;https://guix.example.net&quot; ]" in page
    # IPv6 literal.
    _, _, page = get(f"{url}/", {"Host": "[2001:db8::1]:8080"})
    assert "[ &quot;http://[2001:db8::1]:8080&quot; ]" in page


def test_hostile_host_header_is_not_echoed(server: tuple[Node, str, str]) -> None:
    _, url, _ = server
    for host in ("<script>alert(1)</script>", "a'; rm -rf /; '", 'x" onload="y'):
        status, _, page = get(f"{url}/", {"Host": host})
        assert status == 200
        assert "alert" not in page and "rm -rf" not in page and "onload" not in page
        # Falls back to the address the connection came in on.
        assert f"[ &quot;{url}&quot; ]" in page


def test_everything_interpolated_is_escaped() -> None:
    page = render_landing_page(
        url="http://h", store_dir="/s<t>o&re", public_key="(k <b>)", compressions=[("none", 0)],
        host="<i>me</i>",
    )  # fmt: skip
    assert "<t>" not in page and "<b>" not in page and "<i>" not in page
    assert "/s&lt;t&gt;o&amp;re" in page and "(k &lt;b&gt;)" in page
    assert "&lt;i&gt;me&lt;/i&gt;" in page and "none (uncompressed)" in page


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("a headless browser is needed to render the page (Debian package chromium)")


def test_headless_chromium_renders_the_page(server: tuple[Node, str, str], tmp_path: Path) -> None:
    node, url, _ = server
    browser = _chromium()
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-dev-shm-usage",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", f"{url}/"],
        capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    dom = result.stdout.decode()
    match = _PRE_KEY.search(dom)
    assert match, dom
    assert html.unescape(match.group(1)) == (node.conf / "signing-key.pub").read_text()
    assert "services.guix.substituters.authorizedKeys" in dom
    # Chromium logs every console message (errors included) as ":CONSOLE" lines.
    console = [line for line in stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console)
    # The page asked for nothing that is missing (no favicon or other 404 reached the server).
    _, _, metrics = get(f"{url}/metrics")
    assert 'route="other",status="404"' not in metrics, metrics
