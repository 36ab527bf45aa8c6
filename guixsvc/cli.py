"""`guixsvc`: one command for every service, each subcommand taking upstream's own flags.

`guixsvc daemon` is `guix-daemon`; `publish`, `gc`, `archive`, `build`, `download` and
`discover` are their `guix` namesakes.  The subcommand's arguments are handed over untouched so
flag handling stays in one place per command; this dispatcher answers like upstream's `guix`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from guixsvc.cliargs import hint, option_hint, run_command, version_text

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
    "migrate-store": ("guixsvc.migrate", "hand the store to the rootless daemon's user or root"),
    "with-writable-store": (
        "guixsvc.migrate:with_writable_store",
        "start the rootless daemon: writable store, then USER",
    ),
    "discover": ("guixsvc.daemon.discover", "discover publish servers with Avahi (guix discover)"),
    "processes": ("guixsvc.processes", "list the daemon's sessions (as guix processes)"),
    "offload": ("guixsvc.offload.cli", "test build machines, show their status (guix offload)"),
}

HELP = (
    "Usage: guixsvc OPTION | COMMAND ARGS...\nRun COMMAND with ARGS, if given.\n\n"
    "  -h, --help             display this helpful text again and exit\n"
    "  -V, --version          display version and copyright information and exit\n\n"
    "COMMAND must be one of the sub-commands listed below:\n\n"
    + "".join(f"    {name:<9}  {summary}\n" for name, (_, summary) in COMMANDS.items())
)

TRY = "Try `guixsvc --help' for more information.\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`run-guix` (guix/ui.scm) for our commands: dispatch, or upstream's messages."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write("guixsvc: missing command name\n" + TRY)
        return 1
    if args[0] in ("-h", "--help") or args == ["help"]:
        return run_command("guixsvc", lambda: sys.stdout.write(HELP) and 0)
    if args[0] in ("-V", "--version"):
        sys.stdout.write(version_text("guixsvc", "guixsvc"))
        return 0
    if args[0].startswith("-"):
        sys.stderr.write(f"guixsvc: unrecognized option '{args[0]}'\n" + TRY)
        return 1
    if args[0] == "help":
        args = [args[1], "--help"]
    entry = COMMANDS.get(args[0])
    if entry is None:
        sys.stderr.write(f"guixsvc: {args[0]}: command not found\n")
        suggestion = option_hint(args[0], COMMANDS)
        if suggestion:
            hint(f"Did you mean `{suggestion}'?")
        sys.stderr.write(TRY)
        return 1
    module, _, function = entry[0].partition(":")
    run: Callable[[Sequence[str]], int] = getattr(
        importlib.import_module(module), function or "main"
    )
    return run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
