# One machine: socket activation, store RPCs, a sandboxed build as a build user, a daemon restart
# under a live session (scenario daemon_socket), then what only NixOS has: the build-user pool and
# the ACL from the module, the Guix command line, the gc service, and `switch-to-configuration`
# restarting the daemon for a new flag without ever closing its socket, while an idle session
# and a build in progress go on.
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

    with subtest("switch-to-configuration keeps the daemon socket, sessions and builds"):
        import shlex, sys
        if "${scenarios}" not in sys.path:
            sys.path.insert(0, "${scenarios}")
        from tests.e2e.scenarios.daemon_socket import BUILD, IDLE_CLIENT
        machine.succeed("python3 -c 'from guixsvc.protocol.client import DaemonClient; DaemonClient().is_valid_path(\"/gnu/store/x\")' || true")
        machine.wait_for_unit("guix-daemon.service")
        # An idle session, used again after the switch.
        machine.succeed("rm -rf /run/switch-idle && mkdir -p /run/switch-idle")
        machine.succeed("python3 -c " + shlex.quote(IDLE_CLIENT) + " /run/switch-idle > /run/switch-idle/log 2>&1 < /dev/null &")
        machine.wait_for_file("/run/switch-idle/ready", timeout=60)
        # A build that is still running when the daemon restarts.
        slow_build = BUILD.replace("echo built > $out;", "$busybox sleep 20; echo built > $out;", 1)
        assert slow_build != BUILD
        machine.succeed("python3 -c " + shlex.quote(slow_build) + " ${busybox} > /run/switch-build 2>&1 < /dev/null &")
        # The builder's `busybox sleep` (only its command line has the expanded file name).
        building = machine.execute("timeout 60 sh -c 'until pgrep -f \"[b]in/busybox sleep 20\" >/dev/null; do sleep 0.2; done'")[0] == 0
        socket_since = machine.succeed("systemctl show -P ActiveEnterTimestampMonotonic guix-daemon.socket")
        daemon_pid = machine.succeed("systemctl show -P MainPID guix-daemon.service").strip()
        # Clients connect every 50 ms during the switch; not one may be refused.
        machine.succeed(
            "python3 -c 'import time, json\n"
            "from guixsvc.protocol.client import DaemonClient\n"
            "ok = err = 0\n"
            "end = time.time() + 30\n"
            "import os\n"
            "while time.time() < end and not os.path.exists(\"/run/switch-done\"):\n"
            "    try:\n"
            "        c = DaemonClient(); c.add_text_to_store(\"switch-probe\", \"x\"); c.close(); ok += 1\n"
            "    except Exception as e:\n"
            "        err += 1; print(repr(e))\n"
            "    time.sleep(0.05)\n"
            "print(json.dumps({\"ok\": ok, \"err\": err}))' > /run/switch-probe 2>&1 &"
        )
        machine.succeed("sleep 1")
        machine.succeed("/run/booted-system/specialisation/changed/bin/switch-to-configuration test")
        machine.succeed("sleep 1; touch /run/switch-done")
        machine.wait_until_succeeds("grep -q '\"ok\"' /run/switch-probe", timeout=60)
        probe = json.loads(machine.succeed("tail -n 1 /run/switch-probe"))
        assert probe["err"] == 0 and probe["ok"] > 0, machine.succeed("cat /run/switch-probe")
        assert machine.succeed("systemctl show -P ActiveEnterTimestampMonotonic guix-daemon.socket") == socket_since
        machine.succeed("systemctl cat guix-daemon.service | grep -q -- --max-jobs=2")
        machine.wait_for_unit("guix-daemon.service")
        new_pid = machine.succeed("systemctl show -P MainPID guix-daemon.service").strip()
        assert new_pid != daemon_pid
        # The new flag is in effect: the running daemon has it.
        machine.succeed(f"tr '\\0' ' ' < /proc/{new_pid}/cmdline | grep -q -- --max-jobs=2")
        # The idle session still works.
        machine.succeed("touch /run/switch-idle/go")
        machine.wait_for_file("/run/switch-idle/result", timeout=60)
        idle = json.loads(machine.succeed("cat /run/switch-idle/result"))
        assert idle.get("before_valid") and idle.get("after_valid"), (idle, machine.succeed("cat /run/switch-idle/log"))
        # The build went on and finished.
        machine.wait_until_succeeds("grep -q '\"ok\"' /run/switch-build", timeout=180)
        build = json.loads(machine.succeed("tail -n 1 /run/switch-build"))
        if not build["ok"] and "not implemented yet" in build.get("error", ""):
            print("build across the switch skipped: " + build["error"])
        else:
            assert building, "the slow build never started"
            assert build["ok"] and build["content"].startswith("built"), build
  '';
}
