"""Scenario 2: socket-activated guix publish, locked down, and substitutes between two machines.

* After boot guix-publish is not running; the first HTTP request (from the other machine, over
  the private network) starts it, and its signing key pair was generated on that first start.
* guix-publish runs as an unprivileged user with no capabilities, no new privileges and a
  system-call filter; in its namespaces and with its user and group it cannot read /etc/shadow,
  cannot write the file system outside its own directories, and cannot open a TCP connection out
  (its network namespace has no route anywhere).
* `client` fetches the signed narinfo of the closure's top but, not trusting the server's key
  yet, refuses its substitutes; once the key is
  authorised (`guix archive --authorize`, skipped when the ACL already holds it, as on NixOS where
  /etc/guix/acl is read-only) it substitutes a closure of three items (a directory with an
  executable, a symlink and 1 MiB of incompressible data, and two text items referring to it)
  from `server`, with the same NAR hashes and references as on the server.

The machines are named `server` and `client`, and reach each other under those names.
"""

from __future__ import annotations

import errno
import json
import shlex
from typing import Any

from tests.e2e.scenarios._lib import (
    CLIENT_PRELUDE,
    ScenarioSkipped,
    has_subcommand,
    is_active,
    py,
    unit_property,
)

PORT = 8181
URL = f"http://server:{PORT}"
CONF_DIR = "/etc/guix"

# On the server: a closure of three store items, rooted (while this session's temporary roots
# still hold them) so that no collection takes them away meanwhile.
MAKE_CLOSURE = (
    CLIENT_PRELUDE
    + r"""
import os, shutil, tempfile
c = DaemonClient()
tree = tempfile.mkdtemp()
os.makedirs(tree + "/bin")
os.makedirs(tree + "/share/doc")
with open(tree + "/bin/tool", "wb") as f:
    f.write(b"#!/bin/sh\necho tool\n" + os.urandom(1 << 20))
os.chmod(tree + "/bin/tool", 0o755)
with open(tree + "/share/doc/README", "w") as f:
    f.write("read me\n" * 4096)
os.symlink("../../bin/tool", tree + "/share/doc/tool")
data = c.add_to_store("e2e-publish-data", tree, recursive=True)
shutil.rmtree(tree)
mid = c.add_text_to_store("e2e-publish-mid", "uses " + data + "\n", [data])
top = c.add_text_to_store("e2e-publish-top", "uses " + mid + "\n", [mid])
os.makedirs("/var/guix/gcroots", exist_ok=True)
if os.path.lexists("/var/guix/gcroots/e2e-publish"):
    os.unlink("/var/guix/gcroots/e2e-publish")
os.symlink(top, "/var/guix/gcroots/e2e-publish")
report(paths=[data, mid, top])
"""
)

# What a machine's daemon knows about some paths: {path: [nar hash, sorted references]}.
PATH_INFO = (
    CLIENT_PRELUDE
    + r"""
c = DaemonClient()
infos = {}
for p in c.query_valid_paths(sys.argv[1:]):
    info = c.query_path_info(p)
    infos[p] = [info.nar_hash, sorted(info.references)]
report(infos=infos)
"""
)

# On the client: substitute a path from URL (argv[1]) in this session, then report validity.
SUBSTITUTE = (
    CLIENT_PRELUDE
    + r"""
c = DaemonClient()
c.set_options(overrides=[("substitute-urls", sys.argv[1])])
try:
    c.ensure_path(sys.argv[2])
    error = None
except DaemonError as exc:
    error = exc.message
report(error=error, valid=c.query_valid_paths(sys.argv[3:]))
"""
)

# Whether the ACL of this machine holds the key in argv[1].
KEY_AUTHORIZED = r"""
import json, os, sys
from guixsvc.pki.keys import Acl, Key
acl = Acl.load("/etc/guix/acl") if os.path.exists("/etc/guix/acl") else Acl()
print(json.dumps(acl.authorizes(Key.parse(sys.argv[1]))))
"""

# Run inside guix-publish's namespaces as its user: what it may do.  Prints errno names.
PROBE = r"""
import errno, json, socket, sys
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def shadow():
    open("/etc/shadow", "rb").close()
def connect():
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()
print(json.dumps({"shadow": attempt(shadow), "connect": attempt(connect)}))
"""


