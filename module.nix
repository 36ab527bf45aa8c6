# NixOS module `services.guix`: the guixsvc store services (guix-daemon, guix publish, guix gc).
#
# It is a drop-in for nixpkgs' `nixos/modules/services/misc/guix`: every option there exists here
# with the same name, type and default, so a configuration written for that module keeps working.
# The units themselves come from the package (`lib/systemd/system`, rendered from `units/*.j2`, the
# same files plain distributions install) through `systemd.packages`; this module only adds what
# the options change, as drop-ins, plus what systemd cannot do on its own: the build-user pool, the
# ACL built from `substituters.authorizedKeys`, the directories, the publish key and the per-user
# profile links.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.guix;

  inherit (lib)
    concatMapStrings
    concatStringsSep
    escapeShellArg
    literalExpression
    mkDefault
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    types
    ;

  # Strings, never copied to the store even when set to a path literal.
  storeDir = toString cfg.storeDir;
  stateDir = toString cfg.stateDir;

  # The package with its units rendered for the configured directories (the nixpkgs module
  # overrides its `guix` package the same way).
  package =
    if cfg.package ? override then cfg.package.override { inherit storeDir stateDir; } else cfg.package;

  guixStateDir = "${stateDir}/guix";
  perUserProfiles = "${guixStateDir}/profiles/per-user";

  guixsvc = "${package}/bin/guixsvc";

  # systemd's command-line quoting for Exec*= lines: bare words stay bare, anything else is
  # double-quoted with `\`, `"` escaped and `$`/`%` doubled so systemd expands neither.
  escapeExecArg =
    arg:
    let
      s = toString arg;
    in
    if builtins.match "[][A-Za-z0-9_./:=@+,-]+" s != null then
      s
    else
      "\"" + lib.replaceStrings [ "\\" "\"" "$" "%" ] [ "\\\\" "\\\"" "$$" "%%" ] s + "\"";
  execLine = args: concatStringsSep " " (map escapeExecArg args);

  # Build users are numbered from 01 like the Guix installer's (`guixbuilder01`, ...), wide
  # enough that names sort in numeric order.
  buildUserWidth = lib.max 2 (lib.stringLength (toString cfg.nrBuildUsers));
  buildUserName = n: "guixbuilder${lib.fixedWidthNumber buildUserWidth n}";
  buildUserGroups = [ cfg.group ] ++ optional (config.users.groups ? kvm) "kvm";
  buildUsers = lib.listToAttrs (
    map (
      n:
      lib.nameValuePair (buildUserName n) {
        isSystemUser = true;
        group = cfg.group;
        extraGroups = buildUserGroups;
        description = "Guix build user ${toString n}";
        home = "/var/empty";
        createHome = false;
      }
    ) (lib.range 1 cfg.nrBuildUsers)
  );

  # The daemon's command line: what the nixpkgs module passes, through systemd's own quoting.
  daemonArgs =
    optional (cfg.nrBuildUsers > 0) "--build-users-group=${cfg.group}"
    ++ [ "--substitute-urls=${concatStringsSep " " cfg.substituters.urls}" ]
    ++ cfg.extraArgs;

  # The packaged unit hands the key over as credentials (`%d` is their directory) to a server
  # with no privileges: no `--user`, the service's `User=` is `publish.user` instead.
  publishExtraArgs = map (c: "--compression=${c}") cfg.publish.compression ++ cfg.publish.extraArgs;
  publishExecStart =
    execLine [
      guixsvc
      "publish"
      "--port=${toString cfg.publish.port}"
    ]
    + " --public-key=%d/signing-key.pub --private-key=%d/signing-key.sec "
    + execLine publishExtraArgs;

  # Where Guix puts a user's profiles, whatever `XDG_CONFIG_HOME` says: linked into the home at
  # activation, and what the environment points at (pam_env cannot expand `${X:-default}`, these
  # paths need no fallback).
  userProfile = name: "${perUserProfiles}/$USER/${name}";
  guixProfiles = [
    (userProfile "current-guix") # `guix pull`'s guix, first so it wins in PATH
    "$HOME/.guix-home/profile"
    "$HOME/.guix-profile"
  ];

  # /etc/guix/acl as a store file: built once from the key files, so /etc can be immutable.
  aclFile =
    pkgs.runCommand "guix-acl"
      {
        preferLocalBuild = true;
        allowSubstitutes = false;
      }
      ''
        export GUIX_CONFIGURATION_DIRECTORY="$PWD/conf"
        mkdir -p "$GUIX_CONFIGURATION_DIRECTORY"
        printf '(acl)\n' > "$GUIX_CONFIGURATION_DIRECTORY/acl"
        ${concatMapStrings (key: ''
          ${guixsvc} archive --authorize < ${escapeShellArg "${key}"}
        '') cfg.substituters.authorizedKeys}
        install -Dm0644 "$GUIX_CONFIGURATION_DIRECTORY/acl" "$out"
      '';

  # Avahi only matters when the daemon discovers substitute servers or publish advertises.
  usesAvahi =
    lib.any (a: a == "--discover" || a == "--discover=yes") cfg.extraArgs
    || (cfg.publish.enable && lib.elem "--advertise" cfg.publish.extraArgs);
