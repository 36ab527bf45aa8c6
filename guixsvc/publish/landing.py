"""The landing page of `guix publish` (`/`): this server's key, commands and a NixOS snippet.

Beyond upstream (whose `/` is a 404).  The page is built for the URL the client reached us
by, so only host names that are safe to print into shell commands and Nix code are used.
"""

from __future__ import annotations

import html
import re

from aiohttp import web

from guixsvc import __version__

# A Host header we are willing to print into shell commands and Nix code: a DNS name or an
# IPv4 address, or a bracketed IPv6 address, with an optional port.
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)


def request_base_url(request: web.Request) -> str:
    """This server's URL as the client that sent `request` reaches it: the scheme and host of
    the request (or of `X-Forwarded-Proto`/`X-Forwarded-Host`, set by a reverse proxy), else
    the address the connection came in on.  Only hosts matching `_HOST_RE` are used."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else request.scheme
    for host in (
        request.headers.get("X-Forwarded-Host", "").split(",")[0].strip(),
        request.headers.get("Host", "").strip(),
    ):
        if host and _HOST_RE.fullmatch(host):
            return f"{scheme}://{host}"
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        address = str(sockname[0])
        if ":" in address:
            address = f"[{address}]"
        return f"{scheme}://{address}:{sockname[1]}"
    return f"{scheme}://localhost"


def _key_file_name(url: str) -> str:
    """A file name for this server's key that is also a valid Nix path literal."""
    host = url.split("://", 1)[-1]
    return "substitutes-" + re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip("-") + ".pub"


def _compression_text(kind: str, level: int) -> str:
    return "none (uncompressed)" if kind == "none" else f"{kind} (level {level})"


def render_landing_page(
    *,
    url: str,
    store_dir: str,
    public_key: str,
    compressions: list[tuple[str, int]],
    host: str,
) -> str:
    """The page `GET /` answers: what an administrator needs to point a machine here.  Plain
    HTML without scripts, styles or external resources, so that it reads the same in lynx or
    w3m as in a graphical browser.  Every interpolated value is escaped."""
    e = html.escape
    key_file = _key_file_name(url)
    comps = ", ".join(_compression_text(k, level) for k, level in compressions)
    trust = (
        f"curl -fsS -o {key_file} {url}/signing-key.pub\nsudo guix archive --authorize < {key_file}"
    )
    use = (
        "# for one command:\n"
        f"guix build --substitute-urls='{url}' hello\n"
        "# for every command, in the daemon (Guix's official servers kept after this one):\n"
        f"guix-daemon --substitute-urls='{url} https://bordeaux.guix.gnu.org"
        " https://ci.guix.gnu.org'\n"
        "# what this server has for a package, and how fast it answers:\n"
        f"guix weather --substitute-urls='{url}' hello"
    )
    guix_system = (
        f";; config.scm, with the key saved next to it as {key_file} (see above).\n"
        "(modify-services %base-services\n"
        "  (guix-service-type config =>\n"
        "    (guix-configuration\n"
        "      (inherit config)\n"
        f'      (substitute-urls (cons "{url}" %default-substitute-urls))\n'
        f'      (authorized-keys (cons (local-file "{key_file}")\n'
        "                             %default-authorized-guix-keys)))))"
    )
    nixos = (
        f"# configuration.nix, with the key saved next to it as {key_file} (see above).\n"
        "# Setting these lists drops Guix's official servers; to keep them, write\n"
        "#   options.services.guix.substituters.urls.default ++ [ ... ]\n"
        "# (likewise for authorizedKeys), with `options` among the module's arguments.\n"
        f'services.guix.substituters.urls = [ "{url}" ];\n'
        f"services.guix.substituters.authorizedKeys = [ ./{key_file} ];"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>Guix substitutes from {e(host)}</title></head>\n<body>\n"
        f"<h1>Guix substitutes from {e(host)}</h1>\n"
        f"<p>This is guixsvc publish {e(__version__)}, serving signed binaries (substitutes) "
        f"of the store <code>{e(store_dir)}</code> at <code>{e(url)}</code>.  Guix clients "
        "use them instead of building when they trust the key below and list this URL among "
        "their substitute servers.  A client only benefits when its store directory is also "
        f"<code>{e(store_dir)}</code>.</p>\n"
        f"<p>Archives are offered compressed with: {e(comps)}.</p>\n"
        "<h2>Signing key</h2>\n"
        "<p>Every narinfo served here is signed with this public key "
        '(<a href="signing-key.pub">download it as signing-key.pub</a>):</p>\n'
        f'<pre id="signing-key">{e(public_key)}</pre>\n'
        "<h2>Trusting this server</h2>\n"
        "<p>On the client, fetch the key and add it to the access-control list "
        "(<code>/etc/guix/acl</code>; this needs root):</p>\n"
        f"<pre>{e(trust)}</pre>\n"
        "<h2>Using it</h2>\n"
        f"<pre>{e(use)}</pre>\n"
        "<h2>On Guix System</h2>\n"
        f"<pre>{e(guix_system)}</pre>\n"
        "<h2>On NixOS</h2>\n"
        f"<pre>{e(nixos)}</pre>\n"
        "<h2>For machines and monitoring</h2>\n<ul>\n"
        '<li><a href="nix-cache-info">nix-cache-info</a>: the store directory and priority, '
        "for Nix-style clients</li>\n"
        '<li><a href="metrics">metrics</a>: request counts, bytes and latencies '
        "(Prometheus text format)</li>\n"
        '<li><a href="health">health</a>: whether the daemon behind this server answers '
        "(JSON)</li>\n"
        '<li><a href="signing-key.pub">signing-key.pub</a>: the public key above</li>\n'
        "</ul>\n</body></html>\n"
    )
