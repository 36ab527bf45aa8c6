# Evaluates module.nix with nixpkgs' real module system, standing in for NixOS only where the
# module writes: each of those options is a free-form attribute set (or list), so the result is
# exactly what the module defines.  nixpkgs' own `services.guix` is declared where NixOS has it,
# `${modulesPath}/services/misc/guix` (tests/nixos/modules/), since every NixOS since 24.05 imports
# it.  Used by tests/test_nixos_module.py; prints JSON.
{
  nixpkgsLib,
  # The configuration under test, as JSON (so the tests can write it in Python).
  configJson ? "{}",
  # A module file added to the configuration (for what JSON cannot say: packages).
  extraModule ? null,
  # Which modules declare `services.guix`:
  #   "nixos"   ours beside nixpkgs' (as on a real NixOS),
  #   "ours"    ours alone (a NixOS before 24.05),
  #   "nixpkgs" nixpkgs' alone (does a configuration evaluate there?),
  #   "clash"   both, nixpkgs' imported under a name `disabledModules` does not cover (must fail).
  modules ? "nixos",
  # The file of nixpkgs' real module (never part of this repository: a local copy), to use
  # instead of the stand-in in "nixpkgs" mode, checking the tests' model of what it makes.
  nixpkgsModuleFile ? null,
  # Another `modulesPath` (a directory with services/misc/guix/default.nix), for the real module.
  modulesDir ? null,
  # A directory standing in for the guixsvc package's output (the tests put a `bin/guixsvc`
  # there).
  packageDir ? "/pkg",
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
  fakePackage =
    attrs: overrides:
    attrs
    // {
      type = "derivation";
      inherit overrides;
      override = args: fakePackage attrs (overrides // args);
    };

  fakePkgs = {
    # guixsvc: what `callPackage ./nix/package.nix { }` gives.
    callPackage =
      fn: args:
      fakePackage {
        name = "guixsvc";
        outPath = packageDir;
        isGuixsvc = true;
      } { };
    # GNU Guix, nixpkgs' `guix`, and another one a configuration may choose.
    guix = fakePackage {
      name = "guix-1.4.0";
      outPath = "/guix";
    } { };
    guix-custom = fakePackage {
      name = "guix-custom";
      outPath = "/guix-custom";
    } { };
    # `runCommand` keeps the build script so the tests can run it.
    runCommand = name: env: script: {
      type = "derivation";
      inherit name env script;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    };
    runCommandLocal = fakePkgs.runCommand;
  };

  modulesPath = if modulesDir == null then ./modules else /. + modulesDir;
  nixpkgsModule = modulesPath + "/services/misc/guix";

  nixosStandIn = {
    options = {
      meta = free;
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      users.users = free;
      # NixOS's groups know their name.
      users.groups = mkOption {
        type = types.attrsOf (
          types.submodule (
            { name, ... }:
            {
              freeformType = types.attrsOf types.anything;
              options.name = mkOption {
                type = types.str;
                default = name;
              };
            }
          )
        );
        default = { };
      };
      systemd.packages = freeList;
      systemd.services = free;
      systemd.sockets = free;
      systemd.timers = free;
      systemd.mounts = freeList;
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
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

  serviceModules =
    {
      nixos = [
        nixpkgsModule
        ../../module.nix
      ];
      ours = [ ../../module.nix ];
      nixpkgs = [
        (if nixpkgsModuleFile == null then nixpkgsModule else /. + nixpkgsModuleFile)
      ];
      clash = [
        (nixpkgsModule + "/default.nix")
        ../../module.nix
      ];
    }
    .${modules};

  eval = lib.evalModules {
    specialArgs = { inherit modulesPath; };
    modules =
      [ nixosStandIn ]
      ++ serviceModules
      ++ [ (builtins.fromJSON configJson) ]
      ++ lib.optional (extraModule != null) (/. + extraModule);
  };
  inherit (eval) config options;

  # Every leaf option under services.guix: type, default (derivations print as their path) and
  # whether it shows in the manual.
  describe = opt: {
    type = opt.type.description;
    default = if opt ? default then opt.default else null;
    visible = opt.visible or true;
  };
  declared = lib.listToAttrs (
    lib.collect (x: x ? name && x ? value && x.value ? type) (
      lib.mapAttrsRecursiveCond (a: !(lib.isOption a)) (
        path: opt: lib.nameValuePair (lib.concatStringsSep "." path) (describe opt)
      ) options.services.guix
    )
  );

  packageInfo = p: {
    path = p.outPath;
    priority = p.meta.priority or null;
    overrides = p.overrides or null;
  };
in
{
  inherit declared;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
  packages = map packageInfo config.systemd.packages;
  systemPackages = map packageInfo config.environment.systemPackages;
  users = config.users.users;
  groups = lib.attrNames config.users.groups;
  services = config.systemd.services;
  sockets = config.systemd.sockets;
  timers = config.systemd.timers;
  mounts = config.systemd.mounts;
  tmpfiles = config.systemd.tmpfiles.rules;
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
