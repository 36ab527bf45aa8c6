# The NixOS VM tests, one attribute each (`nix flake check` runs them as `checks.<system>.*`).
# Each runs the scenario script of tests/e2e/scenarios/ it shares with the nspawn harness, plus the
# checks only NixOS has (options, ACL from the module, `switch-to-configuration`).
{ pkgs }:

{
  basic = pkgs.testers.runNixOSTest ./basic.nix;
  rootless = pkgs.testers.runNixOSTest ./rootless.nix;
  publish = pkgs.testers.runNixOSTest ./publish.nix;
  gc = pkgs.testers.runNixOSTest ./gc.nix;
}
