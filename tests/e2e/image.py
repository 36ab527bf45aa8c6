"""The Debian root the end-to-end machines boot: made once with debootstrap, then reused.

debootstrap is the slow part of the end-to-end test (a minute or two on a fresh machine), so the
root is cached under a directory keyed by everything that goes into it (suite, mirror, package
list).  Each machine boots a throw-away copy (`cp --reflink=auto -a`), so scenarios never see
each other's leftovers and the cached root is never modified after it was completed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

SUITE = "bookworm"
# systemd and what the scenarios use inside the machines: Python 3.11 with our dependencies from
# Debian, iproute2 for the private network, procps for ps/pgrep in assertions.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "procps",
    "python3",
    "python3-pip",
    "python3-aiohttp",
    "python3-zstandard",
    # debootstrap does not resolve virtual packages (python3-zstandard needs cffi's backend API).
    "python3-cffi-backend",
    "python3-jinja2",
    "python3-systemd",
)
# Bumped when the way the root is prepared changes, so stale caches are not reused.
LAYOUT = "2"


class ImageUnavailable(Exception):
    """The root cannot be made here (no debootstrap, no mirror, not root); tests skip."""


def default_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    src_d = Path("/etc/apt/sources.list.d")
    if src_d.is_dir():
        candidates += sorted(src_d.iterdir())
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            one_line = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if (
                one_line
                and "debian-security" not in one_line.group(1)
                and (one_line.group(2).startswith(SUITE) or "debian" in one_line.group(1))
            ):
                return one_line.group(1)
        uris = re.findall(r"^URIs:\s*(.+)$", text, re.MULTILINE)
        for uri_line in uris:
            for uri in uri_line.split():
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return "http://deb.debian.org/debian"


def cache_root() -> Path:
    explicit = os.environ.get("GUIXSVC_E2E_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "guixsvc-e2e"
    if os.geteuid() == 0:
        return Path("/var/cache/guixsvc-e2e")
    return Path.home() / ".cache" / "guixsvc-e2e"


def image_key(mirror: str) -> str:
    text = "\n".join([LAYOUT, SUITE, mirror, *sorted(PACKAGES)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prepare(root: Path) -> None:
    """Settings every machine needs, done once in the cached root."""
    (root / "etc/hostname").write_text("guixsvc-e2e\n")
    # No console login prompts or networkd/resolved fiddling with our addresses.
    for unit in ("console-getty.service", "getty@tty1.service", "systemd-networkd.service"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/journald.conf.d/e2e.conf").write_text("[Journal]\nStorage=volatile\n")


def ensure_image(
    log: list[str] | None = None, announce: Callable[[str], None] | None = None
) -> Path:
    """Path of a completed Debian root, running debootstrap when the cache has none.

    `announce` is told, in one line each, when a debootstrap starts and ends (it is slow and
    would otherwise be a silent minute inside a quiet test run)."""
    if os.geteuid() != 0:
        raise ImageUnavailable("the end-to-end test needs root (debootstrap, systemd-nspawn)")
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container")):
        if shutil.which(tool) is None:
            raise ImageUnavailable(f"{tool} is missing (Debian package {package})")
    mirror = os.environ.get("GUIXSVC_E2E_MIRROR") or default_mirror()
    base = cache_root() / image_key(mirror)
    root = base / "rootfs"
    if (base / "complete").exists():
        return root
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / "rootfs.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    started = time.monotonic()
    if announce is not None:
        announce(
            f"e2e: making the Debian {SUITE} root with debootstrap from {mirror} into {base} "
            f"(once; about a minute; log: {base / 'debootstrap.log'})"
        )
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(tmp),
        mirror,
    ]
    with open(base / "debootstrap.log", "wb") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = (base / "debootstrap.log").read_text(errors="replace")[-2000:]
        raise ImageUnavailable(f"debootstrap from {mirror} failed ({result.returncode}):\n{tail}")
    _prepare(tmp)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    (base / "complete").write_text(f"{time.monotonic() - started:.1f}\n")
    if announce is not None:
        announce(f"e2e: Debian root ready in {time.monotonic() - started:.0f} s, cached in {root}")
    if log is not None:
        log.append(f"debootstrap took {time.monotonic() - started:.1f}s")
    return root


def copy_image(root: Path, dest: Path) -> None:
    """A private copy of the cached root for one machine."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(dest)], check=True)
