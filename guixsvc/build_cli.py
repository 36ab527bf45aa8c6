"""`guixsvc build`: upstream's `guix build` for derivation and store file names.

After `make run` a newcomer has a daemon but, without upstream Guix installed, nothing that asks
it to build; this is the client that does, with `guix build`'s options, progress display and
output (`guix/scripts/build.scm`, `guix/status.scm`, `guix/ui.scm`).  Packages and Scheme
expressions need Guile and are not supported: arguments are `.drv` file names (in the store, or
a `.drv` file elsewhere, which is first added to the store) or store items to substitute.
The standard build options (`%standard-build-options`) also serve `guixsvc archive`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from guixsvc import cliargs
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
from guixsvc.protocol.client import DaemonClient, DaemonError
from guixsvc.protocol.ops import BuildMode
from guixsvc.protocol.wire import ProtocolError
from guixsvc.store.config import StoreConfig
from guixsvc.store.derivation import Derivation, DerivationError, parse_derivation

__all__ = ["STANDARD_BUILD_OPTIONS_HELP", "BuildOptions", "main", "standard_build_options"]

PROG = "guix build"

#: `show-build-options-help` (guix/scripts/build.scm).
STANDARD_BUILD_OPTIONS_HELP = """
  -L, --load-path=DIR    prepend DIR to the package module search path
  -K, --keep-failed      keep build tree of failed builds
  -k, --keep-going       keep going when some of the derivations fail
  -n, --dry-run          do not build the derivations
      --fallback         fall back to building when the substituter fails
      --no-substitutes   build instead of resorting to pre-built substitutes
      --substitute-urls=URLS
                         fetch substitute from URLS if they are authorized
      --no-grafts        do not graft packages
      --no-offload       do not attempt to offload builds
      --max-silent-time=SECONDS
                         mark the build as failed after SECONDS of silence
      --timeout=SECONDS  mark the build as failed after SECONDS of activity
      --rounds=N         build N times in a row to detect non-determinism
  -c, --cores=N          allow the use of up to N CPU cores for the build
  -M, --max-jobs=N       allow at most N build jobs
      --debug=LEVEL      produce debugging output at LEVEL"""

HELP = f"""\
Usage: guix build [OPTION]... PACKAGE-OR-DERIVATION...
Build the given PACKAGE-OR-DERIVATION and return their output paths.

  -d, --derivations      return the derivation paths of the given packages
      --check            rebuild items to check for non-determinism issues
      --repair           repair the specified items
  -r, --root=FILE        make FILE a symlink to the result, and register it
                         as a garbage collector root
  -v, --verbosity=LEVEL  use the given verbosity LEVEL
  -q, --quiet            do not show the build log
      --log-file         return the log file names for the given derivations
{STANDARD_BUILD_OPTIONS_HELP}

  -h, --help             display this help and exit
  -V, --version          display version information and exit
{BUG_REPORT}"""


@dataclass
class BuildOptions:
    """`%default-options` of `guix build` plus what `%standard-build-options` set."""

    keep_failed: bool = False
    keep_going: bool = False
    dry_run: bool = False
    rounds: int | None = None
    fallback: bool = False
    substitutes: bool = True
    substitute_urls: list[str] | None = None
    graft: bool = True
    max_silent_time: int | None = None
    timeout: int | None = None
    debug: int = 0
    cores: int | None = None
    max_jobs: int | None = None
    # `guix build`'s own
    build_mode: BuildMode = BuildMode.NORMAL
    derivations_only: bool = False
    roots: list[str] = field(default_factory=list)
    verbosity: int = 3
    log_file: bool = False
    arguments: list[str] = field(default_factory=list)


def string_to_number(text: str) -> int:
    """`string->number*`: an integer or ``X: invalid number``."""
    try:
        return int(text, 10)
    except ValueError:
        raise UsageError(f"{text}: invalid number") from None


def _flag(name: str, value: object = True) -> Callable[[BuildOptions, str | None], None]:
    def handle(opts: BuildOptions, arg: str | None) -> None:
        setattr(opts, name, value)

    return handle


def _number_setter(name: str) -> Callable[[BuildOptions, str | None], None]:
    def handle(opts: BuildOptions, arg: str | None) -> None:
        assert arg is not None
        setattr(opts, name, string_to_number(arg))

    return handle


def _count_setter(name: str, option: str) -> Callable[[BuildOptions, str | None], None]:
    def handle(opts: BuildOptions, arg: str | None) -> None:
        assert arg is not None
        try:
            setattr(opts, name, int(arg, 10))
        except ValueError:
            raise UsageError(f"not a number: '{option}' option argument: {arg}") from None

    return handle


def _no_offload(opts: BuildOptions, arg: str | None) -> None:
    pass


def _no_build_hook(opts: BuildOptions, arg: str | None) -> None:
    cliargs.warning(PROG, "'--no-build-hook' is deprecated; use '--no-offload' instead")


def _substitute_urls(opts: BuildOptions, arg: str | None) -> None:
    assert arg is not None
    opts.substitute_urls = arg.split()


def _load_path(opts: BuildOptions, arg: str | None) -> None:
    # Package modules need Guile; the search path has nothing to apply to here.
    pass


def standard_build_options() -> list[Option[BuildOptions]]:
    """`%standard-build-options`, in upstream's order."""
    return [
        Option(("L", "load-path"), _load_path, required=True),
        Option(("K", "keep-failed"), _flag("keep_failed")),
        Option(("k", "keep-going"), _flag("keep_going")),
        Option(("rounds",), _number_setter("rounds"), required=True),
        Option(("fallback",), _flag("fallback")),
        Option(("no-substitutes",), _flag("substitutes", False)),
        Option(("substitute-urls",), _substitute_urls, required=True),
        Option(("no-grafts",), _flag("graft", False)),
        Option(("no-offload",), _no_offload),
        Option(("no-build-hook",), _no_build_hook),
        Option(("max-silent-time",), _number_setter("max_silent_time"), required=True),
        Option(("timeout",), _number_setter("timeout"), required=True),
        Option(("debug",), _number_setter("debug"), required=True),
        Option(("c", "cores"), _count_setter("cores", "cores"), required=True),
        Option(("M", "max-jobs"), _count_setter("max_jobs", "max-jobs"), required=True),
    ]


