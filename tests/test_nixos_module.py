"""Checks of the NixOS side (module.nix, flake.nix, nix/, nixos-tests/) that run without nixpkgs.

CI has no nixpkgs and no VM.  With Debian's nix-bin alone: every `.nix` file parses, the flake's
lock pins a real release revision, and nix/package.nix takes no argument `callPackage` could fill
by accident.  With `NIXPKGS_LIB` (a nixpkgs checkout or the nix-community/nixpkgs.lib snapshot)
module.nix is evaluated by nixpkgs' real module system (`lib.evalModules`):
`tests/nixos/eval-module.nix` stands in for NixOS where the module writes, and declares nixpkgs'
own `services.guix` at `${modulesPath}/services/misc/guix` (tests/nixos/modules/) as every NixOS
since 24.05 does.  Our module must evaluate alone and beside it, and a configuration written for
nixpkgs' module must give what nixpkgs' module gives (`nixpkgs_makes` below models it, from the
facts of nixos/modules/services/misc/guix/default.nix), except the differences README.md
documents.  The generated ACL build script and activation scripts are run for real here, against
our own `guixsvc archive` and key code.
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
# A local copy of nixpkgs' nixos/modules/services/misc/guix/default.nix (never committed here):
# then the model `nixpkgs_makes` is checked against the real module too.
NIXPKGS_GUIX_MODULE = os.environ.get("NIXPKGS_GUIX_MODULE")

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
        files += sorted((ROOT / folder).rglob("*.nix"))
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


# --- without nixpkgs ------------------------------------------------------------------------

# nix/package.nix's arguments: what it needs from nixpkgs, and the directories the module (like
# nixpkgs' guix package) overrides.  Any other name risks being filled by `callPackage` with an
# unrelated top-level package: `pkgs.src` is a revision-control tool, `pkgs.version` ... exist.
PACKAGE_ARGS = {"lib": False, "python3Packages": False, "storeDir": True, "stateDir": True}


@needs_nix
def test_package_arguments_callpackage_cannot_fill_by_accident() -> None:
    assert NIX_INSTANTIATE is not None
    result = subprocess.run(
        [
            NIX_INSTANTIATE,
            "--eval",
            "--strict",
            "--json",
            "-E",
            f"builtins.functionArgs (import {ROOT / 'nix' / 'package.nix'})",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    args = json.loads(result.stdout)
    assert args == PACKAGE_ARGS
    assert not {"src", "version", "pname", "name"} & set(args)


@needs_nix
def test_package_source_is_this_repository() -> None:
    """The source is the repository, whatever the caller passes (no `src` override)."""
    text = (ROOT / "nix" / "package.nix").read_text()
    assert "src = repoSource;" in text


def test_flake_lock_pins_a_release() -> None:
    lock = json.loads((ROOT / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    assert lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"}
    node = lock["nodes"]["nixpkgs"]
    locked, original = node["locked"], node["original"]
    assert locked["type"] == original["type"] == "github"
    assert (locked["owner"], locked["repo"]) == (original["owner"], original["repo"])
    assert len(locked["rev"]) == 40 and int(locked["rev"], 16) >= 0
    assert locked["narHash"].startswith("sha256-") and len(locked["narHash"]) == 51
    assert isinstance(locked["lastModified"], int)
    # The lock matches the input, or `nix flake check` would re-lock (and fail offline).
    flake = (ROOT / "flake.nix").read_text()
    url = f'"github:{original["owner"]}/{original["repo"]}/{original["ref"]}"'
    assert f"inputs.nixpkgs.url = {url};" in flake
    assert original["ref"].startswith("nixos-") and original["ref"] != "nixos-unstable"


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


def _eval_command(
    config: dict[str, Any],
    *,
    package_dir: Path | str = "/pkg",
    with_kvm: bool = True,
    modules: str = "nixos",
    extra_module: Path | None = None,
    nixpkgs_module_file: str | None = None,
    modules_dir: Path | None = None,
) -> list[str]:
    assert NIX_INSTANTIATE is not None
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
        "--argstr",
        "modules",
        modules,
    ]
    if extra_module is not None:
        command += ["--argstr", "extraModule", str(extra_module)]
    if nixpkgs_module_file is not None:
        command += ["--argstr", "nixpkgsModuleFile", nixpkgs_module_file]
    if modules_dir is not None:
        command += ["--argstr", "modulesDir", str(modules_dir)]
    return command


def evaluate(
    guix: dict[str, Any],
    package_dir: Path | str = "/pkg",
    with_kvm: bool = True,
    *,
    modules: str = "nixos",
    extra_module: Path | None = None,
    other: dict[str, Any] | None = None,
    nixpkgs_module_file: str | None = None,
    modules_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluates `services.guix = guix` (plus `other` top-level settings); by default with our
    module beside nixpkgs' own, as on any current NixOS."""
    config: dict[str, Any] = {**(other or {})}
    config["services"] = {**config.get("services", {}), "guix": guix}
    command = _eval_command(
        config,
        package_dir=package_dir,
        with_kvm=with_kvm,
        modules=modules,
        extra_module=extra_module,
        nixpkgs_module_file=nixpkgs_module_file,
        modules_dir=modules_dir,
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def evaluation_error(guix: dict[str, Any], **options: Any) -> str:
    command = _eval_command({"services": {"guix": guix}}, **options)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, "the evaluation should have failed"
    return result.stderr


def exec_words(line: str) -> list[str]:
    """An Exec*= line as systemd splits it (no specifiers or variables in these tests)."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(line)]


def write_module(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "extra-module.nix"
    path.write_text(text)
    return path


DEFAULT_URLS = [
    "https://ci.guix.gnu.org",
    "https://bordeaux.guix.gnu.org",
    "https://berlin.guix.gnu.org",
]

# nixpkgs' services.guix: every option with its default (`package` is pkgs.guix, here "/guix").
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "enable": False,
    "package": "/guix",
    "group": "guixbuild",
    "nrBuildUsers": 10,
    "extraArgs": [],
    "storeDir": "/gnu/store",
    "stateDir": "/var",
    "substituters.urls": DEFAULT_URLS,
    "substituters.authorizedKeys": [
        "/guix/share/guix/ci.guix.gnu.org.pub",
        "/guix/share/guix/bordeaux.guix.gnu.org.pub",
        "/guix/share/guix/berlin.guix.gnu.org.pub",
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
# Ours only, documented in README.md; clientPackage is the old name of `package`, hidden.
EXTRA_DEFAULTS: dict[str, Any] = {
    "daemonPackage": "/pkg",
    "clientPackage": None,
    "publish.openFirewall": False,
    "publish.compression": [],
    "gc.randomizedDelaySec": "0",
    "gc.persistent": True,
    "privileged": True,
    "daemonUser": "guix-daemon",
}


def nixpkgs_makes(guix: dict[str, Any], proxy: dict[str, str] | None = None) -> dict[str, Any]:
    """What nixpkgs' module makes of a configuration (nixos/modules/services/misc/guix): the
    model the drop-in is held against."""
    group = guix.get("group", "guixbuild")
    state_dir = guix.get("stateDir", "/var")
    store_dir = guix.get("storeDir", "/gnu/store")
    publish = guix.get("publish", {})
    gc = guix.get("gc", {})
    urls = guix.get("substituters", {}).get("urls", DEFAULT_URLS)
    users = {
        f"guixbuilder{n}": {
            "group": group,
            "extraGroups": [group],
            "createHome": False,
            "description": f"Guix build user {n}",
            "isSystemUser": True,
        }
        for n in range(guix.get("nrBuildUsers", 10))
    }
    groups = {group}
    publish_user = publish.get("user", "guix-publish")
    if publish.get("enable"):
        groups.add("guix-publish")
        if publish_user == "guix-publish":
            users["guix-publish"] = {
                "description": "Guix publish user",
                "group": "guix-publish",
                "isSystemUser": True,
            }
    env = {
        "GUIX_LOCPATH": f"{state_dir}/guix/profiles/per-user/root/guix-profile/lib/locale",
        "LC_ALL": "C.UTF-8",
    }
    return {
        "users": users,
        "groups": groups,
        "daemon": [f"--build-users-group={group}"]
        + ([f"--substitute-urls={' '.join(urls)}"] if urls else [])
        + guix.get("extraArgs", []),
        "daemonEnvironment": {**env, **(proxy or {})},
        "publish": [
            f"--user={publish_user}",
            f"--port={publish.get('port', 8181)}",
            *publish.get("extraArgs", []),
        ],
        "publishEnvironment": env,
        "gc": gc.get("extraArgs", []),
        "gcDates": gc.get("dates", "03:15"),
        "packageOverrides": {"storeDir": store_dir, "stateDir": state_dir},
        "avahi": {"enable": True, "publish": {"enable": True, "userServices": True}},
    }


@needs_nix
@needs_lib
def test_options_match_nixpkgs_module() -> None:
    theirs = evaluate({}, modules="nixpkgs")["declared"]
    # The stand-in itself holds nixpkgs' facts.
    assert {name: info["default"] for name, info in theirs.items()} == UPSTREAM_DEFAULTS
    expected_types = {
        "enable": "boolean",
        "package": "package",
        "group": "string",
        "nrBuildUsers": "unsigned integer, meaning >=0",
        "extraArgs": "list of string",
        "substituters.urls": "list of string",
        "publish.enable": "boolean",
        "publish.generateKeyPair": "boolean",
        "publish.user": "string",
        "publish.extraArgs": "list of string",
        "gc.enable": "boolean",
        "gc.extraArgs": "list of string",
        "gc.dates": "string",
    }
    for name, description in expected_types.items():
        assert theirs[name]["type"] == description, name
    assert theirs["publish.port"]["type"].startswith("16 bit unsigned integer")
    assert theirs["storeDir"]["type"].endswith("path")

    ours = evaluate({})["declared"]
    for name, info in theirs.items():
        assert ours[name]["type"] == info["type"], name
        assert ours[name]["default"] == info["default"], name
        assert ours[name]["visible"], name
    extra = {name: info for name, info in ours.items() if name not in theirs}
    assert {name: info["default"] for name, info in extra.items()} == EXTRA_DEFAULTS
    assert extra["daemonPackage"]["type"] == "package"
    assert extra["clientPackage"]["visible"] is False
    assert extra["publish.compression"]["type"].startswith("list of string matching")
    # Alone (a NixOS before 24.05) the options are the same.
    assert evaluate({}, modules="ours")["declared"] == ours


@needs_nix
@needs_lib
def test_replaces_nixpkgs_module() -> None:
    config = {"enable": True, "publish": {"enable": True}, "gc": {"enable": True}}
    beside = evaluate(config)
    alone = evaluate(config, modules="ours")
    assert beside == alone
    # Without `disabledModules` (nixpkgs' module under a name it does not cover) both declare
    # services.guix: the error every NixOS >= 24.05 gave before.
    error = evaluation_error(config, modules="clash")
    assert "already declared" in error and "services.guix" in error


# Every option of nixpkgs' module away from its default.
NIXPKGS_CONFIG: dict[str, Any] = {
    "enable": True,
    "group": "builders",
    "nrBuildUsers": 3,
    "extraArgs": ["--max-jobs=4", "--cores=2", "--debug"],
    "storeDir": "/srv/gnu/store",
    "stateDir": "/srv/var",
    "substituters": {"urls": ["https://guix.example.com", "https://guix.example.org"]},
    "publish": {
        "enable": True,
        "generateKeyPair": False,
        "port": 8200,
        "user": "publisher",
        "extraArgs": [
            "--public-key=/run/keys/publish.pub",
            "--private-key",
            "/run/keys/publish.sec",
            "--cache=/var/cache/guix/publish",
            "--ttl=30d",
        ],
    },
    "gc": {
        "enable": True,
        "extraArgs": ["--delete-generations=1m", "--optimize"],
        "dates": "weekly",
    },
}
PROXY = {"http_proxy": "http://proxy.example:3128", "https_proxy": "http://proxy.example:3128"}


@needs_nix
@needs_lib
def test_configuration_for_nixpkgs_module_means_the_same(tmp_path: Path, package_dir: Path) -> None:
    from guixsvc.pki import keys

    key_files, public_keys = [], []
    for n in range(2):
        public, _secret = keys.generate_key_pair()
        path = tmp_path / f"key{n}.pub"
        path.write_bytes(public)
        key_files.append(str(path))
        public_keys.append(public)
    guix = {
        **NIXPKGS_CONFIG,
        "substituters": {**NIXPKGS_CONFIG["substituters"], "authorizedKeys": key_files},
    }
    # `package` too: a Guix other than pkgs.guix.
    choose_guix = write_module(
        tmp_path, "{ pkgs, ... }: { services.guix.package = pkgs.guix-custom; }\n"
    )
    other = {"networking": {"proxy": {"envVars": PROXY}}}
    # It is a valid configuration for nixpkgs' module...
    evaluate(guix, package_dir, modules="nixpkgs", extra_module=choose_guix, other=other)
    # ... and ours makes the same of it.
    result = evaluate(guix, package_dir, extra_module=choose_guix, other=other)
    expected = nixpkgs_makes(guix, PROXY)
    assert result["failedAssertions"] == [] and result["warnings"] == []

    assert result["users"] == expected["users"]
    assert set(result["groups"]) - {"kvm"} == expected["groups"]

    # The Guix command line for the users, built for these directories, and ours first.
    overrides = expected["packageOverrides"]
    assert {"path": "/guix-custom", "priority": None, "overrides": overrides} in result[
        "systemPackages"
    ]
    assert result["systemPackages"][0] == {
        "path": str(package_dir),
        "priority": -10,
        "overrides": overrides,
    }

    daemon = result["services"]["guix-daemon"]
    words = exec_words(daemon["serviceConfig"]["ExecStart"][1])
    assert words[0] == f"{package_dir}/bin/guix-daemon" and words[1:] == expected["daemon"]
    assert daemon["environment"] == expected["daemonEnvironment"]

    publish = result["services"]["guix-publish"]
    assert publish["environment"] == expected["publishEnvironment"]
    config = publish["serviceConfig"]
    # Documented differences: no `--user` (systemd starts it as that user) and the key files are
    # the service's credentials; the rest of the command line is nixpkgs'.
    assert config["User"] == "publisher"
    assert config["LoadCredential"] == [
        "",
        "signing-key.pub:/run/keys/publish.pub",
        "signing-key.sec:/run/keys/publish.sec",
    ]
    words = shlex.split(config["ExecStart"][1])
    assert words[:3] == [f"{package_dir}/bin/guixsvc", "publish", "--port=8200"]
    assert words[3:5] == ["--public-key=%d/signing-key.pub", "--private-key=%d/signing-key.sec"]
    assert words[5:] == ["--cache=/var/cache/guix/publish", "--ttl=30d"]
    assert expected["publish"] == [
        "--user=publisher",
        "--port=8200",
        "--public-key=/run/keys/publish.pub",
        "--private-key",
        "/run/keys/publish.sec",
        *words[5:],
    ]
    # The cache is writable in the read-only file system.
    assert config["CacheDirectory"] == ["guix/publish"]
    assert result["services"]["guix-publish-keygen"]["unitConfig"]["ConditionPathExists"] == [
        "",
        "!/",
    ]
    assert result["sockets"]["guix-publish"]["listenStreams"] == ["", "8200"]

    gc = result["services"]["guix-gc"]
    words = exec_words(gc["serviceConfig"]["ExecStart"][1])
    assert words[:2] == [f"{package_dir}/bin/guixsvc", "gc"] and words[2:] == expected["gc"]
    timer = result["timers"]["guix-gc"]["timerConfig"]
    assert timer["OnCalendar"][-1] == expected["gcDates"] and timer["Persistent"] is True

    assert result["avahi"] == expected["avahi"]
    assert result["mounts"][0]["where"] == "/srv/gnu/store"

    # The ACL: exactly the configured keys, mode 0600 as nixpkgs installs it.
    acl = run_acl_script(result["etc"]["guix/acl"]["script"], tmp_path / "acl")
    assert stat.S_IMODE(acl.stat().st_mode) == 0o600
    loaded = keys.Acl.load(acl)
    assert len(loaded) == 2 and all(loaded.authorizes(k) for k in public_keys)


def script_words(script: str) -> list[str]:
    """The command a NixOS `script` execs, as the shell splits it."""
    words = shlex.split(script.replace("\\\n", " "))
    assert words[0] == "exec", script
    return words[1:]


@needs_nix
@needs_lib
@pytest.mark.skipif(
    not NIXPKGS_GUIX_MODULE,
    reason="NIXPKGS_GUIX_MODULE does not name a copy of nixpkgs' "
    "nixos/modules/services/misc/guix/default.nix",
)
def test_model_agrees_with_real_nixpkgs_module(tmp_path: Path) -> None:
    """`nixpkgs_makes` against nixpkgs' module itself, on the configurations the tests use."""
    choose_guix = write_module(
        tmp_path, "{ pkgs, ... }: { services.guix.package = pkgs.guix-custom; }\n"
    )
    configurations = [
        ({"enable": True}, None, "/guix"),
        (
            {
                "enable": True,
                "nrBuildUsers": 0,
                "substituters": {"urls": []},
                "publish": {"enable": True},
            },
            None,
            "/guix",
        ),
        (
            {
                **NIXPKGS_CONFIG,
                "substituters": {**NIXPKGS_CONFIG["substituters"], "authorizedKeys": ["/k/a.pub"]},
            },
            choose_guix,
            "/guix-custom",
        ),
    ]
    other = {"networking": {"proxy": {"envVars": PROXY}}}
    for guix, extra_module, package in configurations:
        real = evaluate(
            guix,
            modules="nixpkgs",
            extra_module=extra_module,
            other=other,
            nixpkgs_module_file=NIXPKGS_GUIX_MODULE,
        )
        expected = nixpkgs_makes(guix, PROXY)
        # It names its users explicitly, as NixOS would by default.
        users = real["users"]
        assert all(user.pop("name", name) == name for name, user in users.items())
        assert users == expected["users"]
        assert set(real["groups"]) - {"kvm"} == expected["groups"]
        assert real["systemPackages"] == [
            {"path": package, "priority": None, "overrides": expected["packageOverrides"]}
        ]
        daemon = real["services"]["guix-daemon"]
        words = script_words(daemon["script"])
        assert words == [f"{package}/bin/guix-daemon", *expected["daemon"]]
        assert daemon["environment"] == expected["daemonEnvironment"]
        assert real["avahi"] == expected["avahi"]
        keys = guix.get("substituters", {}).get("authorizedKeys") or [
            f"{package}/share/guix/{host}.guix.gnu.org.pub" for host in ("ci", "bordeaux", "berlin")
        ]
        assert all(key in real["etc"]["guix/acl"]["script"] for key in keys)
        assert "install -Dm0600" in real["etc"]["guix/acl"]["script"]
        if guix.get("publish", {}).get("enable"):
            publish = real["services"]["guix-publish"]
            assert script_words(publish["script"]) == [
                f"{package}/bin/guix",
                "publish",
                *expected["publish"],
            ]
            assert publish["environment"] == expected["publishEnvironment"]
        if guix.get("gc", {}).get("enable"):
            gc = real["services"]["guix-gc"]
            assert script_words(gc["script"]) == [f"{package}/bin/guix", "gc", *expected["gc"]]
            assert gc["startAt"] == expected["gcDates"]
            assert real["timers"]["guix-gc"]["timerConfig"]["Persistent"] is True

    # Ours beside the real module, where NixOS has it: it is disabled, ours is what counts.
    modules_dir = tmp_path / "modules"
    (modules_dir / "services" / "misc" / "guix").mkdir(parents=True)
    shutil.copy(NIXPKGS_GUIX_MODULE, modules_dir / "services" / "misc" / "guix" / "default.nix")
    guix = {"enable": True, "publish": {"enable": True}, "gc": {"enable": True}}
    assert evaluate(guix, modules_dir=modules_dir) == evaluate(guix, modules="ours")


def run_acl_script(script: str, work: Path) -> Path:
    work.mkdir()
    out = work / "out"
    env = {**os.environ, "out": str(out)}
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, check=True, timeout=120
    )
    return out


