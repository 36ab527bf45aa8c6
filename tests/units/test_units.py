"""The rendered units pass systemd's own checks: `systemd-analyze verify` prints nothing, and the
unprivileged services score an exposure of at most 2.0 in `systemd-analyze security`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from guixsvc.units import UnitSettings, escape_path, main, render, write_units

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (Debian: systemd)"
)

UNITS = {
    "gnu-store.mount",
    "guix-daemon.socket",
    "guix-daemon.service",
    "guix-publish.socket",
    "guix-publish.service",
    "guix-publish-keygen.service",
    "guix-gc.service",
    "guix-gc.timer",
}


def _render(tmp_path: Path, **kwargs: object) -> Path:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    for program in ("guix-daemon", "guixsvc"):  # verify checks that ExecStart= is executable
        exe = prefix / "bin" / program
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    out = tmp_path / "units"
    write_units(render(UnitSettings(prefix=str(prefix), **kwargs)), out, tmp_path / "guix.conf")  # type: ignore[arg-type]
    return out


def test_escape_path_matches_systemd_escape() -> None:
    for path in ("/gnu/store", "/tmp/my store/x-y", "/var/.hidden", "/"):
        expected = subprocess.run(
            ["systemd-escape", "--path", path], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert escape_path(path) == expected


def test_all_units_rendered(tmp_path: Path) -> None:
    out = _render(tmp_path)
    assert {p.name for p in out.iterdir()} == UNITS
    daemon = (out / "guix-daemon.service").read_text()
    assert "--build-users-group=guixbuild" in daemon
    assert "Type=notify" in daemon and "KillMode=process" in daemon
    assert "OOMPolicy=continue" in daemon
    assert "RequiresMountsFor=/gnu/store /var/guix" in daemon
    socket = (out / "guix-daemon.socket").read_text()
    assert "ListenStream=/var/guix/daemon-socket/socket" in socket
    assert "SocketMode=0666" in socket
    assert "ListenStream=8181" in (out / "guix-publish.socket").read_text()
    assert "guixsvc gc -d 1m -F 10G" in (out / "guix-gc.service").read_text()
    timer = (out / "guix-gc.timer").read_text()
    assert "Persistent=true" in timer and "RandomizedDelaySec=" in timer
    sysusers = (tmp_path / "guix.conf").read_text()
    assert "g guixbuild -" in sysusers and "m guixbuilder10 guixbuild" in sysusers


def test_verify_prints_nothing(tmp_path: Path) -> None:
    out = _render(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in out.iterdir())],
        capture_output=True,
        text=True,
        cwd=out,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout == "" and result.stderr == ""


def test_verify_other_directories(tmp_path: Path) -> None:
    out = _render(
        tmp_path, store_dir="/srv/guix-store", state_dir="/srv/guix-state", conf_dir="/srv/conf"
    )
    mount = out / (escape_path("/srv/guix-store") + ".mount")
    assert mount.exists()
    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in out.iterdir())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported here: {result.stderr}")
    return float(match.group(1))


@pytest.mark.parametrize("unit", ["guix-publish.service", "guix-gc.service"])
def test_hardened_exposure(tmp_path: Path, unit: str) -> None:
    assert _exposure(_render(tmp_path) / unit) <= 2.0


def test_daemon_exposure_reported(tmp_path: Path) -> None:
    # The daemon needs root and namespaces for build sandboxes; only reported.
    level = _exposure(_render(tmp_path) / "guix-daemon.service")
    print(f"guix-daemon.service exposure: {level}")
    assert 0 < level <= 10


def test_cli_writes_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store-dir=/gnu/store", f"--output={tmp_path / 'o'}"]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} == UNITS
    assert main(["--store-dir=relative"]) == 1


def test_generate_key(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    assert main(["--generate-key", f"--conf-dir={conf}"]) == 0
    sec = (conf / "signing-key.sec").read_bytes()
    assert (conf / "signing-key.sec").stat().st_mode & 0o777 == 0o400
    assert (conf / "signing-key.pub").stat().st_mode & 0o777 == 0o444
    assert b"private-key" in sec
    # Idempotent: an existing pair is kept.
    assert main(["--generate-key", f"--conf-dir={conf}"]) == 0
    assert (conf / "signing-key.sec").read_bytes() == sec


def test_rootless_units(tmp_path: Path) -> None:
    """Upstream's unprivileged mode: guix-daemon as its own user, no build users, no
    capabilities; `systemd-analyze verify` is silent and the exposure is at most 5.0."""
    out = _render(tmp_path, rootless=True, daemon_user="guix-daemon")
    assert {p.name for p in out.iterdir()} == UNITS
    daemon = (out / "guix-daemon.service").read_text()
    assert "--build-users-group" not in daemon
    for line in ("guixsvc with-writable-store guix-daemon guix-daemon ",
                 "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETUID CAP_SETGID\n",
                 "AmbientCapabilities=\n", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/gnu/store /var/guix /var/log/guix",
                 "RestrictNamespaces=user mnt pid net ipc uts"):  # fmt: skip
        assert line in daemon, line
    sysusers = (tmp_path / "guix.conf").read_text()
    assert "u guix-daemon - " in sysusers and "guixbuilder" not in sysusers
    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in out.iterdir())],
        capture_output=True, text=True, cwd=out, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    level = _exposure(out / "guix-daemon.service")
    print(f"rootless guix-daemon.service exposure: {level}")
    assert level <= 5.0
    root_level = _exposure(_render(tmp_path / "root") / "guix-daemon.service")
    assert level < root_level


def test_cli_rootless(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rootless", "--daemon-user=guixd"]) == 0
    text = capsys.readouterr().out
    assert "with-writable-store guixd guixd " in text and "u guixd - " in text
