"""`guix discover`: keep `<state>/discover/publish` listing the `guix publish` servers that
Avahi finds on the local network, and the daemon's `--discover` hook that runs it.

guix-daemon started with `--discover=yes` spawns `guix discover` (spec/substitutes.md §9); the
substituter reads the file it maintains and prepends those URLs (daemon/substituter.py).  The
browser runs in a child process of the daemon's main process, not in a thread: the main process
forks its workers and must stay single-threaded, and a crash of the browser must not take the
daemon down.  With ``$GUIX`` set the daemon runs ``$GUIX discover`` instead, as upstream does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guixsvc.cliargs import (
    BUG_REPORT,
    Option,
    UsageError,
    help_option,
    parse_command_line,
    run_command,
    version_option,
)

if TYPE_CHECKING:
    from guixsvc.daemon.settings import Settings
    from guixsvc.store.config import StoreConfig

PROG = "guix discover"
NO_DAEMON_WARNING = "Avahi daemon is not running, cannot auto-discover substitutes servers."


def publish_file(cache_directory: str) -> str:
    return os.path.join(cache_directory, "discover", "publish")


def write_publish_file(path: str, urls: Sequence[str]) -> None:
    """Atomically replace `path` with one URL per line, mode 0644 (readers never see half)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".publish.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{u}\n" for u in urls))
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def discover(cache_directory: str, stop: asyncio.Event | None = None) -> None:
    """Browse `_guix_publish._tcp` and mirror the services into the publish file until `stop`."""
    from guixsvc import avahi

    path = publish_file(cache_directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    services: dict[str, str] = {}

    def changed(action: str, svc: avahi.Service) -> None:
        if action == "new-service":
            services[svc.name] = svc.url
        else:
            services.pop(svc.name, None)
        write_publish_file(path, list(services.values()))

    browser = avahi.Browser([avahi.SERVICE_TYPE], changed, protocol=avahi.PROTO_INET)
    await browser.run(stop)


HELP = f"""\
Usage: guix discover [OPTION]...
Discover Guix related services using Avahi.

  -c, --cache=DIRECTORY     cache discovery results in DIRECTORY
  -h, --help                display this help and exit
  -V, --version             display version information and exit
{BUG_REPORT}"""


@dataclass
class _Options:
    cache: str | None = None


def _extraneous(opts: _Options, arg: str) -> None:
    raise UsageError(f"{arg}: extraneous argument")


OPTIONS: tuple[Option[_Options], ...] = (
    help_option(HELP),
    version_option(PROG),
    Option(("c", "cache"), lambda o, a: setattr(o, "cache", a), required=True),
)  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        PROG, lambda: _run(parse_command_line(words, OPTIONS, _Options(), _extraneous))
    )


def _run(opts: _Options) -> int:
    from guixsvc import avahi
    from guixsvc.store.config import StoreConfig

    cache = opts.cache or StoreConfig.from_env(daemon=False).state_dir

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await discover(cache, stop)

    try:
        asyncio.run(run())
    except avahi.AvahiNotRunning:
        sys.stderr.write(f"{PROG}: warning: {NO_DAEMON_WARNING}\n")
        return 1
    except avahi.MissingDependency as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except avahi.AvahiError as exc:
        sys.stderr.write(f"{PROG}: error: an Avahi error was raised by `{exc.function}': {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: {exc.filename}: {exc.strerror}\n")
        return 1
    return 0


# -- the daemon's side ----------------------------------------------------------------------------


@dataclass
class DiscoveryHandle:
    process: subprocess.Popen[bytes]


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the daemon


def start_discovery(config: StoreConfig, settings: Settings) -> DiscoveryHandle | None:
    """Spawn the discovery process when the daemon's `discover` setting is true, else None.

    `config` is the daemon's StoreConfig (for its state directory), `settings` its Settings.
    Called once by the main process at start-up, before workers are forked.  Its stderr is
    the daemon's; failures (no Avahi daemon) are reported there and do not stop the daemon.
    """
    if not settings.get_bool("discover"):
        return None
    program = os.environ.get("GUIX")
    if program:
        argv = [program, "discover"]
        executable = program
    else:
        argv = [sys.executable, "-m", "guixsvc.daemon.discover", f"--cache={config.state_dir}"]
        executable = sys.executable
    argv0 = "guix" if program else argv[0]
    proc = subprocess.Popen(
        [argv0, *argv[1:]], executable=executable, stdin=subprocess.DEVNULL, close_fds=True,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    return DiscoveryHandle(proc)


def stop(handle: DiscoveryHandle | None, timeout: float = 5.0) -> None:
    """Terminate the discovery process (SIGTERM, then SIGKILL after `timeout`) and reap it."""
    if handle is None:
        return
    proc = handle.process
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
