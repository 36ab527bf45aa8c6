"""`guix discover`: keep `<state>/discover/publish` listing the `guix publish` servers that
Avahi finds on the local network, and the daemon's `--discover` hook that runs it.

guix-daemon started with `--discover=yes` spawns `guix discover` (spec/substitutes.md §9); the
substituter reads the file it maintains and prepends those URLs (daemon/substituter.py).  The
browser runs in a child process of the daemon's main process, not in a thread: the main process
forks its workers and must stay single-threaded, and a crash of the browser must not take the
daemon down.  With ``$GUIX`` set the daemon runs ``$GUIX discover`` instead, as upstream does.
"""

from __future__ import annotations

import argparse
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

from guixsvc import __version__

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, usage="guix discover [OPTION]...",
        description="Discover Guix related services using Avahi.", add_help=False,
    )  # fmt: skip
    p.add_argument("-c", "--cache", metavar="DIRECTORY",
                   help="cache discovery results in DIRECTORY")  # fmt: skip
    p.add_argument("-h", "--help", action="help", help="display this help and exit")
    p.add_argument("-V", "--version", action="version",
                   version=f"guix discover (GNU Guix) {__version__}")  # fmt: skip
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from guixsvc import avahi
    from guixsvc.store.config import StoreConfig

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.extra:
        sys.stderr.write(f"{PROG}: error: {args.extra[0]}: extraneous argument\n")
        return 1
    cache = args.cache or StoreConfig.from_env(daemon=False).state_dir

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
