# Stands in for nixpkgs' own `nixos/modules/services/misc/guix` (in NixOS's module list since
# 24.05) where our module has to meet it: the options it declares, with nixpkgs' names, types
# and defaults (written here from those facts, not copied).  It sits at
# `${modulesPath}/services/misc/guix`, so `disabledModules = [ "services/misc/guix" ]` finds it
# exactly as it finds nixpkgs' module.  Only the declarations: what nixpkgs' module makes of
# them is modelled in tests/test_nixos_module.py.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;
  cfg = config.services.guix;
in
{
  options.services.guix = {
    enable = lib.mkEnableOption "Guix build daemon service";

    group = mkOption {
      type = types.str;
      default = "guixbuild";
    };

    nrBuildUsers = mkOption {
      type = types.ints.unsigned;
      default = 10;
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    package = lib.mkPackageOption pkgs "guix" { };

    storeDir = mkOption {
      type = types.path;
      default = "/gnu/store";
    };

    stateDir = mkOption {
      type = types.path;
      default = "/var";
    };

    substituters.urls = mkOption {
      type = types.listOf types.str;
      default = [
        "https://ci.guix.gnu.org"
        "https://bordeaux.guix.gnu.org"
        "https://berlin.guix.gnu.org"
      ];
    };

    # The keys the Guix package installs in its share/guix.
    substituters.authorizedKeys = mkOption {
      type = types.listOf types.path;
      default = map (host: "${cfg.package}/share/guix/${host}.pub") [
        "ci.guix.gnu.org"
        "bordeaux.guix.gnu.org"
        "berlin.guix.gnu.org"
      ];
    };

    publish = {
      enable = lib.mkEnableOption "substitute server for your Guix store directory";

      generateKeyPair = mkOption {
        type = types.bool;
        default = true;
      };

      port = mkOption {
        type = types.port;
        default = 8181;
      };

      user = mkOption {
        type = types.str;
        default = "guix-publish";
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
    };

    gc = {
      enable = lib.mkEnableOption "automatic garbage collection service for Guix";

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };

      dates = mkOption {
        type = types.str;
        default = "03:15";
      };
    };
  };
}
