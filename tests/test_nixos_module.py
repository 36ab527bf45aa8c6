"""Checks of the NixOS side (module.nix, flake.nix, nix/, nixos-tests/) that run without nixpkgs.

CI has no nixpkgs and no VM, so two things are checked here: every `.nix` file parses
(`nix-instantiate --parse`, Debian's nix-bin), and module.nix evaluated by nixpkgs' real module
system (`lib.evalModules`, from the checkout `NIXPKGS_LIB` points at) generates the users, groups,
units, ACL and activation scripts it should.  `tests/nixos/eval-module.nix` stands in for NixOS
only where the module writes; the generated ACL build script and activation scripts are then run
for real here, against our own `guixsvc archive` and key code.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVAL_MODULE = ROOT / "tests" / "nixos" / "eval-module.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB")

needs_nix = pytest.mark.skipif(
    NIX_INSTANTIATE is None, reason="nix-instantiate not installed (Debian package nix-bin)"
)


def _lib_dir() -> str | None:
    if not NIXPKGS_LIB:
        return None
    for candidate in (Path(NIXPKGS_LIB) / "lib", Path(NIXPKGS_LIB)):
        if (candidate / "default.nix").is_file() and (candidate / "modules.nix").is_file():
            return NIXPKGS_LIB
    return None


needs_lib = pytest.mark.skipif(
    _lib_dir() is None,
    reason="NIXPKGS_LIB does not point at a nixpkgs lib (a nixpkgs checkout or the "
    "nix-community/nixpkgs.lib snapshot); the module evaluation needs the real lib.evalModules",
)


def nix_files() -> list[Path]:
    files = [ROOT / "module.nix", ROOT / "flake.nix"]
    for folder in ("nix", "nixos-tests", "tests/nixos"):
        files += sorted((ROOT / folder).glob("*.nix"))
    return files


@needs_nix
@pytest.mark.parametrize("path", nix_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nix_file_parses(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    result = subprocess.run(
        [NIX_INSTANTIATE, "--parse", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@needs_nix
def test_parse_catches_errors(tmp_path: Path) -> None:
    """The parse check can fail: a broken file is refused."""
    bad = tmp_path / "bad.nix"
    bad.write_text("{ a = 1; b = ; }\n")
    result = subprocess.run([NIX_INSTANTIATE, "--parse", str(bad)], capture_output=True)
    assert result.returncode != 0


# --- module evaluation ----------------------------------------------------------------------


@pytest.fixture()
def package_dir(tmp_path: Path) -> Path:
    """Stands in for the package's output: `bin/guixsvc` runs this checkout's guixsvc."""
    out = tmp_path / "guixsvc-pkg"
    (out / "bin").mkdir(parents=True)
    wrapper = out / "bin" / "guixsvc"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(sys.executable)} "
        '-m guixsvc.cli "$@"\n'
    )
    wrapper.chmod(0o755)
    return out


def evaluate(
    guix: dict[str, Any], package_dir: Path | str = "/pkg", with_kvm: bool = True
) -> dict[str, Any]:
    assert NIX_INSTANTIATE is not None
    config = {"services": {"guix": guix}}
    command = [
        NIX_INSTANTIATE,
        "--eval",
        "--strict",
        "--json",
        str(EVAL_MODULE),
        "--argstr",
        "nixpkgsLib",
        str(_lib_dir()),
        "--argstr",
        "configJson",
        json.dumps(config),
        "--argstr",
        "packageDir",
        str(package_dir),
        "--arg",
        "withKvm",
        "true" if with_kvm else "false",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def exec_words(line: str) -> list[str]:
    """An Exec*= line as systemd splits it (no specifiers or variables in these tests)."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(line)]


