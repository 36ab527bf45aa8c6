"""Build machines for the offload tests: real OpenSSH servers in front of real daemons.

Every "machine" is a daemon (ours) with its own store backing directory bind-mounted over the
shared store path in a private mount namespace (outputs are only valid across stores with the
same store directory), plus Debian's sshd started in a mount namespace of the same shape, where
`/proc/loadavg` can be replaced by a file so each machine reports the load a test wants.  Each
sshd listens on its own loopback address and port with its own host key; the client key and
the machines' signing keys are authorised both ways as upstream's manual asks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guixsvc.pki import keys
from guixsvc.protocol.client import DaemonClient
from guixsvc.protocol.ops import Op
from guixsvc.protocol.wire import encode_int, encode_pairs
from tests.build.conftest import BUSYBOX, Builds, _is_static, add_busybox
from tests.substitutes.helpers import (
    Node,
    free_port,
    need_unshare,
    start_node,
    stop_node,
    stop_proc,
)

SSHD = "/usr/sbin/sshd"


def need_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("offload tests need root (sshd, mount namespaces)")
    need_unshare()
    if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("needs OpenSSH (Debian packages openssh-server, openssh-client)")
    if not os.path.exists(BUSYBOX) or not _is_static(BUSYBOX):
        pytest.skip("needs a static /bin/busybox (Debian package busybox-static)")


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True
    )
    return Path(str(path) + ".pub").read_text().strip()


@dataclass
class Machine:
    name: str  # the loopback address sshd listens on
    port: int
    node: Node
    host_key: str
    loadavg: Path
    sshd: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def set_load(self, one_minute: float) -> None:
        self.loadavg.write_text(f"{one_minute:.2f} 0.00 0.00 1/100 1\n")

    def client(self) -> DaemonClient:
        return self.node.client()

    def kill(self) -> None:
        """The machine dies: every process in its mount namespaces is killed."""
        namespaces = set()
        for proc in self.node.procs:
            with contextlib.suppress(OSError):
                namespaces.add(os.readlink(f"/proc/{proc.pid}/ns/mnt"))
        mine = os.readlink("/proc/self/ns/mnt")
        namespaces.discard(mine)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/mnt") in namespaces:
                    os.kill(int(pid), signal.SIGKILL)
        for proc in self.node.procs:
            with contextlib.suppress(Exception):
                proc.wait(5)

    def kill_daemon(self) -> None:
        """The machine's daemon dies with its workers and builders (sshd stays up)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(
                        int(entry)
                    )
        todo = [self.node.procs[0].pid]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.node.procs[0].wait(5)

    def scm(self, **fields: str) -> str:
        values = {
            "name": f'"{self.name}"',
            "port": str(self.port),
            "systems": '(list "x86_64-linux")',
            "user": '"root"',
            "host-key": f'"{self.host_key}"',
            "daemon-socket": f'"{self.node.socket}"',
            **self.extra,
            **fields,
        }
        body = "\n".join(f"   ({k} {v})" for k, v in values.items())
        return f"  (build-machine\n{body})"


@dataclass
class Cluster:
    base: Path
    shared: Path
    local: Node
    machines: list[Machine]
    client_key: Path
    builds: Builds | None = None
    logs: list[str] = field(default_factory=list)

    def write_machines(self, *entries: str) -> None:
        text = "(list\n" + "\n".join(entries) + ")\n"
        (self.local.conf / "machines.scm").write_text(text)

    def machine_entry(self, m: Machine, **fields: str) -> str:
        return m.scm(**{"private-key": f'"{self.client_key}"', **fields})

    def connect(self, *, use_build_hook: bool = True, keep_going: bool = False) -> Builds:
        """A client of the local daemon (build log collected in `logs`)."""
        self.logs.clear()
        client = DaemonClient(self.local.socket, log=self.logs.append)
        set_options(client, use_build_hook=use_build_hook, keep_going=keep_going)
        fake = types.SimpleNamespace(store_dir=str(self.shared))
        busybox = self.builds.busybox if self.builds else add_busybox(client, self.base / "w")
        self.builds = Builds(fake, client, busybox, self.logs)  # type: ignore[arg-type]
        return self.builds

    def offloaded_to(self, drv: str) -> list[str]:
        text = "".join(self.logs)
        return [m.name for m in self.machines if f"offloading '{drv}' to '{m.name}'" in text]


