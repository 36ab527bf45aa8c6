"""`guixsvc`: one command for every service, each subcommand taking upstream's own flags.

`guixsvc daemon` is `guix-daemon`; `publish`, `gc`, `archive` and `processes` join as they are
written.  The subcommand's arguments are handed over untouched so flag handling stays in one
place per command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from guixsvc import __version__

USAGE = """\
Usage: guixsvc COMMAND ARGS...
Run the GNU Guix store services.

COMMAND must be one of:
  daemon      run the build daemon (same options as guix-daemon)

Run 'guixsvc COMMAND --help' for the options of COMMAND.
"""


def _daemon(argv: Sequence[str]) -> int:
    from guixsvc.daemon.cli import main

    return main(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "daemon": _daemon,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 1
    if args[0] in ("-V", "--version"):
        sys.stdout.write(f"guixsvc {__version__}\n")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"guixsvc: {args[0]}: command not found\n{USAGE}")
        return 1
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
