{
  description = "guixsvc: the GNU Guix store services (guix-daemon, guix publish, guix gc) in Python";

  # A release branch, pinned by flake.lock (written for nixos-25.05 at a revision from
  # 2026-01-02): `nix flake check` builds the same thing everywhere.  `nix flake update` moves it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # The services are Linux-only (namespaces, build users, systemd).
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        guixsvc = pkgs.callPackage ./nix/package.nix { };
        default = guixsvc;
      });

      overlays.default = final: _prev: { guixsvc = final.callPackage ./nix/package.nix { }; };

      # `services.guix`, replacing nixpkgs' own; its daemonPackage defaults to ./nix/package.nix
      # built with the system's pkgs, its package (the `guix` command) to pkgs.guix.
      nixosModules.default = ./module.nix;
      nixosModules.guixsvc = ./module.nix;

      # The NixOS VM tests (`nix flake check`), the package itself, and a whole NixOS system
      # with the module beside nixpkgs' own services.guix (a container: no boot loader).
      checks = forAllSystems (
        pkgs:
        import ./nixos-tests { inherit pkgs; }
        // {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          nixos-system =
            (lib.nixosSystem {
              inherit (pkgs.stdenv.hostPlatform) system;
              modules = [
                self.nixosModules.default
                {
                  boot.isContainer = true;
                  services.guix.enable = true;
                  services.guix.publish.enable = true;
                  services.guix.gc.enable = true;
                  system.stateVersion = "25.05";
                }
              ];
            }).config.system.build.toplevel;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps:
              [
                ps.jinja2
                ps.zstandard
                ps.aiohttp
                (ps.systemd-python or ps.systemd)
                ps.pytest
                ps.hypothesis
              ]
            ))
            pkgs.ruff
            pkgs.nix
            pkgs.busybox
            pkgs.guile
          ];
          shellHook = ''
            export NIXPKGS_LIB=${nixpkgs}
          '';
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree or pkgs.nixfmt-rfc-style);
    };
}
