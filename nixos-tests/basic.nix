# One machine: socket activation, store RPCs, a sandboxed build as a build user, a daemon restart
# under a live session (scenario daemon_socket), then what only NixOS has: the build-user pool and
# the ACL from the module, the Guix command line, the gc service, and a real
# `switch-to-configuration` restarting the daemon for a new flag without ever closing its socket,
# while an idle session and a build in progress go on (scenario daemon_switch).
{ hostPkgs, ... }:

let
  scenarios = import ./scenarios.nix hostPkgs;
  busybox = "${hostPkgs.pkgsStatic.busybox}/bin/busybox";
in
{
  name = "guixsvc-basic";
  # `run_scenario` comes from driver_glue.py through exec, which the linter cannot follow.
  skipLint = true;
  skipTypeCheck = true;

  nodes.machine = {
    imports = [ ./common.nix ];
    services.guix.nrBuildUsers = 4;
    services.guix.gc.enable = true;
    # Publish with the default generateKeyPair: the key appears on the first request.
    services.guix.publish.enable = true;
    # Another daemon command line: switching to it must restart the daemon, not its socket.
    specialisation.changed.configuration.services.guix.extraArgs = [ "--max-jobs=2" ];
  };

  testScript = ''
    exec(open("${./driver_glue.py}").read())
    import json

    start_all()
    machine.wait_for_unit("sockets.target")

    run_scenario("${scenarios}", "daemon_socket", machine, busybox="${busybox}")

    with subtest("build users and groups, as nixpkgs' module makes them"):
        members = machine.succeed("getent group guixbuild").strip().split(":")[3].split(",")
        assert sorted(members) == [f"guixbuilder{n}" for n in range(4)], members
        assert machine.succeed("id -nG guixbuilder0").split() == ["guixbuild"]
        assert machine.succeed("stat -c '%a %U %G' /gnu/store").strip() == "1775 root guixbuild"

    with subtest("the Guix command line (services.guix.package) and our guix-daemon"):
        machine.succeed("guix --version")
        daemon = machine.succeed("readlink -f $(command -v guix-daemon)").strip()
        assert daemon == machine.succeed("readlink -f $(dirname $(readlink -f $(command -v guixsvc)))/guix-daemon").strip(), daemon

    with subtest("ACL from the module's authorizedKeys (the keys the Guix package ships)"):
        machine.succeed("test -L /etc/guix/acl")
        result = json.loads(machine.succeed(
            "python3 -c 'import json, os, shutil; "
            "from guixsvc.pki.keys import Acl, load_public_key; "
            "share = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which(\"guix\")))) + \"/share/guix\"; "
            "acl = Acl.load(\"/etc/guix/acl\"); "
            "print(json.dumps([len(acl)] + [acl.authorizes(load_public_key(share + \"/\" + k)) "
            "for k in (\"ci.guix.gnu.org.pub\", \"bordeaux.guix.gnu.org.pub\", \"berlin.guix.gnu.org.pub\")]))'"
        ))
        # ci and berlin are the same key.
        assert result == [2, True, True, True], result

    with subtest("publish: socket activation and a generated key"):
        machine.fail("test -e /etc/guix/signing-key.sec")
        machine.wait_for_open_port(8181)
        machine.succeed("python3 -c 'import urllib.request; urllib.request.urlopen(\"http://127.0.0.1:8181/nix-cache-info\").read()'")
        machine.wait_for_unit("guix-publish.service")
        machine.succeed("test -s /etc/guix/signing-key.sec && test -s /etc/guix/signing-key.pub")
        user = machine.succeed("ps -o user= -p $(systemctl show -P MainPID guix-publish.service)").strip()
        assert user == "guix-publish", user

    with subtest("gc service"):
        if machine.execute("guixsvc gc --help")[0] != 0:
            print("gc service skipped: `guixsvc gc` does not exist yet")
        else:
            machine.succeed("systemctl start guix-gc.service")
            assert machine.succeed("systemctl show -P Result guix-gc.service").strip() == "success"
        machine.succeed("systemctl is-enabled guix-gc.timer || systemctl list-timers | grep guix-gc")

    # A real `switch-to-configuration` to the specialisation with another daemon flag: the
    # shared scenario checks the socket, an idle session, a running build and the new flag.
    run_scenario(
        "${scenarios}",
        "daemon_switch",
        machine,
        switch=lambda: machine.succeed("/run/booted-system/specialisation/changed/bin/switch-to-configuration test"),
        flag="--max-jobs=2",
        busybox="${busybox}",
    )
    machine.succeed("systemctl cat guix-daemon.service | grep -q -- --max-jobs=2")
  '';
}
