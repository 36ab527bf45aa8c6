"""`guixsvc units`: render the systemd units of the three services from one set of templates.

The templates in ``units/*.j2`` are the single source of truth for every unit file: plain
distributions render them with their own directories (`guixsvc units --output
/etc/systemd/system`), and the Nix package renders them into its ``lib/systemd/system`` for
``systemd.packages``.  The store directory also names the mount unit (``/gnu/store`` →
``gnu-store.mount``), so it is escaped the way ``systemd-escape --path`` does.

`guixsvc units --generate-key` is the small privileged step `guix-publish-keygen.service` runs
before the first start of `guix publish`: it creates the signing key pair like
`guix archive --generate-key` when neither key file exists yet.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from guixsvc.cliargs import (
    Option,
    UsageError,
    help_option,
    parse_command_line,
    run_command,
    version_option,
)

TEMPLATE_SUFFIX = ".j2"
# The template of the store's mount unit; its output name depends on the store directory.
MOUNT_TEMPLATE = "gnu-store.mount.j2"
SYSUSERS_TEMPLATE = "guix-sysusers.conf.j2"

DEFAULT_STORE_DIR = "/gnu/store"
DEFAULT_STATE_DIR = "/var/guix"
DEFAULT_CONF_DIR = "/etc/guix"
DEFAULT_PREFIX = "/usr"
DEFAULT_PUBLISH_PORT = 8181
DEFAULT_BUILD_GROUP = "guixbuild"
DEFAULT_BUILD_USERS = 10
# Upstream's etc/guix-gc.service.in and etc/guix-gc.timer.
DEFAULT_GC_ARGUMENTS = "-d 1m -F 10G"
DEFAULT_GC_CALENDAR = "weekly"
#: Upstream's user for the unprivileged daemon (Guix System's `guix-daemon` account).
DEFAULT_DAEMON_USER = "guix-daemon"
DEFAULT_LOG_DIR = "/var/log/guix"


class UnitsError(Exception):
    pass


def templates_dir() -> Path:
    """Where the templates are: ``$GUIXSVC_UNITS_DIR``, the source tree, or the installed copy."""
    explicit = os.environ.get("GUIXSVC_UNITS_DIR")
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        Path(__file__).resolve().parent.parent / "units",
        Path(sys.prefix) / "share" / "guixsvc" / "units",
    ]
    for candidate in candidates:
        if (candidate / MOUNT_TEMPLATE).is_file():
            return candidate
    raise UnitsError("unit templates not found (set GUIXSVC_UNITS_DIR to the units/ directory)")


def escape_path(path: str) -> str:
    """`systemd-escape --path PATH`: the unit name stem of a mount point."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-"
    out = []
    for index, char in enumerate(trimmed):
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char in ":_" or (char == "." and index):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def _absolute(name: str, value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value) or "%" in value:
        raise UnitsError(f"{name} must be an absolute file name without spaces: {value!r}")
    normal = os.path.normpath(value)
    return "/" if normal == "/" else normal.rstrip("/")


@dataclass(frozen=True)
class UnitSettings:
    store_dir: str = DEFAULT_STORE_DIR
    state_dir: str = DEFAULT_STATE_DIR
    conf_dir: str = DEFAULT_CONF_DIR
    prefix: str = DEFAULT_PREFIX
    publish_port: int = DEFAULT_PUBLISH_PORT
    build_group: str = DEFAULT_BUILD_GROUP
    build_users: int = DEFAULT_BUILD_USERS
    gc_arguments: str = DEFAULT_GC_ARGUMENTS
    gc_calendar: str = DEFAULT_GC_CALENDAR
    #: Upstream's unprivileged mode: guix-daemon runs as `daemon_user`, builds in user
    #: namespaces, no build users.
    rootless: bool = False
    daemon_user: str = DEFAULT_DAEMON_USER
    log_dir: str = DEFAULT_LOG_DIR

    def variables(self) -> dict[str, object]:
        return {
            "store_dir": _absolute("--store-dir", self.store_dir),
            "state_dir": _absolute("--state-dir", self.state_dir),
            "conf_dir": _absolute("--conf-dir", self.conf_dir),
            "bindir": _absolute("--prefix", self.prefix).rstrip("/") + "/bin",
            "publish_port": self.publish_port,
            "build_group": self.build_group,
            "build_users": self.build_users,
            "gc_arguments": self.gc_arguments,
            "gc_calendar": self.gc_calendar,
            "rootless": self.rootless,
            "daemon_user": self.daemon_user,
            "log_dir": _absolute("--log-dir", self.log_dir),
        }

    @property
    def mount_unit(self) -> str:
        return escape_path(_absolute("--store-dir", self.store_dir)) + ".mount"


def render(settings: UnitSettings, template_dir: Path | None = None) -> dict[str, str]:
    """Output file name → contents, for every unit and the sysusers.d file."""
    import jinja2

    directory = template_dir or templates_dir()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    variables = settings.variables()
    result: dict[str, str] = {}
    for path in sorted(directory.glob("*" + TEMPLATE_SUFFIX)):
        if path.name.startswith("_"):
            continue
        if path.name == MOUNT_TEMPLATE:
            name = settings.mount_unit
        elif path.name == SYSUSERS_TEMPLATE:
            name = "guix.conf"
        else:
            name = path.name.removesuffix(TEMPLATE_SUFFIX)
        text = env.get_template(path.name).render(**variables)
        result[name] = text.rstrip("\n") + "\n"
    return result