@needs_nix
@needs_lib
def test_packages_and_assertions(tmp_path: Path) -> None:
    result = evaluate({"enable": True})
    assert result["failedAssertions"] == []
    # Both installed, ours ahead (its guix-daemon wins), each built for the directories.
    overrides = {"storeDir": "/gnu/store", "stateDir": "/var"}
    assert result["systemPackages"] == [
        {"path": "/pkg", "priority": -10, "overrides": overrides},
        {"path": "/guix", "priority": None, "overrides": overrides},
    ]
    assert result["packages"] == [{"path": "/pkg", "priority": None, "overrides": overrides}]

    swapped = evaluate(
        {"enable": True},
        extra_module=write_module(
            tmp_path,
            "{ pkgs, ... }: {\n"
            "  services.guix.package = pkgs.callPackage ./whatever.nix { };\n"
            "  services.guix.daemonPackage = pkgs.guix;\n"
            "}\n",
        ),
    )
    daemon_message, package_message = swapped["failedAssertions"]
    assert "services.guix.daemonPackage must be guixsvc" in daemon_message
    assert "guix-1.4.0 is not" in daemon_message
    assert "services.guix.package is GNU Guix" in package_message
    assert "services.guix.daemonPackage" in package_message

    # The old name of `package` still works, with a warning.
    renamed = evaluate(
        {"enable": True},
        extra_module=write_module(
            tmp_path, "{ pkgs, ... }: { services.guix.clientPackage = pkgs.guix-custom; }\n"
        ),
    )
    assert renamed["systemPackages"][1]["path"] == "/guix-custom"
    assert any("clientPackage" in w for w in renamed["warnings"])


