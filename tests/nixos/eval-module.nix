# Evaluates module.nix with nixpkgs' real module system, standing in for NixOS only where the
# module writes: each of those options is a free-form attribute set (or list), so the result is
# exactly what the module defines.  Used by tests/test_nixos_module.py; prints JSON.
{
  nixpkgsLib,
  # The configuration under test, as JSON (so the tests can write it in Python).
  configJson ? "{}",
  # A directory standing in for the package's output (the tests put a `bin/guixsvc` there).
  packageDir ? "/nonexistent/guixsvc",
  # Whether the NixOS under test has a `kvm` group.
  withKvm ? true,
}:

let
  # A nixpkgs checkout, a nixpkgs.lib snapshot (both have `lib/`), or the `lib` directory itself;
  # a string, so it is read in place rather than copied into the store.
  libDir = toString nixpkgsLib;
  lib = import (if builtins.pathExists (libDir + "/lib/default.nix") then libDir + "/lib" else libDir);
  inherit (lib) mkOption types;

  free = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
  freeList = mkOption {
    type = types.listOf types.anything;
    default = [ ];
  };
  freeSubmodule = mkOption {
    type = types.submodule { freeformType = types.attrsOf types.anything; };
    default = { };
  };

  # A derivation-shaped value: `types.package` accepts it, `override` records its arguments.
  fakePackage = overrides: {
    type = "derivation";
    name = "guixsvc";
    outPath = packageDir;
    inherit overrides;
    override = args: fakePackage (overrides // args);
  };

  # `runCommand` keeps the build script so the tests can run it.
  fakePkgs = {
    callPackage = fn: args: fakePackage { };
    runCommand = name: env: script: {
      type = "derivation";
      inherit name env script;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    };
  };

  nixosStandIn = {
    options = {
      meta = free;
      users.users = free;
      users.groups = free;
      systemd.packages = freeList;
      systemd.services = free;
      systemd.sockets = free;
      systemd.timers = free;
      systemd.mounts = freeList;
      environment.systemPackages = freeList;
      environment.etc = free;
      environment.sessionVariables = free;
      environment.profiles = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      system.activationScripts = free;
      system.userActivationScripts = free;
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      networking.proxy.envVars = free;
      services.avahi = freeSubmodule;
    };
    config = {
      _module.args.pkgs = fakePkgs;
      # What NixOS itself defines and the module looks at.
      users.groups = lib.optionalAttrs withKvm { kvm = { }; };
      environment.profiles = [ "/run/current-system/sw" ];
    };
  };

  eval = lib.evalModules {
    modules = [
      nixosStandIn
      ../../module.nix
      (builtins.fromJSON configJson)
    ];
  };
  inherit (eval) config options;

  # Every option of nixpkgs' services.guix with its type there, and the extras.
  upstreamTypes = {
    enable = types.bool;
    package = types.package;
    group = types.str;
    nrBuildUsers = types.ints.unsigned;
    extraArgs = types.listOf types.str;
    storeDir = types.path;
    stateDir = types.path;
    "substituters.urls" = types.listOf types.str;
    "substituters.authorizedKeys" = types.listOf types.path;
    "publish.enable" = types.bool;
    "publish.generateKeyPair" = types.bool;
    "publish.port" = types.port;
    "publish.user" = types.str;
    "publish.extraArgs" = types.listOf types.str;
    "gc.enable" = types.bool;
    "gc.extraArgs" = types.listOf types.str;
    "gc.dates" = types.str;
  };
  extraTypes = {
    clientPackage = types.nullOr types.package;
    "publish.openFirewall" = types.bool;
    "publish.compression" = types.listOf types.str;
    "gc.randomizedDelaySec" = types.str;
    "gc.persistent" = types.bool;
  };
  optionAt = name: lib.getAttrFromPath (lib.splitString "." name) options.services.guix;
  describe =
    name: expected:
    let
      opt = optionAt name;
    in
    {
      type = opt.type.description;
      expectedType = expected.description;
      default = if opt ? default then opt.default else null;
    };
  # Every leaf option the module declares, to catch undeclared extras.
  declared = lib.collect lib.isString (
    lib.mapAttrsRecursiveCond (a: !(lib.isOption a)) (path: _: lib.concatStringsSep "." path) options.services.guix
  );

  # Derivations print as their store path in JSON; keep the fields the tests look at.
  units =
    kind:
    lib.mapAttrs (_: u: removeAttrs u [ ]) config.systemd.${kind};
in
{
  upstream = lib.mapAttrs describe upstreamTypes;
  extra = lib.mapAttrs describe extraTypes;
  inherit declared;
  packageOverrides = map (p: p.overrides or null) config.systemd.packages;
  systemPackages = map (p: {
    path = p.outPath;
    priority = p.meta.priority or null;
  }) config.environment.systemPackages;
  users = config.users.users;
  groups = config.users.groups;
  services = units "services";
  sockets = units "sockets";
  timers = units "timers";
  mounts = config.systemd.mounts;
  etc = lib.mapAttrs (_: e: {
    source = "${e.source}";
    script = e.source.script or null;
  }) config.environment.etc;
  activation = config.system.activationScripts;
  userActivation = config.system.userActivationScripts;
  sessionVariables = config.environment.sessionVariables;
  profiles = config.environment.profiles;
  firewallTCP = config.networking.firewall.allowedTCPPorts;
  avahi = config.services.avahi;
}
