# NixOS module `services.guix`: the guixsvc store services (guix-daemon, guix publish, guix gc).
#
# It replaces nixpkgs' own `nixos/modules/services/misc/guix` (declared by every NixOS since
# 24.05), which it disables, and keeps that module's options: names, types, defaults and meaning.
# A configuration written for nixpkgs' module evaluates unchanged and gets the same users, groups,
# command lines, ACL and environment.  `services.guix.package` is still the Guix package (the
# `guix` command for users and the substitute servers' keys); the services themselves come from
# `services.guix.daemonPackage` (guixsvc).  The deliberate differences are stated in the option
# descriptions and in README.md ("NixOS").
#
# The units come from the daemon package (`lib/systemd/system`, rendered from `units/*.j2`, the
# same files plain distributions install) through `systemd.packages`; this module adds what the
# options change, as drop-ins, plus what systemd cannot do on its own: the build users, the ACL
# built from `substituters.authorizedKeys`, the directories and the per-user profile links.
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
    optionals
    types
    ;

  # Strings, never copied to the store even when set to a path literal.
  storeDir = toString cfg.storeDir;
  stateDir = toString cfg.stateDir;

  # Both packages built for the configured directories, as nixpkgs' module does with its Guix.
  forDirectories =
    p: if p ? override then p.override { inherit storeDir stateDir; } else p;
  guix = forDirectories cfg.package;
  daemon = forDirectories cfg.daemonPackage;
  isGuixsvc = p: p.isGuixsvc or false;

  guixStateDir = "${stateDir}/guix";
  perUserProfiles = "${guixStateDir}/profiles/per-user";

  guixsvc = "${daemon}/bin/guixsvc";

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

  # The build users as nixpkgs makes them: `guixbuilder0` to `guixbuilder<n-1>`, members of the
  # build group only.
  buildUsers = lib.listToAttrs (
    lib.genList (
      n:
      lib.nameValuePair "guixbuilder${toString n}" {
        isSystemUser = true;
        group = cfg.group;
        extraGroups = [ cfg.group ];
        description = "Guix build user ${toString n}";
        createHome = false;
      }
    ) cfg.nrBuildUsers
  );

  # What nixpkgs' module sets in the environment of guix-daemon and guix publish.
  serviceEnv = {
    GUIX_LOCPATH = "${perUserProfiles}/root/guix-profile/lib/locale";
    LC_ALL = "C.UTF-8";
  };

  # The daemon's command line: nixpkgs' (the build group always, the substitute URLs unless there
  # are none, so an empty list means the daemon's default), through systemd's own quoting.
  daemonArgs =
    optional cfg.privileged "--build-users-group=${cfg.group}"
    ++ optional (
      cfg.substituters.urls != [ ]
    ) "--substitute-urls=${concatStringsSep " " cfg.substituters.urls}"
    ++ cfg.extraArgs;

  # publish.extraArgs, read the way guix publish reads them: `--public-key`/`--private-key`
  # (`=FILE` or a separate word) become the files loaded as the service's credentials, and the
  # `--cache` directory must be writable in the service's read-only file system.
  publishArgs =
    let
      optionName =
        arg:
        {
          "--public-key" = "public";
          "--private-key" = "private";
          "--cache" = "cache";
          "-c" = "cache";
        }
        .${arg} or null;
      step =
        acc: arg:
        let
          matched = builtins.match "--(public-key|private-key|cache)=(.*)" arg;
          name = if matched == null then optionName arg else optionName "--${lib.head matched}";
          keep = acc // {
            args = acc.args ++ [ arg ];
          };
        in
        if acc.pending != null then
          (if acc.pending == "cache" then keep else acc)
          // {
            pending = null;
            ${acc.pending} = arg;
          }
        else if name == null then
          keep
        else if matched == null then
          (if name == "cache" then keep else acc) // { pending = name; }
        else
          (if name == "cache" then keep else acc) // { ${name} = lib.elemAt matched 1; };
    in
    lib.foldl' step {
      args = [ ];
      pending = null;
      public = null;
      private = null;
      cache = null;
    } cfg.publish.extraArgs;

  publishCache = publishArgs.cache;
  cacheUnderVarCache = publishCache != null && lib.hasPrefix "/var/cache/" publishCache;
  customKeys = publishArgs.public != null || publishArgs.private != null;

  # The packaged unit hands the key over as credentials (`%d` is their directory) to a server
  # with no privileges: no `--user`, the service's `User=` is `publish.user` instead.
  publishExtraArgs =
    map (c: "--compression=${c}") cfg.publish.compression ++ publishArgs.args;
  publishExecStart =
    execLine [
      guixsvc
      "publish"
      "--port=${toString cfg.publish.port}"
    ]
    + " --public-key=%d/signing-key.pub --private-key=%d/signing-key.sec"
    + lib.optionalString (publishExtraArgs != [ ]) (" " + execLine publishExtraArgs);

  # Where Guix puts a user's profiles, whatever `XDG_CONFIG_HOME` says: linked into the home at
  # activation, and what the environment points at (pam_env cannot expand `${X:-default}`, these
  # paths need no fallback).
  userProfile = name: "${perUserProfiles}/$USER/${name}";
  guixProfiles = [
    (userProfile "current-guix") # `guix pull`'s guix, first so it wins in PATH
    "$HOME/.guix-home/profile"
    "$HOME/.guix-profile"
  ];

  # /etc/guix/acl as a store file (mode 0600 like nixpkgs'): built once from the key files, so
  # /etc can be immutable.
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
        install -Dm0600 "$GUIX_CONFIGURATION_DIRECTORY/acl" "$out"
      '';
