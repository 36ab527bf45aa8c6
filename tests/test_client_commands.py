"""`guixsvc build` and `guixsvc download` end to end: real processes against a real daemon.

The daemon (tests/conftest.py `start_daemon`, builds without chroot) takes its substitutes from a
loopback HTTP server that answers 404 and records what it was asked, so `--no-substitutes` can be
seen to work; the same server serves the files `guixsvc download` fetches.  Derivations use
Debian's busybox as builder, like tests/build.  Printed hashes are checked against hashlib and,
when Debian's nix-bin is installed, `nix-hash`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guixsvc.store import base32
from guixsvc.store.paths import StoreDir
from tests.build.conftest import BUSYBOX, Builds, add_busybox
from tests.conftest import Daemon, start_daemon, stop_daemon

pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static missing")

TARBALL = b"pretend this is hello-2.12.tar.gz\n" * 100


class _Server(http.server.ThreadingHTTPServer):
    requests: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path == "/files/hello-2.12.tar.gz":
            self.send_response(200)
            self.send_header("Content-Length", str(len(TARBALL)))
            self.end_headers()
            self.wfile.write(TARBALL)
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Env:
    daemon: Daemon
    builds: Builds
    server: _Server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def run(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.daemon.env, GUIX_DAEMON_SOCKET=self.daemon.socket)
        return subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", *args],
            env=env, capture_output=True, text=True, timeout=120, cwd=cwd,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    daemon = start_daemon(tmp_path, f"--substitute-urls=http://127.0.0.1:{server.server_port}")
    client = daemon.client()
    try:
        builds = Builds(daemon, client, add_busybox(client, tmp_path), [])
        yield Env(daemon, builds, server)
    finally:
        client.close()
        stop_daemon(daemon)
        server.shutdown()
        server.server_close()


# --- guixsvc build -------------------------------------------------------------------------------


def test_build_prints_progress_then_outputs(env: Env) -> None:
    drv, outs = env.builds.derivation(
        "two-outputs", 'echo "hello from the builder"; echo a > $out; echo b > $doc',
        outputs=("out", "doc"),
    )  # fmt: skip
    r = env.run("build", drv)
    assert r.returncode == 0, r.stderr
    # show-derivation-outputs: one line per output, in the derivation's (sorted) order.
    assert r.stdout == f"{outs['doc']}\n{outs['out']}\n"
    assert Path(outs["out"]).read_text() == "a\n"
    # show-what-to-build, then print-build-event at the default verbosity (3).
    assert f"The following derivation will be built:\n   {drv}\n" in r.stderr
    assert f"building {drv}...\n" in r.stderr
    assert "hello from the builder\n" in r.stderr
    assert f"successfully built {drv}\n" in r.stderr
    # Built already: nothing to do, same outputs.
    r = env.run("build", drv)
    assert (r.returncode, r.stdout) == (0, f"{outs['doc']}\n{outs['out']}\n")
    assert "building" not in r.stderr
    # -q: no build log, -d: the derivation itself.
    drv2, _ = env.builds.derivation("quiet", 'echo "noisy builder"; echo x > $out')
    r = env.run("build", "-q", drv2)
    assert r.returncode == 0 and "noisy builder" not in r.stderr
    assert env.run("build", "-d", drv2).stdout == f"{drv2}\n"


def test_build_failure_and_keep_failed(env: Env) -> None:
    drv, _ = env.builds.derivation("fails", 'echo "about to fail"; touch marker; exit 3')
    r = env.run("build", drv)
    assert r.returncode == 1
    log_dir = env.daemon.env["GUIX_LOG_DIRECTORY"]
    base = os.path.basename(drv)
    assert f"build of {drv} failed\nView build log at '{log_dir}/drvs/{base[:2]}/" in r.stderr
    assert r.stderr.endswith(f"guix build: error: build of `{drv}' failed\n")
    assert "keeping build directory" not in r.stderr
    # -K: the daemon keeps the build tree and says where.
    r = env.run("build", "-K", drv)
    assert r.returncode == 1
    line = next(ln for ln in r.stderr.splitlines() if "keeping build directory" in ln)
    kept = line.split("`")[1].rstrip("'")
    assert os.path.isfile(os.path.join(kept, "marker"))
    shutil.rmtree(kept, ignore_errors=True)


def test_log_file(env: Env) -> None:
    drv, outs = env.builds.derivation("logged", 'echo "line for the log"; echo x > $out')
    r = env.run("build", "--log-file", drv)
    assert (r.returncode, r.stderr) == (1, f"guix build: error: no build log for '{outs['out']}'\n")
    assert env.run("build", drv).returncode == 0
    r = env.run("build", "--log-file", drv)
    assert r.returncode == 0, r.stderr
    log = r.stdout.rstrip("\n")
    base = os.path.basename(drv)
    prefix = os.path.join(env.daemon.env["GUIX_LOG_DIRECTORY"], "drvs", base[:2], base[2:])
    assert log in (prefix, prefix + ".gz", prefix + ".bz2")
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(Path(log).suffix, open)
    with opener(log, "rb") as f:  # type: ignore[operator]
        assert b"line for the log" in f.read()
    # An output file name works too (through its deriver).
    assert env.run("build", "--log-file", outs["out"]).stdout == r.stdout


def test_check_and_rounds(env: Env) -> None:
    deterministic, _ = env.builds.derivation("same", "echo same > $out")
    assert env.run("build", deterministic).returncode == 0
    r = env.run("build", "--check", deterministic)
    assert r.returncode == 0, r.stderr
    assert f"building {deterministic}...\n" in r.stderr
    # A builder whose output differs each time: --check and --rounds catch it.
    noisy, _ = env.builds.derivation("noisy", "cat /proc/sys/kernel/random/uuid > $out")
    r = env.run("build", "--rounds=2", noisy)
    assert r.returncode == 1
    assert r.stderr.count(f"building {noisy}...\n") == 2
    assert f"of ‘{noisy}’ differs from previous round\n" in r.stderr
    assert r.stderr.endswith(f"guix build: error: build of `{noisy}' failed\n")
    noisy2, _ = env.builds.derivation("noisy2", "cat /proc/sys/kernel/random/uuid > $out")
    assert env.run("build", noisy2).returncode == 0
    r = env.run("build", "--check", noisy2)
    assert r.returncode == 1
    assert f"guix build: error: derivation `{noisy2}' may not be deterministic" in r.stderr


def test_cores_and_max_jobs(env: Env) -> None:
    drv, outs = env.builds.derivation("cores", "echo $NIX_BUILD_CORES > $out")
    r = env.run("build", "-c", "3", "-M", "2", drv)
    assert r.returncode == 0, r.stderr
    assert Path(outs["out"]).read_text() == "3\n"
    drv2, _ = env.builds.derivation("no-jobs", "echo x > $out")
    r = env.run("build", "--max-jobs=0", "--no-substitutes", drv2)
    assert r.returncode == 1
    assert "unable to start any build" in r.stderr
    r = env.run("build", "-M", "x", drv2)
    assert (r.returncode, r.stderr) == (
        1, "guix build: error: not a number: 'max-jobs' option argument: x\n"
    )  # fmt: skip


def test_no_substitutes(env: Env) -> None:
    drv, _ = env.builds.derivation("offline", "echo x > $out")
    r = env.run("build", "--no-substitutes", drv)
    assert r.returncode == 0, r.stderr
    assert env.server.requests == []
    drv2, _ = env.builds.derivation("online", "echo y > $out")
    r = env.run("build", drv2)
    assert r.returncode == 0, r.stderr
    assert any(p.endswith(".narinfo") for p in env.server.requests), env.server.requests


def test_derivation_file_outside_the_store_and_roots(env: Env, tmp_path: Path) -> None:
    drv, outs = env.builds.derivation("copied", "echo copied > $out")
    copy = tmp_path / "copied.drv"
    shutil.copyfile(drv, copy)
    r = env.run("build", "-r", "result", str(copy), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{outs['out']}\n"
    assert os.readlink(tmp_path / "result") == outs["out"]
    roots = env.builds.client.find_roots()
    assert roots.get(str(tmp_path / "result")) == outs["out"]
    r = env.run("build", "hello")
    assert (r.returncode, r.stderr) == (1, "guix build: error: hello: unknown package\n")


# --- guixsvc download ----------------------------------------------------------------------------


def _nix_hash(*args: str) -> str | None:
    if shutil.which("nix-hash") is None:
        return None
    return subprocess.run(
        ["nix-hash", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_download_url(env: Env) -> None:
    r = env.run("download", f"{env.url}/files/hello-2.12.tar.gz")
    assert r.returncode == 0, r.stderr
    path, digest = r.stdout.splitlines()
    sha256 = hashlib.sha256(TARBALL).digest()
    store = StoreDir(env.daemon.store_dir)
    expected = store.display(
        store.make_fixed_output_path(False, "sha256", sha256, "hello-2.12.tar.gz")
    )
    assert path == expected
    assert Path(path).read_bytes() == TARBALL
    assert digest == base32.encode(sha256)
    assert "Starting download of " in r.stderr and f"From {env.url}/files/" in r.stderr
    assert env.builds.client.is_valid_path(path)
    r = env.run("download", f"{env.url}/files/missing.tar.gz")
    assert r.returncode == 1
    assert r.stderr.endswith(
        f"guix download: error: {env.url}/files/missing.tar.gz: download failed\n"
    )


def test_download_local_files(env: Env, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes(b"some notes\n")
    r = env.run("download", str(f))
    assert r.returncode == 0, r.stderr
    path, digest = r.stdout.splitlines()
    assert Path(path).read_bytes() == b"some notes\n" and path.endswith("-notes.txt")
    assert digest == base32.encode(hashlib.sha256(b"some notes\n").digest())
    assert digest == (_nix_hash("--type", "sha256", "--flat", "--base32", str(f)) or digest)
    # file:// URL, another algorithm and format: the same store item, another hash.
    r = env.run("download", "-H", "sha1", f"file://{f}")
    assert r.returncode == 0, r.stderr
    path1, sha1 = r.stdout.splitlines()
    assert path1 == path
    assert sha1 == base32.encode(hashlib.sha1(b"some notes\n").digest())
    assert sha1 == (_nix_hash("--type", "sha1", "--flat", "--base32", str(f)) or sha1)
    r = env.run("download", "--format=base16", str(f))
    assert r.stdout.splitlines()[1] == hashlib.sha256(b"some notes\n").hexdigest()
    r = env.run("download", "-f", "klingon", str(f))
    assert (r.returncode, r.stderr) == (
        1,
        "guix download: error: unsupported hash format: klingon\n",
    )
    r = env.run("download")
    assert (r.returncode, r.stderr) == (1, "guix download: error: no download URI was specified\n")


def test_download_recursive_directory(env: Env, tmp_path: Path) -> None:
    tree = tmp_path / "src-tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.c").write_text("int main(void) { return 0; }\n")
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "link").symlink_to("sub/a.c")
    r = env.run("download", "-r", str(tree))
    assert r.returncode == 0, r.stderr
    path, digest = r.stdout.splitlines()
    assert path.endswith("-src-tree") and os.readlink(Path(path) / "link") == "sub/a.c"
    assert os.access(Path(path) / "run.sh", os.X_OK)
    store = StoreDir(env.daemon.store_dir)
    nar_sha256 = base32.decode(digest)
    assert path == store.display(
        store.make_fixed_output_path(True, "sha256", nar_sha256, "src-tree")
    )
    assert digest == (_nix_hash("--type", "sha256", "--base32", str(tree)) or digest)