def _status_fields(machine: Any, pid: str) -> dict[str, str]:
    fields = {}
    for line in machine.succeed(f"cat /proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _check_lockdown(server: Any, python: str) -> None:
    pid = unit_property(server, "guix-publish.service", "MainPID")
    assert pid not in ("", "0"), "guix-publish has no main process"
    status = _status_fields(server, pid)
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    assert uid != "0" and gid != "0", f"guix-publish runs as uid {uid} gid {gid}"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    assert status["NoNewPrivs"] == "1", status
    assert status["Seccomp"] == "2", f"no system-call filter: Seccomp {status['Seccomp']}"
    families = unit_property(server, "guix-publish.service", "RestrictAddressFamilies")
    assert families == "AF_UNIX", f"RestrictAddressFamilies={families}"
    # The server's own address works from the machine (the control) ...
    address = server.succeed("getent ahostsv4 server | head -n 1").split()[0]
    server.wait_for_open_port(PORT, addr=address, timeout=30)
    # ... but not from guix-publish's network namespace, as its user.
    enter = f"nsenter --target={pid} --mount --net --setuid={uid} --setgid={gid}"
    probe = json.loads(
        server.succeed(f"{enter} {python} -c {shlex.quote(PROBE)} {address} {PORT}").strip()
    )
    assert probe["shadow"] == errno.errorcode[errno.EACCES], f"/etc/shadow: {probe}"
    assert probe["connect"] in (
        errno.errorcode[errno.ENETUNREACH],
        errno.errorcode[errno.EHOSTUNREACH],
    ), f"TCP connection out of guix-publish's namespace: {probe}"
    # ProtectSystem=strict: even root cannot write /etc or /var in its mount namespace.
    for directory in ("/etc", "/var/lib", CONF_DIR):
        status_code, _ = server.execute(
            f"nsenter --target={pid} --mount touch {directory}/e2e-publish-probe"
        )
        assert status_code != 0, f"{directory} is writable in guix-publish's mount namespace"


def _substitute(client: Any, paths: list[str], python: str) -> dict[str, Any]:
    args = " ".join(shlex.quote(a) for a in [URL, paths[-1], *paths])
    out = client.succeed(f"{python} -c {shlex.quote(SUBSTITUTE)} {args}")
    return json.loads(out.strip().splitlines()[-1])


def run(server: Any, client: Any, *, python: str = "python3") -> list[str]:
    """Returns the steps that were skipped (with reasons); raises on failures."""
    for name, machine in (("server", server), ("client", client)):
        if not has_subcommand(machine, "publish"):
            raise ScenarioSkipped(f"`guixsvc publish` is not installed on {name}")
    skipped: list[str] = []
    server.wait_for_unit("guix-publish.socket")
    server.wait_for_unit("guix-daemon.socket")
    client.wait_for_unit("guix-daemon.socket")

    already_running = is_active(server, "guix-publish.service")
    key_existed = server.execute(f"test -e {CONF_DIR}/signing-key.sec")[0] == 0
    paths = py(server, MAKE_CLOSURE, python=python)["paths"]

    # The first request, from the other machine, starts guix-publish.
    if already_running:
        skipped.append("socket activation: guix-publish was already running")
    else:
        assert not is_active(server, "guix-publish.service"), "guix-publish started at boot"
    fetch = (
        f"{python} -c 'import urllib.request; "
        f'print(urllib.request.urlopen("{URL}/nix-cache-info", timeout=10).read().decode())\''
    )
    cache_info = client.wait_until_succeeds(fetch, timeout=60)
    assert "StoreDir: /gnu/store" in cache_info, cache_info
    server.wait_for_unit("guix-publish.service")

    # The key pair exists now; generated on this first start unless it was there before.
    server.succeed(f"test -s {CONF_DIR}/signing-key.pub", f"test -s {CONF_DIR}/signing-key.sec")
    sec_mode = server.succeed(f"stat -L -c '%a %U' {CONF_DIR}/signing-key.sec").split()
    assert sec_mode[1] == "root" and sec_mode[0] in ("400", "600"), f"secret key {sec_mode}"
    if key_existed:
        skipped.append("key generation: the machine came with a key pair")
    else:
        server.succeed("journalctl --no-pager -u guix-publish-keygen.service | grep -q generated")

    _check_lockdown(server, python)

    # The client reaches the signed narinfo, so a refusal below is about trust, not reach.
    hash_part = paths[-1].removeprefix("/gnu/store/").split("-", 1)[0]
    narinfo = client.succeed(fetch.replace("/nix-cache-info", f"/{hash_part}.narinfo"))
    assert f"StorePath: {paths[-1]}\n" in narinfo and "\nSignature: 1;" in narinfo, narinfo

    public_key = server.succeed(f"cat {CONF_DIR}/signing-key.pub")
    quoted_key = shlex.quote(public_key)
    trusted = json.loads(
        client.succeed(f"{python} -c {shlex.quote(KEY_AUTHORIZED)} {quoted_key}").strip()
    )
    if trusted:
        skipped.append("refusal of an unknown key: the client's ACL already holds the key")
    else:
        refused = _substitute(client, paths, python)
        assert refused["error"] is not None and refused["valid"] == [], (
            f"substituted from an untrusted server: {refused}"
        )
        client.succeed(f"printf %s {quoted_key} | guixsvc archive --authorize")
        assert json.loads(
            client.succeed(f"{python} -c {shlex.quote(KEY_AUTHORIZED)} {quoted_key}").strip()
        ), "guix archive --authorize did not add the key"

    result = _substitute(client, paths, python)
    assert result["error"] is None, f"substitution failed: {result['error']}"
    assert sorted(result["valid"]) == sorted(paths), result
    quoted_paths = " ".join(shlex.quote(p) for p in paths)
    info_cmd = f"{python} -c {shlex.quote(PATH_INFO)} {quoted_paths}"
    theirs = json.loads(client.succeed(info_cmd).strip().splitlines()[-1])["infos"]
    ours = json.loads(server.succeed(info_cmd).strip().splitlines()[-1])["infos"]
    assert theirs == ours, f"client {theirs} != server {ours}"
    data = paths[0]
    for machine in (server, client):
        machine.succeed(
            f"test -x {data}/bin/tool",
            f'test "$(readlink {data}/share/doc/tool)" = ../../bin/tool',
        )
    listing = f"cd {data} && find . -printf '%p %y %m\\n' | sort && sha256sum bin/tool"
    assert client.succeed(listing) == server.succeed(listing)
    assert client.succeed(f"cat {paths[-1]}") == f"uses {paths[1]}\n"
    # The server's publish process served them; nothing else got started on the client.
    assert is_active(server, "guix-publish.service")
    return skipped
