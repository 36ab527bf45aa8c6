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

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guixsvc units",
        description="Render the systemd units of guix-daemon, guix publish and guix gc.",
    )
    parser.add_argument("--store-dir", default=DEFAULT_STORE_DIR)
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR)
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="installation prefix of guixsvc (PREFIX/bin)"
    )
    parser.add_argument("--publish-port", type=int, default=DEFAULT_PUBLISH_PORT)
    parser.add_argument("--build-users-group", dest="build_group", default=DEFAULT_BUILD_GROUP)
    parser.add_argument("--build-users", type=int, default=DEFAULT_BUILD_USERS)
    parser.add_argument("--gc-arguments", default=DEFAULT_GC_ARGUMENTS)
    parser.add_argument("--gc-calendar", default=DEFAULT_GC_CALENDAR)
    parser.add_argument("--output", metavar="DIR", help="write the units there (default: print)")
    parser.add_argument("--sysusers", metavar="FILE", help="also write the sysusers.d file")
    parser.add_argument(
        "--generate-key",
        action="store_true",
        help="create CONF-DIR/signing-key.{pub,sec} if missing, then exit",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.generate_key:
        return generate_key(args.conf_dir)
    settings = UnitSettings(
        store_dir=args.store_dir,
        state_dir=args.state_dir,
        conf_dir=args.conf_dir,
        prefix=args.prefix,
        publish_port=args.publish_port,
        build_group=args.build_group,
        build_users=args.build_users,
        gc_arguments=args.gc_arguments,
        gc_calendar=args.gc_calendar,
    )
    try:
        rendered = render(settings)
    except UnitsError as exc:
        sys.stderr.write(f"guixsvc units: error: {exc}\n")
        return 1
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