in
{
  meta.maintainers = [ ];

  options.services.guix = {
    enable = mkEnableOption "Guix build daemon service";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = ''
        The guixsvc package: {command}`guix-daemon` and {command}`guixsvc` with its systemd units
        in {file}`lib/systemd/system`. It is overridden with {option}`services.guix.storeDir` and
        {option}`services.guix.stateDir`.
      '';
    };

    clientPackage = mkOption {
      type = types.nullOr types.package;
      default = null;
      example = literalExpression "pkgs.guix";
      description = ''
        The Guix command line for users ({command}`guix build`, {command}`guix pull`, ...),
        talking to this daemon. `null` installs no client; the services do not need one.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "guixbuild";
      example = "guixbuild";
      description = "The group of the Guix build user pool.";
    };

    nrBuildUsers = mkOption {
      type = types.ints.unsigned;
      default = 10;
      example = 20;
      description = "Number of Guix build users to be used in the build pool.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--max-jobs=4"
        "--debug"
      ];
      description = "Extra flags to pass to the Guix daemon service.";
    };

    storeDir = mkOption {
      type = types.path;
      default = "/gnu/store";
      description = ''
        The store directory where the Guix service will serve to/from. Substitutes only apply
        to the store directory they were built for, normally {file}`/gnu/store`.
      '';
    };

    stateDir = mkOption {
      type = types.path;
      default = "/var";
      example = "/gnu/var";
      description = ''
        The local state directory; the services keep their data (database, profiles, roots,
        the daemon socket) in its {file}`guix` subdirectory.
      '';
    };

    substituters = {
      urls = mkOption {
        type = types.listOf types.str;
        default = [
          "https://ci.guix.gnu.org"
          "https://bordeaux.guix.gnu.org"
          "https://berlin.guix.gnu.org"
        ];
        example = literalExpression ''
          options.services.guix.substituters.urls.default ++ [
            "https://guix.example.com"
          ]
        '';
        description = ''
          A list of substitute servers' URLs for the Guix daemon to download substitutes from.
        '';
      };

      authorizedKeys = mkOption {
        type = types.listOf types.path;
        default = [
          "${cfg.package}/share/guix/ci.guix.gnu.org.pub"
          "${cfg.package}/share/guix/bordeaux.guix.gnu.org.pub"
          "${cfg.package}/share/guix/berlin.guix.gnu.org.pub"
        ];
        defaultText = "The packaged signing keys from {option}`services.guix.package`.";
        example = literalExpression ''
          options.services.guix.substituters.authorizedKeys.default ++ [
            (builtins.fetchurl { url = "https://guix.example.com/signing-key.pub"; })
          ]
        '';
        description = ''
          Signing keys of the substitute servers to accept substitutes from. They make up
          {file}`/etc/guix/acl`, built at build time.
        '';
      };
    };

    publish = {
      enable = mkEnableOption "substitute server for your Guix store directory";

      generateKeyPair = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Whether to generate signing keys in {file}`/etc/guix` when they are missing. Otherwise,
          `--public-key=$FILE` and `--private-key=$FILE` can be passed in
          {option}`services.guix.publish.extraArgs`.
        '';
      };

      port = mkOption {
        type = types.port;
        default = 8181;
        example = 8200;
        description = "Port of the substitute server to listen on.";
      };

      user = mkOption {
        type = types.str;
        default = "guix-publish";
        description = "Name of the user to change once the server is up.";
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "--ttl=30d"
          "--cache=/var/cache/guix/publish"
        ];
        description = "Extra flags to pass to the substitute server.";
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Whether to open {option}`services.guix.publish.port` in the firewall.";
      };

      compression = mkOption {
        type = types.listOf (types.strMatching "(none|gzip|lzip|zstd)(:[0-9]+)?|[0-9]+");
        default = [ ];
        example = [
          "zstd:19"
          "gzip:9"
        ];
        description = ''
          The `--compression` methods (and levels) NARs are offered with, in order. Empty means
          guix publish's default (gzip, level 3).
        '';
      };
    };

    gc = {
      enable = mkEnableOption "automatic garbage collection service for Guix";

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "--delete-generations=1m"
          "--free-space=10G"
          "--optimize"
        ];
        description = ''
          Arguments of {command}`guix gc`. With none it collects all garbage, so some options are
          recommended.
        '';
      };

      dates = mkOption {
        type = types.str;
        default = "03:15";
        example = "weekly";
        description = ''
          How often the garbage collection occurs, in the format of {manpage}`systemd.time(7)`.
        '';
      };

      randomizedDelaySec = mkOption {
        type = types.str;
        default = "0";
        example = "45min";
        description = ''
          Random delay added to each garbage collection's start ({manpage}`systemd.timer(5)`'s
          `RandomizedDelaySec=`), so that machines sharing a schedule do not collect at once.
        '';
      };

      persistent = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Whether a collection missed while the machine was off runs at the next boot
          (`Persistent=` of {manpage}`systemd.timer(5)`).
        '';
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      # Ours first, so `guix-daemon` is this daemon even when the client package ships one.
      environment.systemPackages = [ (lib.hiPrio package) ] ++ optional (cfg.clientPackage != null) cfg.clientPackage;

      systemd.packages = [ package ];

      users.users = buildUsers;
      users.groups.${cfg.group} = { };

      # The store and the state directory, and their modes as the Guix installer sets them. The
      # store may already be mounted read-only (on a switch): it is only touched when wrong.
      system.activationScripts.guix = {
        deps = [
          "users"
          "groups"
        ];
        text = ''
          install -d -m 0755 ${escapeShellArg (dirOf storeDir)}
          if [ ! -d ${escapeShellArg storeDir} ]; then
            install -d -m 1775 -o root -g ${escapeShellArg cfg.group} ${escapeShellArg storeDir}
          elif [ "$(stat -c '%a %U %G' ${escapeShellArg storeDir})" != ${escapeShellArg "1775 root ${cfg.group}"} ]; then
            chown root:${escapeShellArg cfg.group} ${escapeShellArg storeDir} \
              && chmod 1775 ${escapeShellArg storeDir} \
              || echo "warning: cannot set the owner and mode of ${storeDir}" >&2
          fi
          install -d -m 0755 ${escapeShellArg guixStateDir} \
            ${escapeShellArg "${guixStateDir}/profiles"} \
            ${escapeShellArg perUserProfiles} \
            ${escapeShellArg "${guixStateDir}/gcroots"} \
            ${escapeShellArg "${stateDir}/log/guix"}
        '';
      };

      # Read-only store everywhere but in the daemon's own mount namespace. The package ships the
      # mount for its store directory; this (a drop-in then) pulls it in and states it in full so
      # it is right even for a store directory the package has no unit for.
      systemd.mounts = [
        {
          description = "Read-only ${storeDir} for GNU Guix";
          what = storeDir;
          where = storeDir;
          type = "none";
          options = "bind,ro";
          unitConfig.DefaultDependencies = false;
          conflicts = [ "umount.target" ];
          before = [
            "umount.target"
            "guix-daemon.service"
          ];
          wantedBy = [ "multi-user.target" ];
        }
      ];

      # Only the socket starts at boot; the first client starts the daemon.
      systemd.sockets.guix-daemon.wantedBy = [ "sockets.target" ];

      systemd.services.guix-daemon = {
        environment = config.networking.proxy.envVars or { };
        serviceConfig.ExecStart = [
          ""
          (execLine ([ "${package}/bin/guix-daemon" ] ++ daemonArgs))
        ];
        # A changed daemon is restarted in place: the socket unit is neither stopped nor
        # restarted, so clients connecting during a `nixos-rebuild switch` wait in its backlog.
        stopIfChanged = false;
      };

      # Built at build time from the key files: nothing writes /etc at activation.
      environment.etc."guix/acl".source = aclFile;

      # Link the Guix profiles into the home, the way `guix pull`, `guix package` and
      # `guix home` do, for setups where only part of the home survives a reboot.
      system.userActivationScripts.guix-activate-user-profiles.text = ''
        # Not exported: only for finding where `guix pull` links its profile.
        XDG_CONFIG_HOME="''${XDG_CONFIG_HOME:-$HOME/.config}"
        guix_link_profile() {
          if [ -d "$1" ]; then
            mkdir -p "$(dirname "$2")"
            ln -sfn "$1" "$2"
          fi
        }
        guix_link_profile "${userProfile "current-guix"}" "$XDG_CONFIG_HOME/guix/current"
        guix_link_profile "${userProfile "guix-profile"}" "$HOME/.guix-profile"
        guix_link_profile "${userProfile "guix-home"}" "$HOME/.guix-home"
        if [ -L "$HOME/.guix-home" ] && [ -x "$HOME/.guix-home/activate" ]; then
          "$HOME/.guix-home/activate"
        fi
      '';

      # Guix-built programs find locales through GUIX_LOCPATH, not the host's LOCPATH.
      environment.sessionVariables.GUIX_LOCPATH = lib.makeSearchPath "lib/locale" guixProfiles;

      # Packages installed with Guix come before the system's.
      environment.profiles = lib.mkBefore guixProfiles;
    }

    (mkIf usesAvahi {
      services.avahi.enable = mkDefault true;
      services.avahi.publish = {
        enable = mkDefault true;
        userServices = mkDefault true;
        addresses = mkDefault true;
      };
    })

    (mkIf cfg.publish.enable {
      # The packaged guix-publish-keygen.service creates /etc/guix/signing-key.* before publish's
      # first start when they are missing. Without generateKeyPair it never runs (its conditions
      # are replaced by one that never holds: `/` exists) and the admin provides the keys.
      systemd.services.guix-publish-keygen = mkIf (!cfg.publish.generateKeyPair) {
        unitConfig.ConditionPathExists = [
          ""
          "!/"
        ];
      };

      systemd.sockets.guix-publish = {
        wantedBy = [ "sockets.target" ];
        # The packaged socket listens on 8181; another port replaces it.
        listenStreams = mkIf (cfg.publish.port != 8181) [
          ""
          (toString cfg.publish.port)
        ];
      };

      systemd.services.guix-publish = {
        # A static user of that name is used by DynamicUser= when it exists (the default one is
        # created below, as the nixpkgs module does); otherwise systemd allocates it.
        serviceConfig.User = cfg.publish.user;
        serviceConfig.ExecStart = mkIf (publishExtraArgs != [ ]) [
          ""
          publishExecStart
        ];
        stopIfChanged = false;
      };

      networking.firewall.allowedTCPPorts = mkIf cfg.publish.openFirewall [ cfg.publish.port ];

      users.users = mkIf (cfg.publish.user == "guix-publish") {
        guix-publish = {
          description = "Guix publish user";
          group = "guix-publish";
          isSystemUser = true;
        };
      };
      users.groups = mkIf (cfg.publish.user == "guix-publish") { guix-publish = { }; };
    })

    (mkIf cfg.gc.enable {
      systemd.services.guix-gc = {
        serviceConfig.ExecStart = [
          ""
          (execLine ([ guixsvc "gc" ] ++ cfg.gc.extraArgs))
        ];
        # A switch never starts a collection.
        restartIfChanged = false;
      };

      systemd.timers.guix-gc = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = [
            ""
            cfg.gc.dates
          ];
          RandomizedDelaySec = cfg.gc.randomizedDelaySec;
          Persistent = cfg.gc.persistent;
        };
      };
    })
  ]);
}