UPSTREAM_DEFAULTS: dict[str, Any] = {
    "enable": False,
    "group": "guixbuild",
    "nrBuildUsers": 10,
    "extraArgs": [],
    "storeDir": "/gnu/store",
    "stateDir": "/var",
    "substituters.urls": [
        "https://ci.guix.gnu.org",
        "https://bordeaux.guix.gnu.org",
        "https://berlin.guix.gnu.org",
    ],
    "substituters.authorizedKeys": [
        "/pkg/share/guix/ci.guix.gnu.org.pub",
        "/pkg/share/guix/bordeaux.guix.gnu.org.pub",
        "/pkg/share/guix/berlin.guix.gnu.org.pub",
    ],
    "publish.enable": False,
    "publish.generateKeyPair": True,
    "publish.port": 8181,
    "publish.user": "guix-publish",
    "publish.extraArgs": [],
    "gc.enable": False,
    "gc.extraArgs": [],
    "gc.dates": "03:15",
}
EXTRA_DEFAULTS: dict[str, Any] = {
    "clientPackage": None,
    "publish.openFirewall": False,
    "publish.compression": [],
    "gc.randomizedDelaySec": "0",
    "gc.persistent": True,
}


@needs_nix
@needs_lib
def test_options_match_nixpkgs_module() -> None:
    result = evaluate({})
    upstream = result["upstream"]
    assert set(upstream) == set(UPSTREAM_DEFAULTS) | {"package"}
    for name, info in upstream.items():
        assert info["type"] == info["expectedType"], name
        if name in UPSTREAM_DEFAULTS:
            assert info["default"] == UPSTREAM_DEFAULTS[name], name
    assert upstream["package"]["default"] == "/pkg"
    extra = result["extra"]
    for name, default in EXTRA_DEFAULTS.items():
        assert extra[name]["default"] == default, name
    assert extra["clientPackage"]["type"] == "null or package"
    assert extra["publish.compression"]["type"].startswith("list of string matching")
    # Nothing declared beyond nixpkgs' options and the documented extras.
    assert set(result["declared"]) == set(upstream) | set(extra)


@needs_nix
@needs_lib
def test_disabled_module_defines_nothing() -> None:
    result = evaluate({"publish": {"enable": True}, "gc": {"enable": True}})
    assert result["users"] == {}
    assert result["groups"] == {"kvm": {}}
    assert result["services"] == result["sockets"] == result["timers"] == {}
    assert result["mounts"] == [] and result["etc"] == {} and result["activation"] == {}
    assert result["profiles"] == ["/run/current-system/sw"]


@needs_nix
@needs_lib
def test_build_users_and_groups() -> None:
    result = evaluate({"enable": True})
    users = result["users"]
    assert sorted(users) == [f"guixbuilder{n:02d}" for n in range(1, 11)]
    for n in range(1, 11):
        user = users[f"guixbuilder{n:02d}"]
        assert user["isSystemUser"] is True and user["createHome"] is False
        assert user["group"] == "guixbuild"
        # Members of the group through extraGroups: guix-daemon reads the group's member list.
        assert user["extraGroups"] == ["guixbuild", "kvm"]
    assert set(result["groups"]) == {"guixbuild", "kvm"}

    no_kvm = evaluate({"enable": True, "nrBuildUsers": 3, "group": "builders"}, with_kvm=False)
    assert sorted(no_kvm["users"]) == ["guixbuilder01", "guixbuilder02", "guixbuilder03"]
    assert no_kvm["users"]["guixbuilder02"]["extraGroups"] == ["builders"]
    assert set(no_kvm["groups"]) == {"builders"}
    start = exec_words(no_kvm["services"]["guix-daemon"]["serviceConfig"]["ExecStart"][1])
    assert "--build-users-group=builders" in start

    many = evaluate({"enable": True, "nrBuildUsers": 120})
    assert len(many["users"]) == 120
    assert "guixbuilder001" in many["users"] and "guixbuilder120" in many["users"]

    none = evaluate({"enable": True, "nrBuildUsers": 0})
    assert none["users"] == {}
    start = exec_words(none["services"]["guix-daemon"]["serviceConfig"]["ExecStart"][1])
    assert not any(a.startswith("--build-users-group") for a in start)


