# What every test machine has: the module enabled (beside nixpkgs' own services.guix, which it
# disables), a python3 that can import guixsvc (the scenarios' store clients), and the scenario
# scripts.
{ config, pkgs, ... }:

{
  imports = [ ../module.nix ];

  services.guix.enable = true;
  # No network in the VMs: no substitute servers unless a test names one.
  services.guix.substituters.urls = [ ];

  environment.systemPackages = [
    (pkgs.python3.withPackages (_: [ config.services.guix.daemonPackage ]))
  ];

  virtualisation.memorySize = 1536;
  virtualisation.diskSize = 2048;
}