def write_units(rendered: dict[str, str], output: Path, sysusers: Path | None) -> list[Path]:
    """Write unit files into ``output`` and the sysusers.d file to ``sysusers`` (if given)."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered.items():
        if name == "guix.conf":
            if sysusers is None:
                continue
            target = sysusers
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target = output / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(target)
        written.append(target)
    return written


def generate_key(conf_dir: str) -> int:
    """Create the signing key pair unless both files exist (guix-publish-keygen.service)."""
    from guixsvc.pki import keys

    pub = keys.public_key_file(conf_dir)
    sec = keys.secret_key_file(conf_dir)
    if os.path.exists(pub) and os.path.exists(sec):
        return 0
    try:
        keys.generate_key_files(conf_dir)
    except keys.PkiError as exc:
        sys.stderr.write(f"guix archive: error: {exc}\n")
        return 1
    sys.stderr.write(f"guixsvc units: generated the signing key pair under '{conf_dir}'\n")
    return 0


PROG = "guixsvc units"

HELP = f"""\
Usage: guixsvc units [OPTION]...
Render the systemd units of guix-daemon, guix publish and guix gc.

      --store-dir=DIR    use DIR as the store (default: {DEFAULT_STORE_DIR})
      --state-dir=DIR    use DIR as the state directory (default: {DEFAULT_STATE_DIR})
      --conf-dir=DIR     use DIR as the configuration directory
                         (default: {DEFAULT_CONF_DIR})
      --prefix=PREFIX    the installation prefix of guixsvc, PREFIX/bin
                         (default: {DEFAULT_PREFIX})
      --publish-port=PORT
                         guix publish listens on PORT (default: {DEFAULT_PUBLISH_PORT})
      --build-users-group=GROUP
                         build as the users of GROUP (default: {DEFAULT_BUILD_GROUP})
      --build-users=N    create N build users (default: {DEFAULT_BUILD_USERS})
      --gc-arguments=ARGS
                         run 'guixsvc gc ARGS' (default: '{DEFAULT_GC_ARGUMENTS}')
      --gc-calendar=WHEN run the collector at WHEN (default: {DEFAULT_GC_CALENDAR})
      --rootless         guix-daemon runs unprivileged as USER (see --daemon-user),
                         building in user namespaces, without build users
      --daemon-user=USER the user of the rootless daemon (default: {DEFAULT_DAEMON_USER})
      --output=DIR       write the units to DIR instead of printing them
      --sysusers=FILE    also write the sysusers.d file FILE
      --generate-key     create CONF-DIR/signing-key.{{pub,sec}} if missing, then exit

  -h, --help             display this help and exit
  -V, --version          display version information and exit
"""


@dataclass
class _Options:
    #: The UnitSettings fields given on the command line (the rest keep their defaults).
    units: dict[str, object] = field(default_factory=dict)
    output: str | None = None
    sysusers: str | None = None
    generate_key: bool = False


def _number(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise UsageError(f"{text}: invalid number") from None


def _set(
    name: str, convert: Callable[[str], object] = str
) -> Callable[[_Options, str | None], None]:
    """An option that sets the UnitSettings field `name` (or, for `output`/`sysusers`, the
    command's own)."""

    def handle(opts: _Options, arg: str | None) -> None:
        assert arg is not None
        if hasattr(opts, name):
            setattr(opts, name, convert(arg))
        else:
            opts.units[name] = convert(arg)

    return handle


def _extraneous(opts: _Options, arg: str) -> None:
    raise UsageError(f"{arg}: extraneous argument")


OPTIONS: tuple[Option[_Options], ...] = (
    help_option(HELP),
    version_option(PROG, "guixsvc"),
    Option(("store-dir",), _set("store_dir"), required=True),
    Option(("state-dir",), _set("state_dir"), required=True),
    Option(("conf-dir",), _set("conf_dir"), required=True),
    Option(("prefix",), _set("prefix"), required=True),
    Option(("publish-port",), _set("publish_port", _number), required=True),
    Option(("build-users-group",), _set("build_group"), required=True),
    Option(("build-users",), _set("build_users", _number), required=True),
    Option(("gc-arguments",), _set("gc_arguments"), required=True),
    Option(("gc-calendar",), _set("gc_calendar"), required=True),
    Option(("output",), _set("output"), required=True),
    Option(("sysusers",), _set("sysusers"), required=True),
    Option(("generate-key",), lambda o, _: setattr(o, "generate_key", True)),
    Option(("rootless",), lambda o, _: o.units.__setitem__("rootless", True)),
    Option(("daemon-user",), _set("daemon_user"), required=True),
)  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        PROG, lambda: _run(parse_command_line(words, OPTIONS, _Options(), _extraneous))
    )


def _run(args: _Options) -> int:
    settings = UnitSettings(**args.units)  # type: ignore[arg-type]
    if args.generate_key:
        return generate_key(settings.conf_dir)
    try:
        rendered = render(settings)
    except UnitsError as exc:
        raise UsageError(str(exc)) from None
    if args.output is None:
        for name, text in rendered.items():
            sys.stdout.write(f"### {name}\n{text}\n")
        return 0
    sysusers = Path(args.sysusers) if args.sysusers else None
    for path in write_units(rendered, Path(args.output), sysusers):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