def set_build_options(client: DaemonClient, opts: BuildOptions) -> None:
    """`set-build-options-from-command-line`: SetOptions with the Guile client's overrides."""
    overrides: list[tuple[str, str]] = [("print-extended-build-trace", "1")]
    if opts.timeout is not None:
        overrides.append(("build-timeout", str(opts.timeout)))
    if opts.max_silent_time is not None:
        overrides.append(("build-max-silent-time", str(opts.max_silent_time)))
    if opts.max_jobs is not None:
        overrides.append(("build-max-jobs", str(opts.max_jobs)))
    if opts.cores is not None:
        overrides.append(("build-cores", str(opts.cores)))
    if opts.substitute_urls is not None:
        overrides.append(("substitute-urls", " ".join(opts.substitute_urls)))
    if opts.rounds is not None:
        overrides.append(("build-repeat", str(max(0, opts.rounds - 1))))
    client.set_options(
        keep_failed=opts.keep_failed,
        keep_going=opts.keep_going,
        fallback=opts.fallback,
        verbosity=opts.debug,
        use_substitutes=opts.substitutes,
        overrides=overrides,
    )


def _verbosity(opts: BuildOptions, arg: str | None) -> None:
    assert arg is not None
    opts.verbosity = string_to_number(arg)


def _unsupported(what: str) -> Callable[[BuildOptions, str | None], None]:
    def handle(opts: BuildOptions, arg: str | None) -> None:
        raise UsageError(f"{what} need Guile and are not supported; give derivation file names")

    return handle


def _options() -> list[Option[BuildOptions]]:
    packages = _unsupported("packages")
    return [
        help_option(HELP),
        version_option(PROG),
        Option(("S", "source"), packages),
        Option(("sources",), packages, optional=True),
        Option(("check",), _flag("build_mode", BuildMode.CHECK)),
        Option(("repair",), _flag("build_mode", BuildMode.REPAIR)),
        Option(("s", "system"), packages, required=True),
        Option(("target",), packages, required=True),
        Option(("d", "derivations"), _flag("derivations_only")),
        Option(("e", "expression"), _unsupported("expressions"), required=True),
        Option(("f", "file"), _unsupported("files of Scheme code"), required=True),
        Option(("m", "manifest"), _unsupported("manifests"), required=True),
        Option(("n", "dry-run"), _flag("dry_run")),
        Option(("r", "root"), lambda o, a: o.roots.append(a or ""), required=True),
        Option(("v", "verbosity"), _verbosity, required=True),
        Option(("q", "quiet"), _flag("verbosity", 0)),
        Option(("log-file",), _flag("log_file")),
        *standard_build_options(),
    ]


