"""`guix publish --advertise`, our Avahi browser, `guix discover` and `guix-daemon --discover`
against real avahi-daemons (spec/substitutes.md §9).

Two sandbox machines (tests/avahi/sandbox.py) each run their own dbus-daemon and avahi-daemon
in private network/mount/UTS namespaces joined by a veth pair: machine A ("guixa", 10.233.7.1)
publishes, machine B ("guixb", 10.233.7.2) browses.  `avahi-browse` (avahi-utils) is the
independent oracle for what went out on the wire.  `GUIXSVC_AVAHI=0` skips them (and keeps
`make test` from installing avahi-daemon, whose Debian package starts it on the host).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.avahi.sandbox import DBUS_CONFIG, ROOT, Machine, skip_unless_possible, stop

pytestmark = pytest.mark.skipif(
    os.environ.get("GUIXSVC_AVAHI", "1") == "0", reason="disabled with GUIXSVC_AVAHI=0"
)

A_ADDR, B_ADDR = "10.233.7.1", "10.233.7.2"
NO_AVAHI = (
    "guix discover: warning: Avahi daemon is not running, "
    "cannot auto-discover substitutes servers.\n"
)


def wait_until(check: Callable[[], object], timeout: float = 20, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


class Lan:
    def __init__(self, a: Machine, b: Machine, base: Path) -> None:
        self.a, self.b, self.base = a, b, base
        self.conf = base / "etc"
        self.conf.mkdir()
        env = dict(os.environ, GUIX_CONFIGURATION_DIRECTORY=str(self.conf), PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "archive", "--generate-key"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip

    def publish(self, port: int, *, env: dict[str, str] | None = None, name: str = "") -> Path:
        """`guixsvc publish --advertise` in machine A; returns its log."""
        log = self.base / f"publish-{name or port}.log"
        env = env or self.a.env(
            GUIX_CONFIGURATION_DIRECTORY=str(self.conf),
            NIX_STORE_DIR=str(self.base / "store"),
            GUIX_DAEMON_SOCKET=str(self.base / "no-daemon.sock"),
        )
        self.a.spawn(
            sys.executable, "-m", "guixsvc.cli", "publish", f"--port={port}", "--advertise",
            log=log, env=env,
        )  # fmt: skip
        wait_until(lambda: "Advertising" in log.read_text(), 20, "publish to start")
        return log

    def browse(self, machine: Machine) -> list[list[str]]:
        """Resolved `avahi-browse -rtp _guix_publish._tcp` lines, split on ';'."""
        r = machine.run("avahi-browse", "-rtp", "_guix_publish._tcp", timeout=20)
        assert r.returncode == 0, r.stderr
        lines = [line.split(";") for line in r.stdout.splitlines() if line.startswith("=")]
        # `-p` output escapes DNS label characters as backslash + three decimal digits.
        unescape = lambda f: re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), f)  # noqa: E731
        return [[unescape(f) for f in fields] for fields in lines]


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    skip_unless_possible()
    base = tmp_path_factory.mktemp("avahi")
    b = Machine("guixb", f"{B_ADDR}/24", base / "b")
    a = Machine("guixa", f"{A_ADDR}/24", base / "a", peer=b)
    try:
        b.wait_ready()
        a.wait_ready()
        yield Lan(a, b, base)
    finally:
        a.stop()
        b.stop()


def stop_children(machine: Machine) -> None:
    for p in machine.children:
        stop(p)
    machine.children.clear()


def stop_publishers(lan: Lan) -> None:
    """Stop A's processes and wait until B no longer sees any service (a clean network for
    the next test)."""
    stop_children(lan.a)
    wait_until(lambda: not lan.browse(lan.b), 20, "the services to disappear")


def test_advertise_is_seen_by_avahi_browse(lan: Lan) -> None:
    log = lan.publish(8080)
    try:
        # Upstream's "Advertising ~a~%." leaves a lone dot without a newline.
        assert "guix publish: Advertising guix-publish-guixa\n." in log.read_text()
        expected = [
            "=", "gx0", "IPv4", "guix-publish-guixa", "_guix_publish._tcp", "local",
            "guixa.local", A_ADDR, "8080", "",
        ]  # fmt: skip
        for machine in (lan.b, lan.a):
            found = wait_until(
                lambda m=machine: [f for f in lan.browse(m) if f[3] == "guix-publish-guixa"],
                20, "the service in avahi-browse",
            )  # fmt: skip
            assert found == [expected]
    finally:
        stop_publishers(lan)  # the registration goes away with the publisher


def _probe(machine: Machine, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        machine.argv(sys.executable, "-m", "tests.avahi.probe", "4", *flags),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=machine.env(), cwd=ROOT,
    )  # fmt: skip


def _events(p: subprocess.Popen[str]) -> list[dict[str, object]]:
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_browser_resolves_remote_and_skips_local(lan: Lan) -> None:
    lan.publish(8181)
    try:
        wait_until(lambda: lan.browse(lan.b), 20, "the service on B")
        remote, local, local_included = (
            _probe(lan.b), _probe(lan.a), _probe(lan.a, "--include-local"),
        )  # fmt: skip
        events = _events(remote)
        assert [(e["action"], e["name"], e["address"], e["port"]) for e in events] == [
            ("new-service", "guix-publish-guixa", A_ADDR, 8181)
        ]
        ev = events[0]
        assert ev["host"] == "guixa.local" and ev["type"] == "_guix_publish._tcp"
        assert ev["url"] == f"http://{A_ADDR}:8181" and ev["txt"] == []
        assert not int(ev["flags"]) & 8  # not AVAHI_LOOKUP_RESULT_LOCAL
        assert _events(local) == []  # upstream ignores the machine's own services
        mine = _events(local_included)
        assert [(e["name"], e["port"]) for e in mine] == [("guix-publish-guixa", 8181)]
        assert int(mine[0]["flags"]) & 8
    finally:
        stop_publishers(lan)


def test_name_collision_picks_alternative_name(lan: Lan) -> None:
    lan.publish(8181, name="first")
    log = lan.publish(8282, name="second")
    try:

        def both() -> list[tuple[str, str]]:
            return sorted((f[3], f[8]) for f in lan.browse(lan.b))

        wait_until(lambda: len(both()) == 2, 20, "two services")
        assert both() == [("guix-publish-guixa", "8181"), ("guix-publish-guixa #2", "8282")]
        assert "renaming service to 'guix-publish-guixa #2'" in log.read_text()
    finally:
        stop_publishers(lan)


def test_discover_file_follows_the_network(lan: Lan) -> None:
    cache = lan.base / "discover-cache"
    publish_file = cache / "discover" / "publish"
    publish_file.parent.mkdir(parents=True)
    publish_file.write_text("http://stale.example:1\n")
    lan.b.spawn(
        sys.executable, "-m", "guixsvc.cli", "discover", f"--cache={cache}",
        log=lan.base / "discover.log",
    )  # fmt: skip
    try:
        wait_until(
            lambda: not publish_file.exists() or "stale" not in publish_file.read_text(),
            10,
            "the stale file to be deleted",
        )
        lan.publish(8383)
        url = f"http://{A_ADDR}:8383\n"
        wait_until(lambda: publish_file.exists() and publish_file.read_text() == url, 20, url)
        assert stat.S_IMODE(publish_file.stat().st_mode) == 0o644
        stop_children(lan.a)
        wait_until(lambda: publish_file.read_text() == "", 20, "the line to be removed")
    finally:
        stop_children(lan.a)
        stop_children(lan.b)
    assert (lan.base / "discover.log").read_text() == ""


def test_without_avahi(tmp_path: Path) -> None:
    """No bus at all, and a bus without avahi-daemon: upstream's warning, exit 1; publish
    --advertise warns and keeps serving."""
    try:
        import dbus_fast  # noqa: F401
    except ImportError:
        pytest.skip("Python package dbus-fast is not installed")
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon missing (Debian package dbus-daemon)")
    bus_sock = tmp_path / "bus"
    (tmp_path / "bus.conf").write_text(DBUS_CONFIG.format(address=f"unix:path={bus_sock}"))
    bus = subprocess.Popen(
        ["dbus-daemon", f"--config-file={tmp_path / 'bus.conf'}", "--nofork", "--nopidfile"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(bus_sock.exists, 10, "dbus-daemon")
        for address in (f"unix:path={tmp_path / 'nothing'}", f"unix:path={bus_sock}"):
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=str(ROOT))
            r = subprocess.run(
                [sys.executable, "-m", "guixsvc.daemon.discover", f"--cache={tmp_path}"],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert (r.returncode, r.stderr) == (1, NO_AVAHI)
        conf = tmp_path / "etc"
        conf.mkdir()
        env.update(GUIX_CONFIGURATION_DIRECTORY=str(conf), NIX_STORE_DIR=str(tmp_path / "s"))
        subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "archive", "--generate-key"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        from tests.substitutes.helpers import free_port

        port = free_port()
        log = tmp_path / "publish.log"
        with open(log, "wb") as f:
            pub = subprocess.Popen(
                [sys.executable, "-m", "guixsvc.cli", "publish", "--listen=127.0.0.1",
                 f"--port={port}", "--advertise"],
                env=env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_until(lambda: "cannot advertise" in log.read_text(), 20, "the warning")
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/nix-cache-info") as r:
                assert r.status == 200
            assert pub.poll() is None
        finally:
            stop(pub)
        assert "guix publish: Advertising guix-publish-" in log.read_text()
    finally:
        stop(bus)


def _daemon_wired() -> bool:
    return "start_discovery" in (ROOT / "guixsvc" / "daemon" / "pool.py").read_text()


def test_daemon_discover_substitutes_from_advertised_server(lan: Lan) -> None:
    """B's daemon with --discover=yes finds A's `publish --advertise` and substitutes from it
    (both stores live at the same path: each machine bind-mounts its own directory there)."""
    if not _daemon_wired():
        pytest.skip("guixsvc/daemon/pool.py does not call discover.start_discovery yet")
    from guixsvc.protocol.client import DaemonClient

    shared = lan.base / "gnu-store"
    shared.mkdir()
    nodes: dict[str, dict[str, str]] = {}
    for name, machine in (("a", lan.a), ("b", lan.b)):
        root = lan.base / f"node-{name}"
        (root / "real-store").mkdir(parents=True)
        (root / "etc").mkdir()
        r = machine.run("mount", "--bind", str(root / "real-store"), str(shared))
        assert r.returncode == 0, r.stderr
        nodes[name] = machine.env(
            NIX_STORE_DIR=str(shared), GUIX_STATE_DIRECTORY=str(root / "state"),
            GUIX_DATABASE_DIRECTORY=str(root / "state" / "db"),
            GUIX_LOG_DIRECTORY=str(root / "log"),
            GUIX_CONFIGURATION_DIRECTORY=str(root / "etc"),
            GUIX_DAEMON_SOCKET=str(root / "daemon.sock"),
        )  # fmt: skip
        nodes[name].pop("XDG_CACHE_HOME", None)
    try:
        flags = {"a": [], "b": ["--discover=yes", "--substitute-urls=http://127.0.0.1:9"]}
        for name, machine in (("a", lan.a), ("b", lan.b)):
            env = nodes[name]
            machine.spawn(
                sys.executable, "-m", "guixsvc.daemon.cli",
                f"--listen={env['GUIX_DAEMON_SOCKET']}", "--disable-chroot", *flags[name],
                log=lan.base / f"daemon-{name}.log", env=env,
            )  # fmt: skip
            wait_until(lambda e=env: os.path.exists(e["GUIX_DAEMON_SOCKET"]), 20, "daemon")
        with DaemonClient(nodes["a"]["GUIX_DAEMON_SOCKET"]) as c:
            item = c.add_text_to_store("discovered", "found over mDNS\n", [])
        archive = [sys.executable, "-m", "guixsvc.cli", "archive"]
        subprocess.run([*archive, "--generate-key"], env=nodes["a"], check=True)
        pub_key = Path(nodes["a"]["GUIX_CONFIGURATION_DIRECTORY"], "signing-key.pub")
        subprocess.run(
            [*archive, "--authorize"], env=nodes["b"], input=pub_key.read_bytes(), check=True
        )
        lan.publish(8080, env=nodes["a"], name="e2e")
        discovered = Path(nodes["b"]["GUIX_STATE_DIRECTORY"], "discover", "publish")
        wait_until(lambda: discovered.exists() and discovered.read_text(), 20, "discover file")
        assert discovered.read_text() == f"http://{A_ADDR}:8080\n"
        with DaemonClient(nodes["b"]["GUIX_DAEMON_SOCKET"]) as c:
            assert not c.is_valid_path(item)
            assert c.query_substitutable_paths([item]) == [item]
            c.ensure_path(item)
            assert c.is_valid_path(item)
        base_name = os.path.basename(item)
        real_b = lan.base / "node-b" / "real-store" / base_name
        assert real_b.read_text() == "found over mDNS\n"
    finally:
        stop_children(lan.a)
        stop_children(lan.b)
        for machine in (lan.a, lan.b):
            machine.run("umount", str(shared))


def test_start_discovery_spawns_guix_discover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`discover=false` spawns nothing; with `$GUIX` set the daemon runs `$GUIX discover` as
    upstream does, and `stop` ends it."""
    from guixsvc.daemon import discover
    from guixsvc.daemon.settings import Settings
    from guixsvc.store.config import StoreConfig

    config = StoreConfig.from_env({"GUIX_STATE_DIRECTORY": str(tmp_path / "state")})
    settings = Settings()
    settings.set("discover", "false")
    assert discover.start_discovery(config, settings) is None
    settings.set("discover", "true")
    program = tmp_path / "guix"
    program.write_text(f'#!/bin/sh\necho "$*" > {tmp_path / "argv"}\nexec sleep 60\n')
    program.chmod(0o755)
    monkeypatch.setenv("GUIX", str(program))
    handle = discover.start_discovery(config, settings)
    assert handle is not None
    try:
        wait_until((tmp_path / "argv").exists, 10, "the program to run")
        wait_until(lambda: (tmp_path / "argv").read_text() == "discover\n", 10, "argv")
        assert handle.process.poll() is None
    finally:
        discover.stop(handle)
    assert handle.process.returncode is not None