@needs_nix
@needs_lib
def test_disabled_module_defines_nothing() -> None:
    result = evaluate({"publish": {"enable": True}, "gc": {"enable": True}})
    assert result["users"] == {}
    assert result["groups"] == ["kvm"]
    assert result["services"] == result["sockets"] == result["timers"] == {}
    assert result["mounts"] == [] and result["etc"] == {} and result["activation"] == {}
    assert result["profiles"] == ["/run/current-system/sw"]
    assert result["avahi"] == {} and result["systemPackages"] == []


@needs_nix
@needs_lib
def test_build_users_and_groups() -> None:
    result = evaluate({"enable": True})
    users = result["users"]
    # nixpkgs' names: 0-based, no padding.
    assert sorted(users) == sorted(f"guixbuilder{n}" for n in range(10))
    for n in range(10):
        user = users[f"guixbuilder{n}"]
        assert user["isSystemUser"] is True and user["createHome"] is False
        assert user["group"] == "guixbuild"
        # Members of the group through extraGroups: guix-daemon reads the group's member list.
        assert user["extraGroups"] == ["guixbuild"]
        assert user["description"] == f"Guix build user {n}"
    assert set(result["groups"]) == {"guixbuild", "kvm"}

    no_kvm = evaluate({"enable": True, "nrBuildUsers": 3, "group": "builders"}, with_kvm=False)
    assert sorted(no_kvm["users"]) == ["guixbuilder0", "guixbuilder1", "guixbuilder2"]
    assert no_kvm["users"]["guixbuilder2"]["extraGroups"] == ["builders"]
    assert set(no_kvm["groups"]) == {"builders"}
    start = exec_words(no_kvm["services"]["guix-daemon"]["serviceConfig"]["ExecStart"][1])
    assert "--build-users-group=builders" in start

    many = evaluate({"enable": True, "nrBuildUsers": 120})
    assert len(many["users"]) == 120
    assert "guixbuilder0" in many["users"] and "guixbuilder119" in many["users"]

    # Like nixpkgs: the group is passed even with no build users.
    none = evaluate({"enable": True, "nrBuildUsers": 0})
    assert none["users"] == {}
    start = exec_words(none["services"]["guix-daemon"]["serviceConfig"]["ExecStart"][1])
    assert "--build-users-group=guixbuild" in start


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
    assert result["sockets"]["guix-daemon"] == {"wantedBy": ["sockets.target"]}
    daemon = result["services"]["guix-daemon"]
    assert daemon["stopIfChanged"] is False
    assert "wantedBy" not in daemon, "socket-activated: only the socket starts at boot"
    assert daemon["environment"] == {
        "GUIX_LOCPATH": "/var/guix/profiles/per-user/root/guix-profile/lib/locale",
        "LC_ALL": "C.UTF-8",
    }
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
    assert result["firewallTCP"] == []

    # No substitute servers: no flag at all, so the daemon's default applies (nixpkgs does so).
    empty = evaluate({"enable": True, "substituters": {"urls": []}})
    start = exec_words(empty["services"]["guix-daemon"]["serviceConfig"]["ExecStart"][1])
    assert start == ["/pkg/bin/guix-daemon", "--build-users-group=guixbuild"]
    # Default URLs: nixpkgs' three.
    default = evaluate({"enable": True})
    start = exec_words(default["services"]["guix-daemon"]["serviceConfig"]["ExecStart"][1])
    assert start[2] == "--substitute-urls=" + " ".join(DEFAULT_URLS)


