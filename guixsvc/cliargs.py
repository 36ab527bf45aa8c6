"""The command-line convention of upstream's Scheme commands, in one place.

`guix gc`, `guix publish`, `guix archive`, `guix build`, `guix download` and `guix discover`
parse their arguments with Guile's SRFI-37 `args-fold`, wrapped by `parse-command-line` and
`args-fold*` (`guix/scripts.scm`), and report problems through `leave`/`report-error`
(`guix/diagnostics.scm`): `guix CMD: error: NAME: unrecognized option` plus a "Did you mean"
hint, exit status 1; `-h`/`--help` and `-V`/`--version` (`show-version-and-exit`,
`show-bug-report-information` in `guix/ui.scm`) exit 0.  Every guixsvc command that mirrors one
of them (and `guixsvc units`, which has no upstream counterpart) goes through this module so
that they all behave the same (spec/cli.md §0).  `guix-daemon` is a C++ program using GNU argp
and keeps its own parser in `guixsvc/daemon/cli.py`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar

from guixsvc import __version__

if TYPE_CHECKING:
    from guixsvc.protocol.client import DaemonClient

__all__ = [
    "BUG_REPORT",
    "Exit",
    "Option",
    "Unrecognized",
    "UsageError",
    "connect_daemon",
    "error",
    "help_option",
    "hint",
    "info",
    "option_hint",
    "parse_command_line",
    "print_and_exit",
    "run_command",
    "silence_stdout",
    "version_option",
    "version_text",
    "warning",
]

#: `show-bug-report-information` (guix/ui.scm): what every `--help` text ends with.
BUG_REPORT = """
Report bugs to: bug-guix@gnu.org.
GNU Guix home page: <https://www.gnu.org/software/guix/>
General help using Guix and GNU software: <https://guix.gnu.org/en/help/>
"""

COPYRIGHT_YEAR = 2026


class UsageError(Exception):
    """A bad command line or value: reported as ``guix CMD: error: MESSAGE``, exit status 1
    (upstream's `leave`)."""


class Exit(Exception):
    """Stop with this exit status (after an option handler did its printing)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Unrecognized(Exception):
    """An option that is not in the table; `name` is what follows the dashes."""

    def __init__(self, name: str, long_names: Sequence[str] = ()) -> None:
        super().__init__(name)
        self.name = name
        self.long_names = list(long_names)


T = TypeVar("T")


@dataclass(frozen=True)
class Option(Generic[T]):
    """One SRFI-37 option: its names (one-character names are short options), whether it
    requires or optionally takes a value, and the handler folding it into the seed."""

    names: tuple[str, ...]
    handler: Callable[[T, str | None], None]
    required: bool = False
    optional: bool = False


def version_text(command: str, package: str = "GNU Guix") -> str:
    """`show-version-and-exit`'s output for COMMAND."""
    return (
        f"{command} ({package}) {__version__}\n"
        f"Copyright (C) {COPYRIGHT_YEAR} the Guix authors\n"
        "License GPLv3+: GNU GPL version 3 or later <http://gnu.org/licenses/gpl.html>\n"
        "This is free software: you are free to change and redistribute it.\n"
        "There is NO WARRANTY, to the extent permitted by law.\n"
    )


def help_option(text: str | Callable[[], str]) -> Option[T]:
    """`-h`, `--help`: print TEXT on stdout and exit 0."""

    def show(_: T, __: str | None) -> NoReturn:
        sys.stdout.write(text() if callable(text) else text)
        sys.stdout.flush()
        raise Exit(0)

    return Option(("h", "help"), show)


def version_option(command: str, package: str = "GNU Guix") -> Option[T]:
    """`-V`, `--version`: `show-version-and-exit`."""

    def show(_: T, __: str | None) -> NoReturn:
        sys.stdout.write(version_text(command, package))
        sys.stdout.flush()
        raise Exit(0)

    return Option(("V", "version"), show)


# --- SRFI-37 ------------------------------------------------------------------------------------


def parse_command_line(
    args: Sequence[str],
    options: Iterable[Option[T]],
    seed: T,
    operand: Callable[[T, str], None],
) -> T:
    """Fold ARGS into SEED the way SRFI-37's `args-fold` does (spec cli.md §0): long options
    take a value only as `--name=value`, short options attached or as the next word (an
    optional value too), short flags cluster, `--` ends options.  Handlers run as options are
    met, so a bad value stops parsing at once.  Raises `Unrecognized`, `UsageError`, `Exit`."""
    table = list(options)
    lookup = {name: opt for opt in table for name in opt.names}
    long_names = [n for opt in table for n in opt.names if len(n) > 1]
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            for rest in words[i + 1 :]:
                operand(seed, rest)
            break
        if word.startswith("--"):
            i += 1
            _long_option(seed, word, lookup, long_names)
        elif word.startswith("-") and len(word) > 1:
            i = _short_options(seed, words, i, lookup, long_names)
        else:
            operand(seed, word)
            i += 1
    return seed


def _long_option(seed: T, word: str, lookup: dict[str, Option[T]], long_names: list[str]) -> None:
    # Like SRFI-37, look for a name before each `=` in turn.
    start = 2
    while True:
        index = word.find("=", start)
        name = word[2:] if index < 0 else word[2:index]
        opt = lookup.get(name) if len(name) > 1 else None
        if opt is not None:
            break
        if index < 0:
            raise Unrecognized(word[2:], long_names)
        start = index + 1
    value = None if index < 0 else word[index + 1 :]
    if opt.required and value is None:
        raise UsageError(f"invalid argument: Missing required argument after `--{name}'")
    if not (opt.required or opt.optional) and value is not None:
        raise UsageError(f"invalid argument: Extraneous argument after `--{name}'")
    opt.handler(seed, value)


def _short_options(
    seed: T, words: list[str], i: int, lookup: dict[str, Option[T]], long_names: list[str]
) -> int:
    word = words[i]
    pos = 1
    while pos < len(word):
        letter = word[pos]
        opt = lookup.get(letter)
        if opt is None:
            raise Unrecognized(letter, long_names)
        if opt.required or opt.optional:
            if pos + 1 < len(word):
                value: str | None = word[pos + 1 :]
                i += 1
            elif i + 1 < len(words):
                value = words[i + 1]
                i += 2
            else:
                value = None
                i += 1
            if value is None and opt.required:
                raise UsageError(f"invalid argument: Missing required argument after `-{letter}'")
            opt.handler(seed, value)
            return i
        opt.handler(seed, None)
        pos += 1
    return i + 1


def _string_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def option_hint(name: str, long_names: Iterable[str]) -> str | None:
    """`option-hint`: the long option closest to NAME (before any `=`), within distance 3."""
    guess = name.split("=")[0]
    best, best_distance = None, 3
    for candidate in long_names:
        distance = _string_distance(guess, candidate)
        if distance < best_distance:
            best, best_distance = candidate, distance
    return best


# --- the daemon ---------------------------------------------------------------------------------


def connect_daemon(log: Callable[[str], object] | None = None) -> DaemonClient:
    """`open-connection` as the commands see it: `GUIX_DAEMON_SOCKET` or the default socket;
    failing to connect is upstream's ``failed to connect to `URI': STRERROR`` (exit 1)."""
    from guixsvc.protocol.client import DaemonClient, default_socket

    uri = default_socket()
    try:
        return DaemonClient(uri, log=log)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UsageError(f"failed to connect to `{uri}': {reason}") from None


# --- diagnostics --------------------------------------------------------------------------------


def info(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: {message}\n")


def warning(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: warning: {message}\n")


def error(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")


def hint(message: str) -> None:
    sys.stderr.write(f"hint: {message}\n\n")


def silence_stdout() -> None:
    # The reader went away (`| head`): make the interpreter's final flush a no-op.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def print_and_exit(text: str) -> NoReturn:
    """Write TEXT on stdout and exit 0, quietly when the reader is gone (`| head`)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    sys.exit(0)


def run_command(
    prog: str,
    body: Callable[[], int],
    *,
    handlers: Sequence[tuple[type[BaseException], Callable[[BaseException], str]]] = (),
    cleanup: Callable[[], None] | None = None,
) -> int:
    """Run BODY (parsing and acting) under upstream's error handling and return the exit
    status: unrecognized options and usage errors print `PROG: error: …` and give 1; an
    `Exit` gives its status; a closed stdout ends quietly with 0 (`leave-on-EPIPE`);
    HANDLERS map further exception types to the message of a `PROG: error: …` line (exit 1)."""
    try:
        try:
            status = body()
            sys.stdout.flush()
            return status
        finally:
            if cleanup is not None:
                with contextlib.suppress(OSError):
                    cleanup()
    except Unrecognized as e:
        error(prog, f"{e.name}: unrecognized option")
        suggestion = option_hint(e.name, e.long_names)
        if suggestion:
            hint(f"Did you mean `{suggestion}'?")
        return 1
    except Exit as e:
        return e.status
    except UsageError as e:
        error(prog, str(e))
        return 1
    except BrokenPipeError:
        silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as e:
        for kind, message in handlers:
            if isinstance(e, kind):
                try:
                    sys.stdout.flush()
                except BrokenPipeError:
                    silence_stdout()
                error(prog, message(e))
                return 1
        raise