def set_options(
    client: DaemonClient, *, use_build_hook: bool, keep_going: bool = False, verbosity: int = 1
) -> None:
    """SetOptions as the Guile client sends it (our DaemonClient always turns the hook off)."""
    fields = [
        encode_int(0), encode_int(keep_going), encode_int(0), encode_int(verbosity),
        encode_int(use_build_hook), encode_int(0), encode_int(0), encode_int(1),
        encode_int(0), encode_pairs([]),
    ]  # fmt: skip
    client.call(Op.SET_OPTIONS, *fields)


def _sshd_config(root: Path, address: str, port: int, host_key: Path, authorized: Path) -> Path:
    cfg = root / "sshd_config"
    cfg.write_text(
        f"ListenAddress {address}:{port}\n"
        f"HostKey {host_key}\n"
        "PidFile none\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        f"AuthorizedKeysFile {authorized}\n"
        "StrictModes no\n"
        "AllowStreamLocalForwarding yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "LogLevel ERROR\n"
    )
    return cfg


def start_sshd(m: Machine, cfg: Path, real_store: Path) -> None:
    """sshd in a mount namespace where the store path is the machine's store and
    /proc/loadavg is the machine's load file."""
    script = 'mount --bind "$0" "$1" && mount --bind "$2" /proc/loadavg && shift 2 && exec "$@"'
    log = open(m.node.root / "sshd.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
         str(real_store), str(m.node.store), str(m.loadavg), SSHD, "-D", "-e", "-f", str(cfg)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    m.node.procs.append(proc)
    m.sshd = proc
    deadline = time.monotonic() + 20
    import socket

    while True:
        try:
            with socket.create_connection((m.name, m.port), 0.5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "sshd did not start:\n" + (m.node.root / "sshd.log").read_text()
                ) from None
            time.sleep(0.05)


def make_cluster(
    base: Path,
    n_machines: int,
    *local_flags: str,
    remote_daemon: Sequence[str] = (sys.executable, "-m", "guixsvc.daemon.cli"),
) -> Cluster:
    """A local daemon and `n_machines` build machines (sshd + `remote_daemon`, ours by
    default) sharing the store path with their own stores behind it."""
    need_tools()
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    base.chmod(0o755)
    shared = base / "store"
    client_key = base / "id_ed25519"
    keygen(client_key)
    authorized = base / "authorized_keys"
    shutil.copy(str(client_key) + ".pub", authorized)
    local = start_node(base / "local", shared, None, "--no-substitutes", *local_flags)
    keys.generate_key_files(str(local.conf))
    local_pub = (local.conf / "signing-key.pub").read_bytes()
    machines: list[Machine] = []
    cluster = Cluster(base, shared, local, machines, client_key)
    try:
        for i in range(n_machines):
            root = base / f"m{i}"
            real = root / "realstore"
            node = start_node(root, shared, real, "--no-substitutes", daemon=remote_daemon)
            keys.generate_key_files(str(node.conf))
            keys.authorize_key(str(node.conf), local_pub)
            keys.authorize_key(str(local.conf), (node.conf / "signing-key.pub").read_bytes())
            host_key = root / "ssh_host_ed25519_key"
            host_pub = keygen(host_key)
            m = Machine(f"127.0.0.{i + 2}", free_port(), node, host_pub, root / "loadavg")
            m.set_load(0.0)
            machines.append(m)
            start_sshd(m, _sshd_config(root, m.name, m.port, host_key, authorized), real)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    if cluster.builds is not None:
        with contextlib.suppress(Exception):
            cluster.builds.client.close()
    for m in cluster.machines:
        if m.sshd is not None:
            stop_proc(m.sshd)
        stop_node(m.node)
    stop_node(cluster.local)