@needs_nix
@needs_lib
def test_proxy_reaches_the_daemon() -> None:
    result = evaluate({"enable": True}, other={"networking": {"proxy": {"envVars": PROXY}}})
    environment = result["services"]["guix-daemon"]["environment"]
    assert environment["http_proxy"] == environment["https_proxy"] == PROXY["http_proxy"]
    assert environment["LC_ALL"] == "C.UTF-8"


@needs_nix
@needs_lib
def test_other_directories() -> None:
    result = evaluate({"enable": True, "storeDir": "/srv/gnu/store", "stateDir": "/srv/var"})
    overrides = {"storeDir": "/srv/gnu/store", "stateDir": "/srv/var"}
    assert [p["overrides"] for p in result["systemPackages"]] == [overrides, overrides]
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

    acl_file = run_acl_script(script, tmp_path / "two")
    assert stat.S_IMODE(acl_file.stat().st_mode) == 0o600
    acl = keys.Acl.load(acl_file)
    assert len(acl) == 2
    assert acl.authorizes(public_keys[0]) and acl.authorizes(public_keys[1])
    assert not acl.authorizes(public_keys[2])

    empty = evaluate({"enable": True, "substituters": {"authorizedKeys": []}}, package_dir)
    acl = keys.Acl.load(run_acl_script(empty["etc"]["guix/acl"]["script"], tmp_path / "none"))
    assert len(acl) == 0

    # By default the keys the Guix package ships (services.guix.package, not guixsvc).
    default = evaluate({"enable": True}, package_dir)["etc"]["guix/acl"]["script"]
    for host in ("ci", "bordeaux", "berlin"):
        assert f"< /guix/share/guix/{host}.guix.gnu.org.pub" in default


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
    # nixpkgs' order; `guix pull`'s profile named where it is, not through XDG_CONFIG_HOME
    # (documented: pam_env leaves `${XDG_CONFIG_HOME}` empty when it is unset).
    guix_profiles = [
        "/var/guix/profiles/per-user/$USER/current-guix",
        "$HOME/.guix-home/profile",
        "$HOME/.guix-profile",
    ]
    assert profiles == [*guix_profiles, "/run/current-system/sw"]
    assert result["sessionVariables"]["GUIX_LOCPATH"] == ":".join(
        f"{p}/lib/locale" for p in guix_profiles
    )


