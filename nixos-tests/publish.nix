# Three machines: `server` publishes its store, signing with key files named in
# services.guix.publish.extraArgs (generateKeyPair = false); `client` authorises that key through
# services.guix.substituters.authorizedKeys and really substitutes a closure from it; `stranger`
# trusts another key only and must refuse the same substitutes.  Also the shared scenario
# publish_substitute.
{ hostPkgs, ... }:

let
  scenarios = import ./scenarios.nix hostPkgs;
  guixsvc = hostPkgs.callPackage ../nix/package.nix { };
  # Key pairs made at build time, so the client's ACL can name the server's key.
  keyPair =
    name:
    hostPkgs.runCommand "guixsvc-test-key-${name}" { } ''
      mkdir -p $out
      GUIX_CONFIGURATION_DIRECTORY=$out ${guixsvc}/bin/guixsvc archive --generate-key
    '';
  serverKey = keyPair "server";
  otherKey = keyPair "other";
  substituter = {
    imports = [ ./common.nix ];
    services.guix.substituters.urls = [ "http://server:8181" ];
  };
in
{
  name = "guixsvc-publish";
  skipLint = true;
  skipTypeCheck = true;

  nodes.server = {
    imports = [ ./common.nix ];
    services.guix.publish = {
      enable = true;
      openFirewall = true;
      compression = [
        "zstd:3"
        "gzip:3"
      ];
    };
    # Key files of its own instead of /etc/guix (which stays without keys), as nixpkgs'
    # generateKeyPair documents: systemd hands them to the unprivileged server.
    services.guix.publish.generateKeyPair = false;
    services.guix.publish.extraArgs = [
      "--public-key=${serverKey}/signing-key.pub"
      "--private-key=${serverKey}/signing-key.sec"
    ];
  };

  nodes.client = {
    imports = [ substituter ];
    services.guix.substituters.authorizedKeys = [ "${serverKey}/signing-key.pub" ];
  };

  nodes.stranger = {
    imports = [ substituter ];
    services.guix.substituters.authorizedKeys = [ "${otherKey}/signing-key.pub" ];
  };

  testScript = ''
    exec(open("${./driver_glue.py}").read())
    import json, shlex

    start_all()
    server.wait_for_unit("guix-publish.socket")
    server.wait_for_open_port(8181)
    client.wait_for_unit("sockets.target")
    stranger.wait_for_unit("sockets.target")

    def py(machine, code, *args):
        out = machine.succeed(" ".join(["python3", "-c", shlex.quote(code), *map(shlex.quote, args)]))
        return json.loads(out.strip().splitlines()[-1])

    with subtest("the server publishes a closure of three items"):
        items = py(server, """
    import json
    from guixsvc.protocol.client import DaemonClient
    c = DaemonClient()
    a = c.add_text_to_store("nixos-a", "a\\n")
    b = c.add_text_to_store("nixos-b", "b refers to " + a + "\\n", [a])
    top = c.add_text_to_store("nixos-c", "c refers to " + b + "\\n", [b])
    print(json.dumps([a, b, top]))
    """)
        server.succeed("ln -sfn %s /var/guix/gcroots/nixos-test" % items[2])
        # The first request starts guix-publish, as its own unprivileged user.
        client.wait_until_succeeds("python3 -c 'import urllib.request; urllib.request.urlopen(\"http://server:8181/nix-cache-info\").read()'", timeout=60)
        server.wait_for_unit("guix-publish.service")
        user = server.succeed("ps -o user= -p $(systemctl show -P MainPID guix-publish.service)").strip()
        assert user == "guix-publish", user
        server.fail("test -e /etc/guix/signing-key.sec")
        # Narinfos are signed with the configured key.
        narinfo = client.succeed("python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://server:8181/%s.narinfo\").read().decode())'" % items[2].split("/")[-1].split("-")[0])
        assert "Signature: 1;" in narinfo, narinfo

    substitute = """
    import json, sys
    from guixsvc.protocol.client import DaemonClient
    c = DaemonClient()
    try:
        c.ensure_path(sys.argv[1])
        error = None
    except Exception as exc:
        error = str(exc)
    print(json.dumps({"error": error, "valid": c.query_valid_paths(sys.argv[2:])}))
    """

    with subtest("the client substitutes the closure"):
        result = py(client, substitute, items[2], *items)
        assert result["error"] is None and sorted(result["valid"]) == sorted(items), result
        for path in items:
            assert client.succeed("cat " + path) == server.succeed("cat " + path)

    with subtest("a machine that does not trust the key refuses"):
        result = py(stranger, substitute, items[2], *items)
        assert result["error"] is not None and result["valid"] == [], result

    run_scenario("${scenarios}", "publish_substitute", server, client)
  '';
}
