# The basic scenario with the rootless daemon (services.guix.privileged = false, Guix System's
# `privileged? #f`): socket activation, store RPCs and a sandboxed build in user namespaces
# (scenario daemon_socket), the daemon running as guix-daemon without capabilities, the store
# handed over by guix-ownership, then given back to root by switching to a privileged daemon.
{ hostPkgs, ... }:

let
  scenarios = import ./scenarios.nix hostPkgs;
  busybox = "${hostPkgs.pkgsStatic.busybox}/bin/busybox";
in
{
  name = "guixsvc-rootless";
  skipLint = true;
  skipTypeCheck = true;

  nodes.machine = {
    imports = [ ./common.nix ];
    services.guix.privileged = false;
    specialisation.privileged.configuration.services.guix.privileged = true;
  };

  testScript = ''
    exec(open("${./driver_glue.py}").read())

    start_all()
    machine.wait_for_unit("sockets.target")

    run_scenario("${scenarios}", "daemon_socket", machine, busybox="${busybox}", rootless=True)

    with subtest("the daemon runs as guix-daemon, without capabilities, owning the store"):
        pid = machine.succeed("systemctl show -P MainPID guix-daemon.service").strip()
        assert machine.succeed(f"ps -o user= -p {pid}").strip() == "guix-daemon"
        assert machine.succeed(f"grep CapEff /proc/{pid}/status").split()[1] == "0000000000000000"
        assert machine.succeed("stat -c %U /gnu/store").strip() == "guix-daemon"
        machine.fail("getent group guixbuild")
        # Read-only for everybody else, root included.
        machine.fail("touch /gnu/store/evil")
        print(machine.succeed("systemd-analyze security guix-daemon.service | tail -1"))

    with subtest("back to the privileged daemon: the store is given back to root"):
        machine.succeed("/run/booted-system/specialisation/privileged/bin/switch-to-configuration test")
        machine.succeed("systemctl stop guix-daemon.service && systemctl restart guix-ownership.service")
        assert machine.succeed("stat -c %U /gnu/store").strip() == "root"
        machine.succeed(
            "python3 -c 'from guixsvc.protocol.client import DaemonClient; c = DaemonClient(); "
            "assert c.is_valid_path(c.add_text_to_store(\"back-to-root\", \"x\"))'"
        )
        pid = machine.succeed("systemctl show -P MainPID guix-daemon.service").strip()
        assert machine.succeed(f"ps -o user= -p {pid}").strip() == "root"
  '';
}