@needs_nix
@needs_lib
def test_publish() -> None:
    result = evaluate({"enable": True, "publish": {"enable": True}})
    assert result["sockets"]["guix-publish"] == {"wantedBy": ["sockets.target"]}
    publish = result["services"]["guix-publish"]
    assert publish["serviceConfig"] == {"User": "guix-publish"}
    assert publish["stopIfChanged"] is False
    assert publish["environment"]["LC_ALL"] == "C.UTF-8"
    assert "guix-publish-keygen" not in result["services"]
    assert result["users"]["guix-publish"]["isSystemUser"] is True
    assert "guix-publish" in result["groups"]
    assert result["firewallTCP"] == [] and result["tmpfiles"] == []

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
                "extraArgs": ["--ttl=30d", "-c", "/srv/publish-cache"],
            },
        }
    )
    assert custom["sockets"]["guix-publish"]["listenStreams"] == ["", "8200"]
    assert custom["firewallTCP"] == [8200]
    # nixpkgs makes the group whatever the user.
    assert "guix-publish" not in custom["users"] and "guix-publish" in custom["groups"]
    service = custom["services"]["guix-publish"]
    assert service["serviceConfig"]["User"] == "nobody"
    assert "LoadCredential" not in service["serviceConfig"]
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
        "-c",
        "/srv/publish-cache",
    ]
    keygen = custom["services"]["guix-publish-keygen"]
    assert keygen["unitConfig"]["ConditionPathExists"] == ["", "!/"]
    # A cache outside /var/cache: writable, and made for the user.
    assert service["serviceConfig"]["ReadWritePaths"] == ["/srv/publish-cache"]
    assert "CacheDirectory" not in service["serviceConfig"]
    assert custom["tmpfiles"] == ["d /srv/publish-cache 0750 nobody - - -"]

    # One custom key file: the other stays the /etc/guix one.
    one_key = evaluate(
        {"enable": True, "publish": {"enable": True, "extraArgs": ["--private-key", "/k.sec"]}}
    )["services"]["guix-publish"]["serviceConfig"]
    assert one_key["LoadCredential"] == [
        "",
        "signing-key.pub:/etc/guix/signing-key.pub",
        "signing-key.sec:/k.sec",
    ]
    assert shlex.split(one_key["ExecStart"][1])[3:] == [
        "--public-key=%d/signing-key.pub",
        "--private-key=%d/signing-key.sec",
    ]