@needs_nix
@needs_lib
def test_daemon_units() -> None:
    result = evaluate(
        {
            "enable": True,
            "extraArgs": ["--max-jobs=4", "--cores=2 x", 'quote"and$dollar%percent\\'],
            "substituters": {"urls": ["https://a.example", "https://b.example"]},
        }
    )
    assert result["packageOverrides"] == [{"storeDir": "/gnu/store", "stateDir": "/var"}]
    # Ours first, ahead of a client package's own guix-daemon.
    assert result["systemPackages"] == [{"path": "/pkg", "priority": -10}]
    assert result["sockets"]["guix-daemon"] == {"wantedBy": ["sockets.target"]}
    daemon = result["services"]["guix-daemon"]
    assert daemon["stopIfChanged"] is False
    assert "wantedBy" not in daemon, "socket-activated: only the socket starts at boot"
    exec_start = daemon["serviceConfig"]["ExecStart"]
    assert exec_start[0] == "", "the packaged ExecStart= must be cleared first"
    assert exec_words(exec_start[1]) == [
        "/pkg/bin/guix-daemon",
        "--build-users-group=guixbuild",
        "--substitute-urls=https://a.example https://b.example",
        "--max-jobs=4",
        "--cores=2 x",
        'quote"and$dollar%percent\\',
    ]
    assert "$$dollar%%percent" in exec_start[1]

    (mount,) = result["mounts"]
    assert mount["what"] == mount["where"] == "/gnu/store"
    assert mount["type"] == "none" and mount["options"] == "bind,ro"
    assert mount["wantedBy"] == ["multi-user.target"]
    assert "guix-daemon.service" in mount["before"]

    assert "guix-publish" not in result["services"] and "guix-gc" not in result["services"]
    assert result["timers"] == {} and "guix-publish" not in result["sockets"]
    assert result["avahi"] == {} and result["firewallTCP"] == []


@needs_nix
@needs_lib
def test_other_directories() -> None:
    result = evaluate({"enable": True, "storeDir": "/srv/gnu/store", "stateDir": "/srv/var"})
    assert result["packageOverrides"] == [{"storeDir": "/srv/gnu/store", "stateDir": "/srv/var"}]
    (mount,) = result["mounts"]
    assert mount["where"] == "/srv/gnu/store"
    text = result["activation"]["guix"]["text"]
    assert "/srv/var/guix/profiles/per-user" in text
    assert "/srv/var/guix/profiles/per-user/$USER/current-guix" in result["profiles"]


@needs_nix
@needs_lib
def test_acl_built_from_authorized_keys(tmp_path: Path, package_dir: Path) -> None:
    from guixsvc.pki import keys

    key_files = []
    public_keys = []
    for n in range(3):
        public, _secret = keys.generate_key_pair()
        path = tmp_path / f"key{n}.pub"
        path.write_bytes(public)
        key_files.append(str(path))
        public_keys.append(public)

    result = evaluate(
        {"enable": True, "substituters": {"authorizedKeys": key_files[:2]}}, package_dir
    )
    acl_entry = result["etc"]["guix/acl"]
    assert acl_entry["source"].endswith("-guix-acl")
    script = acl_entry["script"]
    assert script is not None and f"{package_dir}/bin/guixsvc archive --authorize" in script

    def build(script: str, name: str) -> Path:
        work = tmp_path / name
        work.mkdir()
        out = work / "out"
        env = {**os.environ, "out": str(out)}
        subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, check=True, timeout=120
        )
        return out

    acl = keys.Acl.load(build(script, "two"))
    assert len(acl) == 2
    assert acl.authorizes(public_keys[0]) and acl.authorizes(public_keys[1])
    assert not acl.authorizes(public_keys[2])

    empty = evaluate({"enable": True, "substituters": {"authorizedKeys": []}}, package_dir)
    acl = keys.Acl.load(build(empty["etc"]["guix/acl"]["script"], "none"))
    assert len(acl) == 0