def parse_args(argv: Sequence[str]) -> BuildOptions:
    return parse_command_line(argv, _options(), BuildOptions(), lambda o, a: o.arguments.append(a))


# --- the progress display (guix/status.scm, print-build-event) ---------------------------------


def derivation_log_file(drv: str, log_dir: str) -> str | None:
    """`derivation-log-file` (guix/store.scm): `drvs/XX/REST`, compressed or not."""
    base = os.path.basename(drv)
    log = os.path.join(log_dir, "drvs", base[:2], base[2:])
    for candidate in (log + ".gz", log + ".bz2", log):
        if os.path.exists(candidate):
            return candidate
    return None


class StatusDisplay:
    """Renders the daemon's STDERR_NEXT stream: `@ …` build traces become upstream's status
    lines, other text (build logs, daemon messages) is shown from verbosity 3 on."""

    def __init__(self, verbosity: int, log_dir: str, out: TextIO | None = None) -> None:
        self.verbosity = verbosity
        self.log_dir = log_dir
        self.out: TextIO = out if out is not None else sys.stderr
        self.pending = ""

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def __call__(self, text: str) -> None:
        if self.verbosity <= 0:
            return
        if text.startswith("@ ") and text.endswith("\n") and "\n" not in text[:-1]:
            self._event(text[2:-1].split(" "))
        elif self.verbosity >= 3:
            self._write(text)

    def _event(self, fields: list[str]) -> None:
        kind, args = fields[0], fields[1:]
        show_log = self.verbosity >= 3
        if kind == "build-started" and args:
            self._write(f"building {args[0]}...\n")
        elif kind == "build-succeeded" and args and show_log:
            self._write(f"successfully built {args[0]}\n")
        elif kind == "build-failed" and args:
            drv = args[0]
            log = derivation_log_file(drv, self.log_dir)
            where = (
                f"View build log at '{log}'." if log else f"Could not find build log for '{drv}'."
            )
            self._write(f"build of {drv} failed\n{where}\n")
        elif kind == "substituter-started" and args and show_log:
            self._write(f"substituting {args[0]}...\n")
        elif kind == "download-started" and len(args) >= 2 and self.verbosity >= 2:
            self._write(f"downloading from {args[1]} ...\n")
        elif kind == "hash-mismatch" and len(args) >= 4:
            item, algo, expected, actual = args[:4]
            self._write(
                f"{algo} hash mismatch for {item}:\n"
                f"  expected hash: {expected}\n  actual hash:   {actual}\n"
            )


# --- the command -------------------------------------------------------------------------------


@dataclass
class _Plan:
    derivations: list[tuple[str, Derivation]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)


def _derivation_path(arg: str, store_dir: str) -> bool:
    return arg.startswith(store_dir) and arg.endswith(".drv")


def _add_derivation_file(client: DaemonClient, file_name: str) -> tuple[str, Derivation]:
    """A `.drv` file outside the store: add it as upstream's `derivation` does (a text file
    referring to its input derivations and sources) and return its store file name."""
    with open(file_name, "rb") as f:
        data = f.read()
    drv = parse_derivation(data, file_name)
    refs = sorted({*drv.input_drvs, *drv.input_srcs})
    return client.add_text_to_store(os.path.basename(file_name), data, refs), drv


def _things_to_build(client: DaemonClient, opts: BuildOptions, store_dir: str) -> _Plan:
    """`options->things-to-build` restricted to file names."""
    plan = _Plan()
    for arg in opts.arguments:
        if _derivation_path(arg, store_dir):
            try:
                file_name = os.path.realpath(arg, strict=True)
                with open(file_name, "rb") as f:
                    plan.derivations.append((file_name, parse_derivation(f.read(), file_name)))
            except FileNotFoundError:
                # Non-existent .drv files can be substituted down the road.
                plan.items.append(arg)
        elif arg.startswith(store_dir):
            plan.items.append(arg)
        elif arg.endswith(".drv") and os.path.isfile(arg):
            plan.derivations.append(_add_derivation_file(client, arg))
        else:
            raise UsageError(f"{arg}: unknown package")
    return plan


