"""`guixsvc archive`: `guix archive` for store items (keys, ACL, export/import, nar tools).

Keys and the ACL are what a substitute setup needs first (`--generate-key` on the server,
`--authorize` on clients), and the export/import bundles use the same keys; the options,
dispatch order and messages are upstream's (spec/cli.md §3, substitutes.md §8).  Packages and
`-e` expressions need the Scheme side of Guix and are not supported: arguments must be store
file names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from guixsvc.build_cli import (
    STANDARD_BUILD_OPTIONS_HELP,
    BuildOptions,
    standard_build_options,
    string_to_number,
)
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
from guixsvc.pki import keys
from guixsvc.pki.sexp import SExpError
from guixsvc.protocol.client import DaemonError
from guixsvc.store import nar
from guixsvc.store.config import StoreConfig

PROG = "guix archive"


class ArchiveError(Exception):
    """Printed as ``guix archive: error: MESSAGE``; exit 1."""


def _warning(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def _hint(message: str) -> None:
    sys.stderr.write(f"hint: {message}\n")


HELP = f"""\
Usage: guix archive [OPTION]... PACKAGE...
Export/import one or more packages from/to the store.

      --export           export the specified files/packages to stdout
  -r, --recursive        combined with '--export', include dependencies
      --import           import from the archive passed on stdin
      --missing          print the files from stdin that are missing
  -x, --extract=DIR      extract the archive on stdin to DIR
  -t, --list             list the files in the archive on stdin

      --generate-key[=PARAMETERS]
                         generate a key pair with the given parameters
      --authorize        authorize imports signed by the public key on stdin

  -e, --expression=EXPR  build the package or derivation EXPR evaluates to
  -S, --source           build the packages' source derivations
  -s, --system=SYSTEM    attempt to build for SYSTEM--e.g., "i686-linux"
      --target=TRIPLET   cross-build for TRIPLET--e.g., "armel-linux-gnu"
  -v, --verbosity=LEVEL  use the given verbosity LEVEL
{STANDARD_BUILD_OPTIONS_HELP}

  -h, --help             display this help and exit
  -V, --version          display version information and exit
{BUG_REPORT}"""


@dataclass
class ArchiveOptions(BuildOptions):
    export: bool = False
    recursive: bool = False
    import_: bool = False
    missing: bool = False
    extract: str | None = None
    list: bool = False
    generate_key: str | None = None
    authorize: bool = False
    expression: str | None = None
    source: bool = False


def _set(name: str, value: object = True) -> Callable[[ArchiveOptions, str | None], None]:
    def handle(opts: ArchiveOptions, arg: str | None) -> None:
        setattr(opts, name, arg if value is None else value)

    return handle


def _verbosity(opts: ArchiveOptions, arg: str | None) -> None:
    assert arg is not None
    opts.verbosity = string_to_number(arg)


# `%options` of guix/scripts/archive.scm, then `%standard-build-options`.
OPTIONS: list[Option[ArchiveOptions]] = [
    help_option(HELP),
    version_option(PROG),
    Option(("export",), _set("export")),
    Option(("r", "recursive"), _set("recursive")),
    Option(("import",), _set("import_")),
    Option(("missing",), _set("missing")),
    Option(("extract", "x"), _set("extract", None), required=True),
    Option(("list", "t"), _set("list")),
    Option(("generate-key",), lambda o, a: setattr(o, "generate_key", a or ""), optional=True),
    Option(("authorize",), _set("authorize")),
    Option(("S", "source"), _set("source")),
    Option(("s", "system"), lambda o, a: None, required=True),
    Option(("target",), lambda o, a: None, required=True),
    Option(("e", "expression"), _set("expression", None), required=True),
    Option(("v", "verbosity"), _verbosity, required=True),
    Option(("n", "dry-run"), _set("dry_run")),
    *standard_build_options(),  # type: ignore[list-item]
]  # type: ignore[assignment]


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


def _run(args: ArchiveOptions, config: StoreConfig) -> int:
    if args.generate_key is not None:
        generate_key(config, args.generate_key)
        return 0
    if args.authorize:
        authorize(config, sys.stdin.buffer.read())
        return 0
    if args.expression or args.source:
        raise UsageError("packages and expressions are not supported; give store items")
    if args.list:
        parser = nar.NarParser(_ListSink(sys.stdout))
        _feed_stdin(parser)
        return 0
    if args.extract:
        with nar.RestoreSink(args.extract) as sink:
            _feed_stdin(nar.NarParser(sink))
        return 0
    if not (args.export or args.import_ or args.missing):
        raise UsageError("either '--export' or '--import' must be specified")
    with connect_daemon() as client:
        if args.export:
            # `options->derivations+files`: store file names are exported as they are,
            # anything else names a package.
            for item in args.arguments:
                if not item.startswith(config.store_dir):
                    raise UsageError(f"{item}: unknown package")
            if not args.arguments:
                _warning("no arguments specified; creating an empty archive")
            order = topologically_sorted(client, args.arguments, args.recursive)
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        opts = parse_command_line(
            args, OPTIONS, ArchiveOptions(), lambda o, a: o.arguments.append(a)
        )
        return _run(opts, StoreConfig.from_env(daemon=False))

    return run_command(
        PROG,
        body,
        handlers=[
            (ArchiveError, str),
            (DaemonError, lambda e: e.message),  # type: ignore[attr-defined]
            (nar.NarError, str),
            (OSError, lambda e: f"{e.strerror}: {e.filename or ''}"),  # type: ignore[attr-defined]
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