@needs_nix
@needs_lib
def test_activation_scripts_run(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the activation script sets the store's owner: needs root")
    store = tmp_path / "gnu" / "store"
    var = tmp_path / "var"
    result = evaluate(
        {"enable": True, "storeDir": str(store), "stateDir": str(var), "group": "root"}
    )
    activation = result["activation"]["guix"]
    assert set(activation["deps"]) >= {"users"}

    def activate() -> None:
        subprocess.run(["bash", "-euo", "pipefail", "-c", activation["text"]], check=True)

    activate()
    info = store.stat()
    assert stat.S_IMODE(info.st_mode) == 0o1775 and info.st_uid == 0 and info.st_gid == 0
    for sub in ("guix/profiles/per-user", "guix/gcroots", "log/guix"):
        assert (var / sub).is_dir(), sub
    store.chmod(0o755)
    activate()  # a wrong mode is repaired; running twice is fine
    assert stat.S_IMODE(store.stat().st_mode) == 0o1775

    # Per-user profile links, with and without XDG_CONFIG_HOME.
    user_script = result["userActivation"]["guix-activate-user-profiles"]["text"]
    per_user = var / "guix" / "profiles" / "per-user" / "alice"
    for profile in ("current-guix", "guix-profile", "guix-home"):
        (per_user / profile).mkdir(parents=True)
    marker = tmp_path / "home-activated"
    activate_home = per_user / "guix-home" / "activate"
    activate_home.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\n")
    activate_home.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "USER": "alice"}
    subprocess.run(["bash", "-euo", "pipefail", "-c", user_script], env=env, check=True)
    assert os.readlink(home / ".config" / "guix" / "current") == str(per_user / "current-guix")
    assert os.readlink(home / ".guix-profile") == str(per_user / "guix-profile")
    assert os.readlink(home / ".guix-home") == str(per_user / "guix-home")
    assert marker.exists()

    xdg = tmp_path / "xdg"
    env["XDG_CONFIG_HOME"] = str(xdg)
    (per_user / "guix-home" / "activate").unlink()
    subprocess.run(["bash", "-euo", "pipefail", "-c", user_script], env=env, check=True)
    assert os.readlink(xdg / "guix" / "current") == str(per_user / "current-guix")

    # A user with no Guix profiles gets no links and no error.
    bob_home = tmp_path / "bob"
    bob_home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(bob_home), "USER": "bob"}
    subprocess.run(["bash", "-euo", "pipefail", "-c", user_script], env=env, check=True)
    assert list(bob_home.iterdir()) == []


@needs_nix
@needs_lib
def test_environment() -> None:
    result = evaluate({"enable": True})
    profiles = result["profiles"]
    guix_profiles = [
        "/var/guix/profiles/per-user/$USER/current-guix",
        "$HOME/.guix-home/profile",
        "$HOME/.guix-profile",
    ]
    assert profiles == [*guix_profiles, "/run/current-system/sw"]
    assert result["sessionVariables"]["GUIX_LOCPATH"] == ":".join(
        f"{p}/lib/locale" for p in guix_profiles
    )
    client = evaluate({"enable": True, "clientPackage": None})
    assert len(client["systemPackages"]) == 1