in
{
  # nixpkgs' own module declares the same options: this one replaces it.
  disabledModules = [ "services/misc/guix" ];

  imports = [
    # The name this module used before it followed nixpkgs: the Guix command line.
    (lib.mkRenamedOptionModule
      [
        "services"
        "guix"
        "clientPackage"
      ]
      [
        "services"
        "guix"
        "package"
      ]
    )
  ];

  meta.maintainers = [ ];

  options.services.guix = {
    enable = mkEnableOption "Guix build daemon service";

    package = lib.mkPackageOption pkgs "guix" {
      extraDescription = ''
        As in nixpkgs' module, this is GNU Guix itself: it is installed for the users (the
        {command}`guix` command, talking to this daemon) and its {file}`share/guix` holds the
        substitute servers' keys the default {option}`services.guix.substituters.authorizedKeys`
        names. Unlike nixpkgs' module, the services do not run its {command}`guix-daemon`,
        {command}`guix publish` or {command}`guix gc`: those come from
        {option}`services.guix.daemonPackage`. It is overridden with
        {option}`services.guix.storeDir` and {option}`services.guix.stateDir`.
      '';
    };

    daemonPackage = mkOption {
      type = types.package;
      default = pkgs.callPackage ./nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = ''
        The guixsvc package (not in nixpkgs' module): {command}`guix-daemon` and
        {command}`guixsvc` (publish, gc, archive) with their systemd units in
        {file}`lib/systemd/system`, run by the services and ahead of
        {option}`services.guix.package` in {env}`PATH` for {command}`guix-daemon`. It is
        overridden with {option}`services.guix.storeDir` and {option}`services.guix.stateDir`.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "guixbuild";
      example = "guixbuild";
      description = "The group of the Guix build user pool.";
    };

    privileged = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether guix-daemon runs as root with a pool of build users (true), or as the
        unprivileged {option}`services.guix.daemonUser`, building in user namespaces, without
        build users (false): Guix System's `privileged?` field of `guix-configuration`. The
        store and Guix's data directories change owner accordingly (the `guix-ownership` unit,
        as on Guix System); see the README's "Rootless mode".
      '';
    };

    daemonUser = mkOption {
      type = types.str;
      default = "guix-daemon";
      description = ''
        The user (and group) of the unprivileged daemon, owner of the store and the state
        directory when {option}`services.guix.privileged` is false.
      '';
    };

    nrBuildUsers = mkOption {
      type = types.ints.unsigned;
      default = 10;
      example = 20;
      description = ''
        Number of Guix build users to be used in the build pool: `guixbuilder0` to
        `guixbuilder<n-1>`, members of {option}`services.guix.group` only (add a build user to
        `kvm` yourself if builds need {file}`/dev/kvm`). With 0 the daemon cannot build.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--max-jobs=4"
        "--debug"
      ];
      description = ''
        Extra flags to pass to the Guix daemon service. A changed command line restarts the
        daemon on `nixos-rebuild switch` without stopping its socket: sessions and builds in
        progress go on.
      '';
    };

    storeDir = mkOption {
      type = types.path;
      default = "/gnu/store";
      description = ''
        The store directory where the Guix service will serve to/from. Substitutes only apply
        to the store directory they were built for, normally {file}`/gnu/store`: another one
        rebuilds everything.
      '';
    };

    stateDir = mkOption {
      type = types.path;
      default = "/var";
      example = "/gnu/var";
      description = ''
        The local state directory; the services keep their data (database, profiles, roots,
        the daemon socket) in its {file}`guix` subdirectory. Changing it rebuilds both packages.
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
          An empty list passes no `--substitute-urls`: the daemon's own default applies.
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
          {option}`services.guix.publish.extraArgs` (they are read by systemd as the service's
          credentials, so the unprivileged server needs no access to them), or the files put in
          {file}`/etc/guix` by other means.
        '';
      };

      port = mkOption {
        type = types.port;
        default = 8181;
        example = 8200;
        description = ''
          Port of the substitute server to listen on. systemd listens on it
          (`guix-publish.socket`, on all addresses) and starts the server at the first
          connection.
        '';
      };

      user = mkOption {
        type = types.str;
        default = "guix-publish";
        description = ''
          Name of the user the substitute server runs as. Unlike nixpkgs' module, it never runs
          as root: systemd starts it as this user (`User=`) and passes no `--user`.
        '';
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "--ttl=30d"
          "--cache=/var/cache/guix/publish"
        ];
        description = ''
          Extra flags to pass to the substitute server. A `--cache` directory under
          {file}`/var/cache` is created by systemd (`CacheDirectory=`); another one is made
          writable (`ReadWritePaths=`) and created for {option}`services.guix.publish.user`.
        '';
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Whether to open {option}`services.guix.publish.port` in the firewall (not in nixpkgs'
          module).
        '';
      };

      compression = mkOption {
        type = types.listOf (types.strMatching "(none|gzip|lzip|zstd)(:[0-9]+)?|[0-9]+");
        default = [ ];
        example = [
          "zstd:19"
          "gzip:9"
        ];
        description = ''
          The `--compression` methods (and levels) NARs are offered with, in order (not in
          nixpkgs' module; `--compression` in {option}`services.guix.publish.extraArgs` works
          too). Empty means guix publish's default (gzip, level 3).
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
          `RandomizedDelaySec=`), so that machines sharing a schedule do not collect at once
          (not in nixpkgs' module).
        '';
      };

      persistent = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Whether a collection missed while the machine was off runs at the next boot
          (`Persistent=` of {manpage}`systemd.timer(5)`; always on in nixpkgs' module).
        '';
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = isGuixsvc cfg.daemonPackage;
          message = ''
            services.guix.daemonPackage must be guixsvc (${cfg.daemonPackage.name or "?"} is not):
            the services run its guix-daemon, `guixsvc publish`, `guixsvc gc` and `guixsvc archive`
            and use its systemd units. GNU Guix itself goes to services.guix.package.
          '';
        }
        {
          assertion = !isGuixsvc cfg.package;
          message = ''
            services.guix.package is GNU Guix (as in nixpkgs' module): the `guix` command for the
            users and the substitute servers' keys in share/guix. guixsvc has no `guix` command;
            set it as services.guix.daemonPackage and leave services.guix.package to pkgs.guix.
          '';
        }
      ];

      # Both, ours first so that `guix-daemon` is this daemon, not the one Guix ships.
      environment.systemPackages = [
        (lib.hiPrio daemon)
        guix
      ];

      systemd.packages = [ daemon ];

      users.users =
        if cfg.privileged then
          buildUsers
        else
          {
            ${cfg.daemonUser} = {
              isSystemUser = true;
              group = cfg.daemonUser;
              description = "Guix build daemon";
              home = guixStateDir;
              createHome = false;
            };
          };
      users.groups = if cfg.privileged then { ${cfg.group} = { }; } else { ${cfg.daemonUser} = { }; };

      # Guix discovers and advertises substitute servers with Avahi; nixpkgs' module turns it on.
      services.avahi.enable = mkDefault true;
      services.avahi.publish.enable = mkDefault true;
      services.avahi.publish.userServices = mkDefault true;

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
            ${
              if cfg.privileged then
                "install -d -m 1775 -o root -g ${escapeShellArg cfg.group} ${escapeShellArg storeDir}"
              else
                "install -d -m 0755 -o ${escapeShellArg cfg.daemonUser} -g ${escapeShellArg cfg.daemonUser} ${escapeShellArg storeDir}"
            }
          elif ${if cfg.privileged then "true" else "false"} \
            && [ "$(stat -c %u ${escapeShellArg storeDir})" = 0 ] \
            && [ "$(stat -c '%a %U %G' ${escapeShellArg storeDir})" != ${escapeShellArg "1775 root ${cfg.group}"} ]; then
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

      # Read-only store everywhere but in the daemon's own mount namespace, from boot on (nixpkgs
      # mounts it with the daemon). The package ships the mount for its store directory; this (a
      # drop-in then) pulls it in and states it in full so it is right even for a store
      # directory the package has no unit for.
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
        # The proxy reaches the daemon's substitute downloads, as with nixpkgs' module.
        environment = serviceEnv // config.networking.proxy.envVars;
        serviceConfig.ExecStart = [
          ""
          (execLine ([ "${daemon}/bin/guix-daemon" ] ++ daemonArgs))
        ];
        # A changed daemon is restarted in place: the socket unit is neither stopped nor
        # restarted, so clients connecting during a `nixos-rebuild switch` wait in its backlog,
        # and KillMode=process (packaged) leaves the sessions and their builds running.
        stopIfChanged = false;
        requires = [ "guix-ownership.service" ];
        after = [ "guix-ownership.service" ];
      }
      // lib.optionalAttrs (!cfg.privileged) {
        # Rootless mode: what `guixsvc units --rootless` renders (units/guix-daemon.service.j2).
        serviceConfig = {
          # Guix System's run-with-writable-store: root for an instant, the store remounted
          # writable in the daemon's own mount namespace, then the daemon's user, no
          # capabilities left.
          ExecStart = [
            ""
            (execLine (
              [
                guixsvc
                "with-writable-store"
                cfg.daemonUser
                cfg.daemonUser
                "${daemon}/bin/guix-daemon"
              ]
              ++ daemonArgs
            ))
          ];
          CapabilityBoundingSet = "CAP_SYS_ADMIN CAP_SETUID CAP_SETGID";
          AmbientCapabilities = "";
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ReadWritePaths = [
            storeDir
            guixStateDir
            "${stateDir}/log/guix"
          ];
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          DevicePolicy = "closed";
          BindPaths = [
            "-/dev/net/tun"
            "-/dev/kvm"
          ];
          DeviceAllow = [
            "/dev/net/tun rw"
            "/dev/kvm rw"
          ];
          ProtectKernelModules = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          RestrictNamespaces = "user mnt pid net ipc uts";
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
          RemoveIPC = true;
          KeyringMode = "private";
          UMask = "0022";
          SystemCallFilter = "@system-service @mount chroot pivot_root sethostname setdomainname personality";
          SystemCallErrorNumber = "EPERM";
          SystemCallArchitectures = "native x86 x32";
        };
      };

      # Rootless: the configuration directory is the daemon user's (as on Guix System), so the
      # signing key pair is generated as that user.
      systemd.services.guix-publish-keygen = mkIf (!cfg.privileged) {
        serviceConfig.User = cfg.daemonUser;
        serviceConfig.Group = cfg.daemonUser;
      };

      # Guix System's `guix-ownership`: before the daemon starts, the store and Guix's data
      # change owner when the mode changed (root ↔ daemonUser); nothing happens otherwise.
      systemd.services.guix-ownership = {
        description = "Ownership of the Guix store for the ${
          if cfg.privileged then "privileged" else "unprivileged"
        } guix-daemon";
        before = [ "guix-daemon.service" ];
        unitConfig.RequiresMountsFor = [
          storeDir
          guixStateDir
        ];
        environment = {
          NIX_STORE_DIR = storeDir;
          GUIX_STATE_DIRECTORY = guixStateDir;
          GUIX_LOG_DIRECTORY = "${stateDir}/log/guix";
          GUIX_CONFIGURATION_DIRECTORY = "/etc/guix";
        };
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script =
          if cfg.privileged then
            ''
              if [ "$(stat -c %u ${escapeShellArg storeDir})" != 0 ]; then
                exec ${guixsvc} migrate-store --to-root
              fi
            ''
          else
            ''
              if [ "$(stat -c %U ${escapeShellArg storeDir})" != ${escapeShellArg cfg.daemonUser} ]; then
                exec ${guixsvc} migrate-store --to-user=${escapeShellArg cfg.daemonUser}
              fi
            '';
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
        environment = serviceEnv;
        # A static user of that name is used by DynamicUser= when it exists (the default one is
        # created below, as the nixpkgs module does); otherwise systemd allocates it.
        serviceConfig = mkMerge [
          { User = cfg.publish.user; }
          (mkIf (publishExtraArgs != [ ] || customKeys) {
            ExecStart = [
              ""
              publishExecStart
            ];
          })
          # Key files named in extraArgs replace the packaged /etc/guix ones as credentials.
          (mkIf customKeys {
            LoadCredential = [
              ""
              "signing-key.pub:${
                if publishArgs.public != null then publishArgs.public else "/etc/guix/signing-key.pub"
              }"
              "signing-key.sec:${
                if publishArgs.private != null then publishArgs.private else "/etc/guix/signing-key.sec"
              }"
            ];
          })
          (mkIf cacheUnderVarCache {
            CacheDirectory = [ (lib.removePrefix "/var/cache/" publishCache) ];
          })
          (mkIf (publishCache != null && !cacheUnderVarCache) {
            ReadWritePaths = [ publishCache ];
          })
        ];
        stopIfChanged = false;
      };

      systemd.tmpfiles.rules = optionals (publishCache != null && !cacheUnderVarCache) [
        "d ${publishCache} 0750 ${cfg.publish.user} - - -"
      ];

      networking.firewall.allowedTCPPorts = mkIf cfg.publish.openFirewall [ cfg.publish.port ];

      users.users = mkIf (cfg.publish.user == "guix-publish") {
        guix-publish = {
          description = "Guix publish user";
          group = "guix-publish";
          isSystemUser = true;
        };
      };
      users.groups.guix-publish = { };
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
