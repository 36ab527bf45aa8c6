"""Every command speaks like its upstream counterpart: `--help` layout, `--version`, errors and
exit codes for bad flags, a closed stdout, a bad `GUIX_DAEMON_SOCKET`.

The expected texts are upstream's, copied from its sources: `guix/scripts.scm`
(`parse-command-line`: "~A: unrecognized option" + `option-hint`, `args-fold*`: "invalid
argument: ~a"), `guix/ui.scm` (`show-version-and-exit`, `show-bug-report-information`,
`run-guix`), each `guix/scripts/*.scm` `show-help`, `guix/store.scm` (`connect-to-daemon`: ENOTSUP
for an unknown URI scheme) and, for guix-daemon, the output of glibc's argp for the `options[]`
table of `nix/nix-daemon/guix-daemon.cc` (Guix 2022 tree and newer `Millak/guix` @ d1a9fb85).
Each command runs as a real process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guixsvc import __version__
from tests.conftest import start_daemon, stop_daemon, store_env

#: `show-bug-report-information` (guix/ui.scm), after the `(newline)` of each `show-help`.
BUG_REPORT = (
    "\n\nReport bugs to: bug-guix@gnu.org.\n"
    "GNU Guix home page: <https://www.gnu.org/software/guix/>\n"
    "General help using Guix and GNU software: <https://guix.gnu.org/en/help/>\n"
)

#: Command → (first two lines of upstream's `show-help`, one option line of it).
HELP = {
    "gc": (  # guix/scripts/gc.scm
        "Usage: guix gc [OPTION]... PATHS...\nInvoke the garbage collector.\n",
        "  -F, --free-space=FREE  attempt to reach FREE available space in the store\n",
    ),
    "publish": (  # guix/scripts/publish.scm (the store directory is %store-directory)
        "Usage: guix publish [OPTION]...\nPublish {store} over HTTP.\n",
        "      --negative-ttl=TTL announce missing narinfos can be cached for TTL seconds\n",
    ),
    "archive": (  # guix/scripts/archive.scm
        "Usage: guix archive [OPTION]... PACKAGE...\n"
        "Export/import one or more packages from/to the store.\n",
        "  -r, --recursive        combined with '--export', include dependencies\n",
    ),
    "build": (  # guix/scripts/build.scm, show-help and show-build-options-help
        "Usage: guix build [OPTION]... PACKAGE-OR-DERIVATION...\n"
        "Build the given PACKAGE-OR-DERIVATION and return their output paths.\n",
        "      --rounds=N         build N times in a row to detect non-determinism\n",
    ),
    "download": (  # guix/scripts/download.scm
        "Usage: guix download [OPTION] URL\n"
        "Download the file at URL to the store or to the given file, and print its\n",
        "  -H, --hash=ALGORITHM   use the given hash ALGORITHM\n",
    ),
    "discover": (  # guix/scripts/discover.scm
        "Usage: guix discover [OPTION]...\nDiscover Guix related services using Avahi.\n",
        "  -c, --cache=DIRECTORY     cache discovery results in DIRECTORY\n",
    ),
}


def _env(tmp_path: Path) -> dict[str, str]:
    env = store_env(tmp_path)
    env["GUIX_DAEMON_SOCKET"] = str(tmp_path / "no-daemon.sock")
    return env


def guixsvc(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guixsvc.cli", *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_is_upstreams(command: str, tmp_path: Path) -> None:
    env = _env(tmp_path)
    head, option_line = HELP[command]
    r = guixsvc(env, command, "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(head.format(store=env["NIX_STORE_DIR"]))
    assert option_line in r.stdout
    width = 28 if command == "discover" else 25  # discover.scm aligns at another column
    assert r.stdout.endswith(
        "  -h, --help".ljust(width)
        + "display this help and exit\n"
        + "  -V, --version".ljust(width)
        + "display version information and exit"
        + BUG_REPORT
    )
    assert guixsvc(env, command, "-h").stdout == r.stdout


@pytest.mark.parametrize("command", sorted(HELP))
def test_version_is_upstreams(command: str, tmp_path: Path) -> None:
    r = guixsvc(_env(tmp_path), command, "--version")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == f"guix {command} (GNU Guix) {__version__}"
    assert lines[1].startswith("Copyright (C) ") and lines[1].endswith(" the Guix authors")
    assert lines[2:] == [
        "License GPLv3+: GNU GPL version 3 or later <http://gnu.org/licenses/gpl.html>",
        "This is free software: you are free to change and redistribute it.",
        "There is NO WARRANTY, to the extent permitted by law.",
    ]


@pytest.mark.parametrize("command", sorted(HELP))
def test_unrecognized_option(command: str, tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = guixsvc(env, command, "--frobnicate")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"guix {command}: error: frobnicate: unrecognized option\n"
    # A short option: the bare letter.
    r = guixsvc(env, command, "-Z")
    assert (r.returncode, r.stderr) == (1, f"guix {command}: error: Z: unrecognized option\n")
    # Close to a long option: `option-hint` (distance < 3).
    r = guixsvc(env, command, "--versoin")
    assert r.returncode == 1
    assert r.stderr == (
        f"guix {command}: error: versoin: unrecognized option\nhint: Did you mean `version'?\n\n"
    )


def test_long_option_values_need_an_equal_sign(tmp_path: Path) -> None:
    # SRFI-37: `--port 8080` is `--port` without its value.
    r = guixsvc(_env(tmp_path), "publish", "--port", "8080")
    assert r.returncode == 1
    assert r.stderr == (
        "guix publish: error: invalid argument: Missing required argument after `--port'\n"
    )
    r = guixsvc(_env(tmp_path), "gc", "--list-dead=x")
    assert r.stderr == (
        "guix gc: error: invalid argument: Extraneous argument after `--list-dead'\n"
    )
    # Short options take the next word.
    r = guixsvc(_env(tmp_path), "download", "-H", "md4", "x")
    assert (r.returncode, r.stderr) == (1, "guix download: error: md4: unknown hash algorithm\n")


def test_units_follows_the_same_convention(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = guixsvc(env, "units", "--frobnicate")
    assert (r.returncode, r.stderr) == (
        1,
        "guixsvc units: error: frobnicate: unrecognized option\n",
    )
    r = guixsvc(env, "units", "--output", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr == (
        "guixsvc units: error: invalid argument: Missing required argument after `--output'\n"
    )
    r = guixsvc(env, "units", "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: guixsvc units [OPTION]...\n")
    assert "      --output=DIR       write the units to DIR instead of printing them\n" in r.stdout
    assert guixsvc(env, "units", "-V").stdout.startswith(f"guixsvc units (guixsvc) {__version__}\n")


def test_the_dispatcher_speaks_like_guix(tmp_path: Path) -> None:
    # run-guix / run-guix-command / show-guix-usage (guix/ui.scm).
    env = _env(tmp_path)
    tail = "Try `guixsvc --help' for more information.\n"
    r = guixsvc(env)
    assert (r.returncode, r.stderr) == (1, "guixsvc: missing command name\n" + tail)
    r = guixsvc(env, "--frob")
    assert (r.returncode, r.stderr) == (1, "guixsvc: unrecognized option '--frob'\n" + tail)
    r = guixsvc(env, "bulid")
    assert r.returncode == 1
    assert r.stderr == "guixsvc: bulid: command not found\nhint: Did you mean `build'?\n\n" + tail
    r = guixsvc(env, "help", "gc")
    assert r.returncode == 0 and r.stdout.startswith("Usage: guix gc [OPTION]... PATHS...\n")
    r = guixsvc(env, "--help")
    assert r.returncode == 0 and "    download   " in r.stdout and "    build      " in r.stdout


# --- guix-daemon: GNU argp -----------------------------------------------------------------------

TRY_DAEMON = "Try `guix-daemon --help' or `guix-daemon --usage' for more information.\n"


def daemon_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guixsvc.daemon.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # What glibc's argp/getopt_long print for upstream's options[] (exit 64, EX_USAGE).
        (["--frobnicate"], "unrecognized option '--frobnicate'"),
        (["--frob=1"], "unrecognized option '--frob=1'"),
        (["-x"], "invalid option -- 'x'"),
        (["--listen"], "option '--listen' requires an argument"),
        (["-c"], "option requires an argument -- 'c'"),
        (["--debug=1"], "option '--debug' doesn't allow an argument"),
        (
            ["--c"],
            "option '--c' is ambiguous; possibilities: '--cores' '--chroot-directory' "
            "'--cache-failures'",
        ),
        (
            ["--no-"],
            "option '--no-' is ambiguous; possibilities: '--no-substitutes' "
            "'--no-offload' '--no-build-hook'",
        ),
        (["extra"], "Too many arguments"),
        (["--gc-keep-outputs", "no"], "Too many arguments"),
    ],
)
def test_daemon_usage_errors_are_argps(args: list[str], message: str, tmp_path: Path) -> None:
    r = daemon_cli(store_env(tmp_path), *args)
    assert (r.returncode, r.stdout, r.stderr) == (64, "", f"guix-daemon: {message}\n{TRY_DAEMON}")


def test_daemon_bad_values_exit_1(tmp_path: Path) -> None:
    # parse_opt (guix-daemon.cc): fprintf "error: %s: …" + exit (EXIT_FAILURE).
    env = store_env(tmp_path)
    r = daemon_cli(env, "--rounds=x")
    assert (r.returncode, r.stderr) == (1, "error: x: invalid number of rounds\n")
    r = daemon_cli(env, "--log-compression=xz")
    assert (r.returncode, r.stderr) == (1, "error: xz: unknown compression type\n")
    r = daemon_cli(env, "--discover=maybe")
    assert (r.returncode, r.stderr) == (1, "error: 'maybe': invalid Boolean value\n")


def test_daemon_help_usage_version_are_argps(tmp_path: Path) -> None:
    env = store_env(tmp_path)
    r = daemon_cli(env, "--help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[:3] == [
        "Usage: guix-daemon [OPTION...]",
        "guix-daemon -- perform derivation builds and store accesses",
        "",
    ]
    # argp sorts the options and wraps descriptions at column 29 of 79.
    assert "  -c, --cores=N              use N CPU cores to build each derivation; 0 means" in lines
    assert "                             as many as available" in lines
    assert "      --gc-keep-derivations[=yes/no]" in lines
    assert "  -?, --help                 Give this help list" in lines
    assert "      --no-build-hook" not in r.stdout  # OPTION_HIDDEN
    assert r.stdout.endswith("on behalf of its clients.\n\nReport bugs to bug-guix@gnu.org.\n")
    assert daemon_cli(env, "-?").stdout == r.stdout
    assert daemon_cli(env, "--he").stdout == r.stdout  # a unique prefix
    r = daemon_cli(env, "--usage")
    assert r.returncode == 0
    assert r.stdout.startswith(
        "Usage: guix-daemon [-?V] [-c N] [-M N] [--build-users-group=GROUP]\n"
    )
    r = daemon_cli(env, "--version")
    assert (r.returncode, r.stdout) == (0, f"guix-daemon (GNU Guix) {__version__}\n")


def test_daemon_accepts_argp_forms(tmp_path: Path) -> None:
    # A required value in the next word, unique prefixes, clustered short options.
    sock = tmp_path / "d.sock"
    d = start_daemon(tmp_path, "--max-silent", "30", "-c2", "-M", "1", "--lis=" + str(sock))
    try:
        with d.client() as client:
            assert client.is_valid_path(d.store_dir + "/" + "a" * 32 + "-x") is False
    finally:
        stop_daemon(d)


# --- a closed stdout, a bad daemon socket --------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["units"], ["gc", "--help"], ["build", "--help"], ["daemon", "--help"]]
)
def test_closed_stdout_is_quiet(args: list[str], tmp_path: Path) -> None:
    # `guixsvc units | head`: the reader is gone before we write (EPIPE, as upstream's
    # leave-on-EPIPE: a quiet exit 0).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", *args], env=_env(tmp_path),
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (0, "")


@pytest.mark.parametrize(
    ("args", "prog"),
    [
        (["gc", "--list-dead"], "guix gc"),
        (["build", "/gnu/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv"], "guix build"),
        (["archive", "--missing"], "guix archive"),
        (["download", __file__], "guix download"),
    ],
)
def test_unsupported_daemon_socket_scheme(args: list[str], prog: str, tmp_path: Path) -> None:
    # connect-to-daemon (guix/store.scm): no (guix store bogus) module → ENOTSUP, reported by
    # with-error-handling as "failed to connect to `~a': ~a".
    env = dict(_env(tmp_path), GUIX_DAEMON_SOCKET="bogus://x")
    r = guixsvc(env, *args)
    assert r.returncode == 1
    assert r.stderr == f"{prog}: error: failed to connect to `bogus://x': Operation not supported\n"


def test_missing_daemon_socket(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = guixsvc(env, "gc", "--list-dead")
    assert r.returncode == 1
    assert r.stderr == (
        f"guix gc: error: failed to connect to `{env['GUIX_DAEMON_SOCKET']}': "
        "No such file or directory\n"
    )


def test_archive_export_of_a_non_store_name(tmp_path: Path) -> None:
    # options->derivations+files (guix/scripts/archive.scm): what is not a store file name is
    # a package specification; specification->package: "~A: unknown package".
    d = start_daemon(tmp_path)
    try:
        env = dict(d.env, GUIX_DAEMON_SOCKET=d.socket)
        r = guixsvc(env, "archive", "--export", "hello")
        assert (r.returncode, r.stderr) == (1, "guix archive: error: hello: unknown package\n")
    finally:
        stop_daemon(d)


def test_gc_never_reports_a_negative_saving(tmp_path: Path) -> None:
    # An empty .links directory: upstream's removeUnusedLinks subtracts the directory's own size
    # and would print "saves -0.00 MiB"; a saving is never negative.
    d = start_daemon(tmp_path)
    try:
        r = guixsvc(dict(d.env, GUIX_DAEMON_SOCKET=d.socket), "gc")
    finally:
        stop_daemon(d)
    assert r.returncode == 0, r.stderr
    assert "note: currently hard linking saves 0.00 MiB\n" in r.stderr
    assert "-0.00" not in r.stderr
    assert r.stderr.endswith("guix gc: freed 0 bytes\n")