@needs_nix
@needs_lib
def test_publish() -> None:
    result = evaluate({"enable": True, "publish": {"enable": True}})
    assert result["sockets"]["guix-publish"] == {"wantedBy": ["sockets.target"]}
    publish = result["services"]["guix-publish"]
    assert publish["serviceConfig"] == {"User": "guix-publish"}
    assert publish["stopIfChanged"] is False
    assert "guix-publish-keygen" not in result["services"]
    assert result["users"]["guix-publish"]["isSystemUser"] is True
    assert "guix-publish" in result["groups"]
    assert result["firewallTCP"] == []

    custom = evaluate(
        {
            "enable": True,
            "publish": {
                "enable": True,
                "port": 8200,
                "openFirewall": True,
                "user": "nobody",
                "generateKeyPair": False,
                "compression": ["zstd:19", "gzip:9"],
                "extraArgs": ["--ttl=30d"],
            },
        }
    )
    assert custom["sockets"]["guix-publish"]["listenStreams"] == ["", "8200"]
    assert custom["firewallTCP"] == [8200]
    assert "guix-publish" not in custom["users"] and "guix-publish" not in custom["groups"]
    service = custom["services"]["guix-publish"]
    assert service["serviceConfig"]["User"] == "nobody"
    exec_start = service["serviceConfig"]["ExecStart"]
    assert exec_start[0] == ""
    # `%d` (the credentials directory) must reach systemd as a specifier, not escaped.
    assert shlex.split(exec_start[1]) == [
        "/pkg/bin/guixsvc",
        "publish",
        "--port=8200",
        "--public-key=%d/signing-key.pub",
        "--private-key=%d/signing-key.sec",
        "--compression=zstd:19",
        "--compression=gzip:9",
        "--ttl=30d",
    ]
    keygen = custom["services"]["guix-publish-keygen"]
    assert keygen["unitConfig"]["ConditionPathExists"] == ["", "!/"]


@needs_nix
@needs_lib
def test_publish_compression_is_checked() -> None:
    assert NIX_INSTANTIATE is not None
    config = {
        "services": {
            "guix": {"enable": True, "publish": {"enable": True, "compression": ["brotli:3"]}}
        }
    }
    result = subprocess.run(
        [
            NIX_INSTANTIATE,
            "--eval",
            "--strict",
            "--json",
            str(EVAL_MODULE),
            "--argstr",
            "nixpkgsLib",
            str(_lib_dir()),
            "--argstr",
            "configJson",
            json.dumps(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "publish.compression" in result.stderr


@needs_nix
@needs_lib
def test_gc() -> None:
    result = evaluate({"enable": True, "gc": {"enable": True}})
    timer = result["timers"]["guix-gc"]
    assert timer["wantedBy"] == ["timers.target"]
    assert timer["timerConfig"] == {
        "OnCalendar": ["", "03:15"],
        "RandomizedDelaySec": "0",
        "Persistent": True,
    }
    service = result["services"]["guix-gc"]
    assert service["restartIfChanged"] is False
    assert service["serviceConfig"]["ExecStart"] == ["", "/pkg/bin/guixsvc gc"]

    custom = evaluate(
        {
            "enable": True,
            "gc": {
                "enable": True,
                "dates": "weekly",
                "extraArgs": ["--delete-generations=1m", "--free-space=10G"],
                "randomizedDelaySec": "45min",
                "persistent": False,
            },
        }
    )
    timer = custom["timers"]["guix-gc"]["timerConfig"]
    assert timer == {
        "OnCalendar": ["", "weekly"],
        "RandomizedDelaySec": "45min",
        "Persistent": False,
    }
    assert exec_words(custom["services"]["guix-gc"]["serviceConfig"]["ExecStart"][1]) == [
        "/pkg/bin/guixsvc",
        "gc",
        "--delete-generations=1m",
        "--free-space=10G",
    ]


@needs_nix
@needs_lib
def test_avahi_only_for_discovery() -> None:
    assert evaluate({"enable": True})["avahi"] == {}
    discover = evaluate({"enable": True, "extraArgs": ["--discover=yes"]})["avahi"]
    assert discover["enable"] is True and discover["publish"]["userServices"] is True
    advertise = evaluate(
        {"enable": True, "publish": {"enable": True, "extraArgs": ["--advertise"]}}
    )["avahi"]
    assert advertise["enable"] is True
