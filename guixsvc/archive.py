"""`guixsvc archive`: `guix archive` for store items (keys, ACL, export/import, nar tools).

Keys and the ACL are what a substitute setup needs first (`--generate-key` on the server,
`--authorize` on clients), and the export/import bundles use the same keys; the options,
dispatch order and messages are upstream's (spec/cli.md §3, substitutes.md §8).  Packages and
`-e` expressions need the Scheme side of Guix and are not supported: arguments must be store
file names.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence

from guixsvc import __version__
from guixsvc.pki import keys
from guixsvc.pki.sexp import SExpError
from guixsvc.store import nar
from guixsvc.store.config import StoreConfig

PROG = "guix archive"


class ArchiveError(Exception):
    """Printed as ``guix archive: error: MESSAGE``; exit 1."""


def _warning(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def _hint(message: str) -> None:
    sys.stderr.write(f"hint: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, usage="guix archive [OPTION]... PACKAGE...",
                                add_help=False)  # fmt: skip
    a = p.add_argument
    a("--export", action="store_true", help="export the specified files/packages to stdout")
    a("-r", "--recursive", action="store_true", help="combined with '--export', include deps")
    a("--import", dest="import_", action="store_true", help="import from the archive on stdin")
    a("--missing", action="store_true", help="print the files from stdin that are missing")
    a("-x", "--extract", metavar="DIR", help="extract the archive on stdin to DIR")
    a("-t", "--list", action="store_true", help="list the files in the archive on stdin")
    a("--generate-key", nargs="?", const="", default=None, metavar="PARAMETERS",
      help="generate a key pair with the given parameters")  # fmt: skip
    a("--authorize", action="store_true", help="authorize imports signed by the key on stdin")
    a("-e", "--expression", help=argparse.SUPPRESS)
    a("-S", "--source", action="store_true", help=argparse.SUPPRESS)
    a("-s", "--system", help=argparse.SUPPRESS)
    a("--target", help=argparse.SUPPRESS)
    a("-v", "--verbosity", help=argparse.SUPPRESS)
    a("-n", "--dry-run", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--fallback", "--no-substitutes", "--no-grafts", "--no-offload",
                 "--no-build-hook", "-K", "--keep-failed", "-k", "--keep-going"):  # fmt: skip
        a(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--substitute-urls", "--max-silent-time", "--timeout", "--debug", "--rounds",
                 "-c", "--cores", "-M", "--max-jobs", "-L", "--load-path"):  # fmt: skip
        a(flag, help=argparse.SUPPRESS)
    a("-h", "--help", action="help", help="display this help and exit")
    a("-V", "--version", action="version", version=f"guix archive (GNU Guix) {__version__}")
    a("items", nargs="*")
    return p


def generate_key(config: StoreConfig, parameters: str) -> None:
    pub, sec = keys.public_key_file(config.conf_dir), keys.secret_key_file(config.conf_dir)
    if os.path.exists(pub) or os.path.exists(sec):
        raise ArchiveError(f"key pair exists under '{config.conf_dir}'; remove it first")
    params: bytes | None = parameters.encode("utf-8") if parameters else None
    if params is not None:
        try:
            from guixsvc.pki import sexp

            sexp.parse(params)
        except SExpError as exc:
            raise ArchiveError(f"invalid key generation parameters: {exc.source}: {exc}") from None
    sys.stderr.write(
        "Please wait while gathering entropy to generate the key pair;\nthis may take time...\n"
    )
    try:
        keys.generate_key_files(config.conf_dir, params)
    except keys.PkiError as exc:
        raise ArchiveError(str(exc)) from None


def authorize(config: StoreConfig, text: bytes) -> None:
    try:
        keys.authorize_key(
            config.conf_dir, text, store_dir=config.store_dir, warning=_warning, hint=_hint
        )
    except keys.PkiError as exc:
        raise ArchiveError(str(exc)) from None
    except keys.AclError as exc:
        raise ArchiveError(str(exc)) from None


def topologically_sorted(client: object, paths: Iterable[str], recursive: bool) -> list[str]:
    """References before referrers; with ``recursive``, the whole closure."""
    wanted = list(dict.fromkeys(paths))
    selected = set(wanted)
    order: list[str] = []
    seen: set[str] = set()
    refs_cache: dict[str, list[str]] = {}

    def refs(p: str) -> list[str]:
        if p not in refs_cache:
            refs_cache[p] = client.query_references(p)  # type: ignore[attr-defined]
        return refs_cache[p]

    for root in wanted:
        stack: list[tuple[str, Iterable[str]]] = []
        if root in seen:
            continue
        seen.add(root)
        stack.append((root, iter(refs(root))))
        while stack:
            node, it = stack[-1]
            for r in it:
                if r == node or r in seen:
                    continue
                if not recursive and r not in selected:
                    continue
                seen.add(r)
                stack.append((r, iter(refs(r))))
                break
            else:
                stack.pop()
                order.append(node)
    return order


class _ListSink:
    """Prints a nar's entries the way ``list-contents`` does."""

    def __init__(self, out: object) -> None:
        self.write = out.write  # type: ignore[attr-defined]

    @staticmethod
    def _name(path: str) -> str:
        return "" if path == "" else "/" + path

    def directory(self, path: str) -> None:
        self.write(f"D {self._name(path)}\n")

    def symlink(self, path: str, target: bytes) -> None:
        self.write(f"S {self._name(path)} -> {os.fsdecode(target)}\n")

    def file_start(self, path: str, executable: bool, size: int) -> None:
        self.write(f"{'x' if executable else 'r'} {self._name(path):<60} {size:>10} B\n")

    def file_data(self, chunk: memoryview | bytes) -> None:
        pass

    def file_end(self) -> None:
        pass


