# The guixsvc Python package, with its systemd units rendered for this store and state directory.
#
# `storeDir` and `stateDir` follow the nixpkgs `guix` package: `stateDir` is the local state
# directory (`/var`), the services keep their data under `${stateDir}/guix`.  The module calls
# `package.override { inherit storeDir stateDir; }` so the units under `lib/systemd/system` (used
# through `systemd.packages`) name the directories the admin chose.
#
# No other argument: `callPackage` fills every argument named like a nixpkgs attribute, so an
# optional one such as `src` or `version` would silently take an unrelated package
# (tests/test_nixos_module.py checks the exact set).  The source is always this repository.
{
  lib,
  python3Packages,
  storeDir ? "/gnu/store",
  stateDir ? "/var",
}:

let
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);

  # The repository minus what is never part of the package: build trees, virtual environments,
  # caches, Nix results, tests and benchmarks, the Nix files themselves (so editing those does not
  # rebuild the package).
  repoSource = lib.cleanSourceWith {
    name = "guixsvc-source";
    src = ../.;
    filter =
      path: type:
      let
        relative = lib.removePrefix (toString ../. + "/") (toString path);
        top = lib.head (lib.splitString "/" relative);
        base = baseNameOf path;
      in
      !(
        # Only at the top: `guixsvc/daemon/build` is a package.
        (
          relative == top
          && lib.elem top [
            ".git"
            ".venv"
            "local"
            "build"
            "dist"
            "nix"
            "nixos-tests"
            "tests"
            "bench"
          ]
        )
        || lib.elem base [
          "__pycache__"
          ".pytest_cache"
          ".ruff_cache"
        ]
        || lib.hasSuffix ".egg-info" base
        || lib.hasPrefix "result" base
        || lib.hasSuffix ".nix" base
      );
  };

  # The substitute servers' public keys Guix ships in `share/guix`, so the module's default
  # `substituters.authorizedKeys` (`${package}/share/guix/*.pub`) means what it means upstream.
  officialKeys = {
    "berlin.guix.gnu.org" = "8D156F295D24B0D9A86FA5741A840FF2D24F60F7B6C4134814AD55625971B394";
    "ci.guix.gnu.org" = "8D156F295D24B0D9A86FA5741A840FF2D24F60F7B6C4134814AD55625971B394";
    "bordeaux.guix.gnu.org" = "7D602902D3A2DBB83F8A0FB98602A754C5493B0B778C8D1DD4E0F41DE14DE34F";
  };
  installKey = host: q: ''
    printf '(public-key\n (ecc\n  (curve Ed25519)\n  (q #%s#)\n  )\n )\n' ${q} \
      > "$out/share/guix/${host}.pub"
  '';

  # systemd-python is `systemd-python` in current nixpkgs and `systemd` in older ones.
  systemdPython = python3Packages.systemd-python or python3Packages.systemd;
in
# A Python package (not just an application) so `python3.withPackages (ps: [ guixsvc ])` can import
# it too: the VM tests' store clients do.
python3Packages.buildPythonPackage {
  pname = pyproject.project.name;
  inherit (pyproject.project) version;
  pyproject = true;

  src = repoSource;

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    jinja2
    zstandard
    aiohttp
    systemdPython
  ];

  # The units are rendered by our own renderer from the source's `units/*.j2` (one source of
  # truth with plain distributions), before the wrappers exist, so it runs from the freshly
  # installed site-packages.
  postInstall = ''
    mkdir -p "$out/lib/systemd/system" "$out/share/guix"
    GUIXSVC_UNITS_DIR="$NIX_BUILD_TOP/$sourceRoot/units" \
    PYTHONPATH="$out/${python3Packages.python.sitePackages}:$PYTHONPATH" \
      ${python3Packages.python.interpreter} -m guixsvc.cli units \
        --store-dir=${lib.escapeShellArg storeDir} \
        --state-dir=${lib.escapeShellArg "${stateDir}/guix"} \
        --prefix="$out" \
        --output="$out/lib/systemd/system"
    ${lib.concatStrings (lib.mapAttrsToList installKey officialKeys)}
  '';

  # The test suite needs root, namespaces and a writable store; the VM tests cover the package.
  doCheck = false;
  pythonImportsCheck = [
    "guixsvc"
    "guixsvc.daemon.cli"
  ];

  passthru = {
    inherit storeDir stateDir;
    # What the NixOS module checks `services.guix.daemonPackage` (and `package`) against.
    isGuixsvc = true;
  };

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.gpl3Plus;
    mainProgram = "guix-daemon";
    platforms = lib.platforms.linux;
  };
}
