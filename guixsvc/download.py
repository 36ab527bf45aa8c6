"""`guixsvc download`: upstream's `guix download`, putting a file from a URL into the store.

With `make run` a newcomer has a daemon but no way to put a source tarball into its store
without upstream Guix; this is `guix download` (`guix/scripts/download.scm`,
`download-to-store` in `guix/download.scm`): fetch the URL (http, https, file, or a plain file
name), add it to the store as a fixed-output item hashed with SHA256 (`add-to-store`), and print
the store file name and the hash of the contents (`-H` algorithm, `-f` format).  `-o FILE`
downloads to FILE instead.  `-r`/`--recursive` is ours: it adds a directory tree (NAR
serialisation, as `guix hash -r` hashes it) and prints the hash of that serialisation.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from guixsvc.cliargs import (
    BUG_REPORT,
    Option,
    UsageError,
    connect_daemon,
    help_option,
    parse_command_line,
    run_command,
    version_option,
)
from guixsvc.protocol.client import DaemonError
from guixsvc.protocol.wire import ProtocolError
from guixsvc.store import base32, nar
from guixsvc.store.hashes import ALGORITHMS, UnknownHashType, new_hasher

__all__ = ["main"]

PROG = "guix download"

# Upstream's text has a trailing space after "servers".
_TRAILING_SPACE = " "

HELP = f"""\
Usage: guix download [OPTION] URL
Download the file at URL to the store or to the given file, and print its
file name and the hash of its contents.

Supported formats: 'base64', 'nix-base32' (default), 'base32',
and 'base16' ('hex' and 'hexadecimal' can be used as well).

  -f, --format=FMT       write the hash in the given format
  -H, --hash=ALGORITHM   use the given hash ALGORITHM
      --no-check-certificate
                         do not validate the certificate of HTTPS servers{_TRAILING_SPACE}
  -o, --output=FILE      download to FILE
  -r, --recursive        add the directory tree at URL and print the hash of its
                         serialisation

  -h, --help             display this help and exit
  -V, --version          display version information and exit
{BUG_REPORT}"""

_RFC4648_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def _base32_rfc4648(digest: bytes) -> str:
    """`bytevector->base32-string` (guix/base32.scm): RFC 4648 alphabet, lower case, no
    padding."""
    return base64.b32encode(digest).decode().rstrip("=").lower()


FORMATS: dict[str, Callable[[bytes], str]] = {
    "base64": lambda d: base64.b64encode(d).decode(),
    "nix-base32": base32.encode,
    "base32": _base32_rfc4648,
    "base16": bytes.hex,
    "hex": bytes.hex,
    "hexadecimal": bytes.hex,
}


@dataclass
class DownloadOptions:
    format: Callable[[bytes], str] = base32.encode
    hash_algorithm: str = "sha256"
    verify_certificate: bool = True
    output: str | None = None
    recursive: bool = False
    argument: str | None = None


def _format(opts: DownloadOptions, arg: str | None) -> None:
    assert arg is not None
    fmt = FORMATS.get(arg)
    if fmt is None:
        raise UsageError(f"unsupported hash format: {arg}")
    opts.format = fmt


def _hash(opts: DownloadOptions, arg: str | None) -> None:
    assert arg is not None
    if arg not in ALGORITHMS:
        raise UsageError(f"{arg}: unknown hash algorithm")
    opts.hash_algorithm = arg


def _output(opts: DownloadOptions, arg: str | None) -> None:
    opts.output = arg


def _argument(opts: DownloadOptions, arg: str) -> None:
    if opts.argument is not None:
        raise UsageError(f"{arg}: extraneous argument")
    opts.argument = arg


OPTIONS: tuple[Option[DownloadOptions], ...] = (
    Option(("f", "format"), _format, required=True),
    Option(("H", "hash"), _hash, required=True),
    Option(("no-check-certificate",), lambda o, _: setattr(o, "verify_certificate", False)),
    Option(("o", "output"), _output, required=True),
    Option(("r", "recursive"), lambda o, _: setattr(o, "recursive", True)),
    help_option(HELP),
    version_option(PROG),
)  # type: ignore[assignment]


def valid_store_file_name(name: str) -> str:
    """`ensure-valid-store-file-name`: characters not allowed in a store name become `_`."""
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-._?=")
    return "".join(c if c in allowed else "_" for c in name)


def _url_fetch(url: str, dest: str, verify: bool) -> None:
    """`url-fetch` for http(s): the file at URL into DEST, with upstream's opening lines."""
    sys.stderr.write(f"\nStarting download of {dest}\nFrom {url}...\n")
    sys.stderr.flush()
    context = None if verify else ssl._create_unverified_context()
    request = urllib.request.Request(url, headers={"User-Agent": "GNU Guile"})
    try:
        with (
            urllib.request.urlopen(request, context=context, timeout=60) as response,
            open(dest, "wb") as out,
        ):
            shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as e:
        # http-fetch and url-fetch (guix/build/download.scm), then guix download's `leave`.
        sys.stderr.write(f'{url}: HTTP download failed: {e.code} ("{e.reason}")\n')
        sys.stderr.write(f'failed to download "{dest}" from "{url}"\n')
        raise UsageError(f"{url}: download failed") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        sys.stderr.write(f"{url}: {reason}\n")
        sys.stderr.write(f'failed to download "{dest}" from "{url}"\n')
        raise UsageError(f"{url}: download failed") from None


def _local_file(url: str) -> str | None:
    """The file that URL denotes (a `file://` URL or a file name); None for http(s)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        return unquote(parts.path)
    if parts.scheme and "://" in url:
        raise UsageError(f"{url}: download failed")
    if not os.path.exists(url):
        raise UsageError(f"{url}: failed to parse URI")
    return os.path.realpath(url)


def _digest(path: str, algo: str, recursive: bool) -> bytes:
    if recursive:
        digest, _ = nar.hash_path(path, algo)
        return digest
    hasher = new_hasher(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.digest()


def _run(opts: DownloadOptions) -> int:
    if opts.argument is None:
        raise UsageError("no download URI was specified")
    url = opts.argument
    local = _local_file(url)
    with tempfile.TemporaryDirectory(prefix="guix-download-") as tmp:
        if local is None:
            source = os.path.join(tmp, "download")
            _url_fetch(url, source, opts.verify_certificate)
            name = os.path.basename(url)
        else:
            source = local
            name = os.path.basename(local.rstrip("/"))
        if opts.output is not None:
            shutil.copyfile(source, opts.output)
            path = opts.output
        else:
            with connect_daemon(log=sys.stderr.write) as client:
                path = client.add_to_store(
                    valid_store_file_name(name), source, recursive=opts.recursive
                )
        digest = _digest(source, opts.hash_algorithm, opts.recursive)
    sys.stdout.write(f"{path}\n{opts.format(digest)}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `guixsvc download ARGS...`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        PROG,
        lambda: _run(parse_command_line(args, OPTIONS, DownloadOptions(), _argument)),
        handlers=[
            (DaemonError, lambda e: e.message),  # type: ignore[attr-defined]
            (UnknownHashType, str),
            (nar.NarError, str),
            (ProtocolError, lambda e: str(e) or type(e).__name__),
            (EOFError, lambda e: str(e) or type(e).__name__),
            (OSError, lambda e: f"{e.filename}: {e.strerror}" if e.filename else str(e)),  # type: ignore[attr-defined]
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