def _feed_stdin(parser: nar.NarParser) -> None:
    stdin = sys.stdin.buffer
    while not parser.done:
        chunk = stdin.read1(1 << 20) if hasattr(stdin, "read1") else stdin.read(1 << 20)
        if not chunk:
            raise ArchiveError("bad archive: unexpected end of file")
        parser.feed(chunk)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    config = StoreConfig.from_env(daemon=False)
    try:
        if args.generate_key is not None:
            generate_key(config, args.generate_key)
            return 0
        if args.authorize:
            authorize(config, sys.stdin.buffer.read())
            return 0
        if args.expression or args.source:
            raise ArchiveError("packages and expressions are not supported; give store items")
        if args.list:
            parser = nar.NarParser(_ListSink(sys.stdout))
            _feed_stdin(parser)
            return 0
        if args.extract:
            with nar.RestoreSink(args.extract) as sink:
                _feed_stdin(nar.NarParser(sink))
            return 0
        if not (args.export or args.import_ or args.missing):
            raise ArchiveError("either '--export' or '--import' must be specified")
        from guixsvc.protocol.client import DaemonClient, DaemonError

        try:
            with DaemonClient() as client:
                if args.export:
                    items = [os.path.abspath(i) for i in args.items]
                    if not items:
                        _warning("no arguments specified; creating an empty archive")
                    order = topologically_sorted(client, items, args.recursive)
                    out = sys.stdout.buffer
                    for chunk in client.export_paths(order, sign=True):
                        out.write(chunk)
                    out.flush()
                elif args.import_:
                    client.import_paths(sys.stdin.buffer)
                else:
                    names = [ln for ln in sys.stdin.read().split("\n") if ln]
                    valid = set(client.query_valid_paths(names))
                    for name in names:
                        if name not in valid:
                            sys.stdout.write(f"{name}\n")
        except DaemonError as exc:
            raise ArchiveError(exc.message) from None
    except ArchiveError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except nar.NarError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: {exc.strerror}: {exc.filename or ''}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