def _show_what_to_build(
    client: DaemonClient, plan: _Plan, opts: BuildOptions
) -> tuple[list[str], list[str]]:
    """`show-what-to-build`, for the derivations given: those whose outputs are missing are
    built, unless substitutes can provide them."""
    to_build: list[str] = []
    to_download: list[str] = []
    for name, drv in plan.derivations:
        outputs = sorted(o.path for o in drv.outputs.values())
        missing = [p for p in outputs if p not in set(client.query_valid_paths(outputs))]
        if opts.build_mode != BuildMode.NORMAL:
            to_build.append(name)
        elif missing:
            substitutable = (
                set(client.query_substitutable_paths(missing)) if opts.substitutes else set()
            )
            if substitutable >= set(missing):
                to_download.extend(missing)
            else:
                to_build.append(name)
    will = "would" if opts.dry_run else "will"
    if to_build:
        s = "s" if len(to_build) > 1 else ""
        sys.stderr.write(f"The following derivation{s} {will} be built:\n")
        sys.stderr.write("".join(f"   {d}\n" for d in to_build))
    if to_download:
        s = "s" if len(to_download) > 1 else ""
        sys.stderr.write(f"The following file{s} {will} be downloaded:\n")
        sys.stderr.write("".join(f"   {p}\n" for p in to_download))
    sys.stderr.flush()
    return to_build, to_download


def _log_file(client: DaemonClient, item: str, log_dir: str, store_dir: str) -> str | None:
    """`log-file` (guix/store.scm)."""
    if _derivation_path(item, store_dir):
        return derivation_log_file(item, log_dir)
    for deriver in client.query_valid_derivers(item):
        log = derivation_log_file(deriver, log_dir)
        if log:
            return log
    return None


def _register_root(client: DaemonClient, paths: list[str], root: str) -> None:
    """`register-root` (guix/scripts/build.scm)."""
    if not root.startswith("/"):
        root = os.path.join(os.path.realpath(os.path.dirname(root) or "."), os.path.basename(root))
    for count, path in enumerate(paths):
        name = root if count == 0 else f"{root}-{count}"
        try:
            os.symlink(path, name)
        except OSError as e:
            raise UsageError(f"failed to create GC root `{name}': {e.strerror}") from None
        client.add_indirect_root(name)


def _run(opts: BuildOptions) -> int:
    config = StoreConfig.from_env(daemon=False)
    store_dir = config.store_dir
    display = StatusDisplay(opts.verbosity, config.log_dir)
    with connect_daemon(log=display) as client:
        set_build_options(client, opts)
        plan = _things_to_build(client, opts, store_dir)
        if not plan.derivations and not plan.items:
            cliargs.warning(PROG, "no arguments specified, nothing to do")
        if opts.log_file:
            outputs = [o.path for _, d in plan.derivations for o in d.outputs.values()]
            for item in dict.fromkeys(outputs + plan.items):
                log = _log_file(client, item, config.log_dir, store_dir)
                if log is None:
                    raise UsageError(f"no build log for '{item}'")
                sys.stdout.write(f"{log}\n")
            return 0
        if opts.derivations_only:
            for name, _ in plan.derivations:
                sys.stdout.write(f"{name}\n")
            for root in opts.roots:
                _register_root(client, [name for name, _ in plan.derivations], root)
            return 0
        _show_what_to_build(client, plan, opts)
        if opts.dry_run:
            return 0
        client.build_paths([name for name, _ in plan.derivations] + plan.items, opts.build_mode)
        for _, drv in plan.derivations:
            # `derivation-output-names`: outputs sorted by name, as in the .drv file.
            for output in sorted(drv.outputs):
                sys.stdout.write(f"{drv.outputs[output].path}\n")
        sys.stdout.flush()
        for root in opts.roots:
            for _, drv in plan.derivations:
                _register_root(client, [drv.outputs[o].path for o in sorted(drv.outputs)], root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `guixsvc build ARGS...`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        PROG,
        lambda: _run(parse_args(args)),
        handlers=[
            (DaemonError, lambda e: e.message),  # type: ignore[attr-defined]
            (DerivationError, str),
            (ProtocolError, lambda e: str(e) or type(e).__name__),
            (EOFError, lambda e: str(e) or type(e).__name__),
            (OSError, lambda e: f"{e.filename}: {e.strerror}" if e.filename else str(e)),  # type: ignore[attr-defined]
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
