"""The builder the daemon runs itself: `builtin:download`.

`builtin:git-download` (newer upstream) is not implemented, hence not advertised by
`built-in-builders`: newer clients use it only when the daemon lists it.

Upstream runs `guix perform-download DRV OUT` (spec/build-env.md §13); here the
download is done in Python in the forked builder process (already running as the build user, in
the build directory, with its output going to the log pipe).  It reads the derivation's `url`
(a Scheme string or list of strings), resolves `mirror://` URLs through the `mirrors` file,
streams the body to the output file and makes it executable when `executable` is "1"; the
daemon then checks the fixed-output hash as for any build.  As upstream: only fixed-output
derivations are downloaded, only `http`, `https` and `ftp` URLs are tried (`url-fetch` skips
others, so `file://` cannot read the daemon's files), and never as root.
"""

from __future__ import annotations

# Imported here, in the daemon, because the download runs as a build user who may not be
# able to read the Python installation to import them lazily after the fork.
import encodings.idna  # noqa: F401
import http.client  # noqa: F401
import os
import re
import shutil
import ssl
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, cast

from guixsvc.store.derivation import Derivation

if TYPE_CHECKING:
    from collections.abc import Iterable

BUILTIN_NAMES = ("download",)
#: The URL schemes `url-fetch` (guix/build/download.scm) downloads from.
SCHEMES = ("http", "https", "ftp")

_TOKEN = re.compile(r'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))', re.S)


class BuiltinError(Exception):
    pass


def read_sexp(text: str) -> object:
    """Read one Scheme datum made of lists, strings and symbols (enough for urls/mirrors)."""
    stack: list[list[object]] = [[]]
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise BuiltinError(f"cannot parse `{text}'")
        pos = m.end()
        if m.group(1):
            stack.append([])
        elif m.group(2):
            if len(stack) == 1:
                raise BuiltinError(f"cannot parse `{text}'")
            done = stack.pop()
            stack[-1].append(done)
        elif m.group(3) is not None:
            stack[-1].append(re.sub(r"\\(.)", r"\1", m.group(3)))
        elif m.group(4):
            stack[-1].append(("symbol", m.group(4)))
    if len(stack) != 1 or not stack[0]:
        raise BuiltinError(f"cannot parse `{text}'")
    return stack[0][0]


def _mirror_table(file_name: str | None) -> dict[str, list[str]]:
    if not file_name:
        return {}
    try:
        with open(file_name) as f:
            data = read_sexp(f.read())
    except (OSError, BuiltinError):
        return {}
    table: dict[str, list[str]] = {}
    if isinstance(data, list):
        for entry in data:
            if isinstance(entry, list) and entry and isinstance(entry[0], tuple):
                table[entry[0][1]] = [u for u in entry[1:] if isinstance(u, str)]
    return table


def candidate_urls(drv: Derivation) -> list[str]:
    """Every URL to try, in order, with `mirror://NAME/...` expanded."""
    datum = read_sexp(drv.env.get("url", ""))
    # read_sexp gives a str, a list or a ("symbol", NAME) tuple: anything but a str iterates.
    items = cast("Iterable[object]", datum)
    urls = [datum] if isinstance(datum, str) else [u for u in items if isinstance(u, str)]
    mirrors = _mirror_table(drv.env.get("mirrors"))
    result: list[str] = []
    for url in urls:
        m = re.match(r"mirror://([^/]+)/(.*)", url)
        if m:
            result.extend(
                base.rstrip("/") + "/" + m.group(2) for base in mirrors.get(m.group(1), [])
            )
        else:
            result.append(url)
    return result


def _fetch(url: str, dest: str) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # as `guix perform-download` (the hash is checked)
    request = urllib.request.Request(url, headers={"User-Agent": "GNU Guile"})
    with (
        urllib.request.urlopen(request, timeout=60, context=context) as resp,
        open(dest, "wb") as out,
    ):
        shutil.copyfileobj(resp, out, 1 << 16)


def builtin_download(drv: Derivation, output: str, drv_path: str = "") -> None:
    """Download the derivation's URL to `output`; raises BuiltinError when every URL fails."""
    if os.getuid() == 0:
        raise BuiltinError("refusing to run with elevated privileges (UID 0)")
    if not drv.is_fixed_output:
        raise BuiltinError(f"{drv_path or 'derivation'} is not a fixed-output derivation")
    urls = candidate_urls(drv)
    for url in urls:
        print(f"\nStarting download of {output}\nFrom {url}...", flush=True)
        if url.partition(":")[0].lower() not in SCHEMES:
            print(f'skipping URI with unsupported scheme: "{url}"', flush=True)
            continue
        try:
            _fetch(url, output)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            print(f'failed to download "{output}" from "{url}": {reason}', flush=True)
            if os.path.lexists(output):
                os.unlink(output)
            continue
        if drv.env.get("executable") == "1":
            os.chmod(output, 0o755)
        print(f"downloading from {url}... done", flush=True)
        return
    raise BuiltinError(f'failed to download "{output}" from {urls}')


def run_builtin(name: str, drv: Derivation, output: str, drv_path: str = "") -> None:
    if name not in BUILTIN_NAMES:
        raise BuiltinError(f"unsupported builtin function '{name}'")
    builtin_download(drv, output, drv_path)
