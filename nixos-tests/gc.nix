# guix-gc.timer on a short calendar: the service runs by itself, dead items go, rooted ones stay.
# Then the shared scenario gc_timer.
{ hostPkgs, ... }:

let
  scenarios = import ./scenarios.nix hostPkgs;
in
{
  name = "guixsvc-gc";
  skipLint = true;
  skipTypeCheck = true;

  nodes.machine = {
    imports = [ ./common.nix ];
    services.guix.gc = {
      enable = true;
      dates = "*:*:0/15";
    };
    # The packaged timer allows an hour of slack; the test cannot wait that long.
    systemd.timers.guix-gc.timerConfig.AccuracySec = "1s";
  };

  testScript = ''
    exec(open("${./driver_glue.py}").read())
    import json, shlex

    start_all()
    machine.wait_for_unit("timers.target")
    machine.succeed("systemctl is-active guix-gc.timer")
    assert "*:*:0/15" in machine.succeed("systemctl cat guix-gc.timer")

    with subtest("the timer collects dead items and keeps rooted ones"):
        if machine.execute("guixsvc gc --help")[0] != 0:
            print("skipped: `guixsvc gc` does not exist yet")
        else:
            code = """
    import json
    from guixsvc.protocol.client import DaemonClient
    c = DaemonClient()
    print(json.dumps([c.add_text_to_store("nixos-dead", "dead\\n"),
                      c.add_text_to_store("nixos-live", "live\\n")]))
    """
            dead, live = json.loads(machine.succeed("python3 -c " + shlex.quote(code)).strip().splitlines()[-1])
            machine.succeed("ln -sfn %s /var/guix/gcroots/nixos-live" % live)
            runs = machine.succeed("systemctl show -P InvocationID guix-gc.service").strip()
            machine.wait_until_succeeds(
                "test \"$(systemctl show -P InvocationID guix-gc.service)\" != %s"
                " && systemctl show -P Result guix-gc.service | grep -qx success"
                " && ! systemctl is-active -q guix-gc.service" % shlex.quote(runs),
                timeout=120,
            )
            machine.wait_until_succeeds("test ! -e " + dead, timeout=60)
            machine.succeed("test -e " + live)

    run_scenario("${scenarios}", "gc_timer", machine)
  '';
}
