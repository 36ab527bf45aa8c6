"""`guixsvc`: one command for every service, each subcommand taking upstream's own flags.

`guixsvc daemon` is `guix-daemon`; `publish`, `gc`, `archive` and `processes` join as they are
written.  The subcommand's arguments are handed over untouched so flag handling stays in one
place per command.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from guixsvc import __version__

#: Subcommand → (module whose `main(argv)` runs it, summary).  Modules load on demand so that
#: `guixsvc daemon` never imports the HTTP stack and the reverse.
COMMANDS: dict[str, tuple[str, str]] = {
    "daemon": ("guixsvc.daemon.cli", "run the build daemon (same options as guix-daemon)"),
    "publish": ("guixsvc.publish.cli", "publish the store over HTTP (as guix publish)"),
    "archive": ("guixsvc.archive", "keys, export and import of store items (as guix archive)"),
    "gc": ("guixsvc.gc.cli", "collect garbage and query the store (as guix gc)"),
    "build": ("guixsvc.build_cli", "build derivations (as guix build FILE.drv)"),
    "download": ("guixsvc.download", "download a file to the store and print its hash"),
    "units": ("guixsvc.units", "render the systemd units"),
    "discover": ("guixsvc.daemon.discover", "discover publish servers with Avahi (guix discover)"),
}

USAGE = (
    "Usage: guixsvc COMMAND ARGS...\nRun the GNU Guix store services.\n\n"
    "COMMAND must be one of:\n"
    + "".join(f"  {name:<11} {summary}\n" for name, (_, summary) in COMMANDS.items())
    + "\nRun 'guixsvc COMMAND --help' for the options of COMMAND.\n"
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 1
    if args[0] in ("-V", "--version"):
        sys.stdout.write(f"guixsvc {__version__}\n")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None:
        sys.stderr.write(f"guixsvc: {args[0]}: command not found\n{USAGE}")
        return 1
    run: Callable[[Sequence[str]], int] = importlib.import_module(entry[0]).main
    return run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