@needs_nix
@needs_lib
def test_publish_compression_is_checked() -> None:
    error = evaluation_error(
        {"enable": True, "publish": {"enable": True, "compression": ["brotli:3"]}}
    )
    assert "publish.compression" in error


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
def test_avahi_on_by_default_like_nixpkgs() -> None:
    avahi = evaluate({"enable": True})["avahi"]
    assert avahi == {"enable": True, "publish": {"enable": True, "userServices": True}}
    # Defaults only: the admin's word wins.
    off = evaluate({"enable": True}, other={"services": {"avahi": {"enable": False}}})
    assert off["avahi"]["enable"] is False


@needs_nix
@needs_lib
def test_rootless_mode() -> None:
    """`privileged = false` (Guix System's `privileged?`): the daemon as `daemonUser`, no build
    users, the hardened unit, and `guix-ownership` handing the store over before it starts."""
    result = evaluate({"enable": True, "privileged": False})
    assert list(result["users"]) == ["guix-daemon"]
    assert result["users"]["guix-daemon"]["isSystemUser"] is True
    assert "guix-daemon" in result["groups"] and "guixbuild" not in result["groups"]
    daemon = result["services"]["guix-daemon"]
    config = daemon["serviceConfig"]
    start = exec_words(config["ExecStart"][1])
    assert "--build-users-group" not in config["ExecStart"][1]
    assert start[:5] == ["/pkg/bin/guixsvc", "with-writable-store", "guix-daemon", "guix-daemon",
                         "/pkg/bin/guix-daemon"]  # fmt: skip
    assert config["CapabilityBoundingSet"] == "CAP_SYS_ADMIN CAP_SETUID CAP_SETGID"
    assert config["NoNewPrivileges"] is True
    assert config["RestrictNamespaces"] == "user mnt pid net ipc uts"
    assert "/gnu/store" in config["ReadWritePaths"]
    assert "guix-ownership.service" in daemon["requires"]
    ownership = result["services"]["guix-ownership"]
    assert "migrate-store --to-user=guix-daemon" in ownership["script"]
    keygen = result["services"]["guix-publish-keygen"]["serviceConfig"]
    assert keygen["User"] == keygen["Group"] == "guix-daemon"
    assert "install -d -m 0755 -o guix-daemon" in result["activation"]["guix"]["text"]
    # Back to root: the same unit gives the store back.
    root = evaluate({"enable": True})
    assert "migrate-store --to-root" in root["services"]["guix-ownership"]["script"]
    assert "User" not in root["services"]["guix-daemon"]["serviceConfig"]
