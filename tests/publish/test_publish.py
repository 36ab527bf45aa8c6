"""`guixsvc publish` over loopback: routes, narinfo bytes and signatures, compressions checked
with independent tools (nix-store --dump, gzip, lzip, zstd), hostile paths, ranges,
pipelining, the --cache mode and socket activation (spec/substitutes.md §1-§5, cli.md §2)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.pki import keys
from guixsvc.store import base32
from guixsvc.store.narinfo import parse_narinfo
from tests.conftest import launcher_env_flags
from tests.substitutes.helpers import (
    Node,
    free_port,
    spawn,
    start_node,
    start_publish,
    stop_node,
    stop_proc,
    wait_port,
)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("pub")
    n = start_node(base / "n", base / "n" / "store", None)
    try:
        keys.generate_key_files(str(n.conf))
        tree = base / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "big").write_bytes(os.urandom(200_000) + b"z" * 300_000)
        (tree / "sub" / "x").write_bytes(b"x")
        with n.client() as c:
            dep = c.add_to_store("dep", str(tree))
            top = c.add_text_to_store("top", "uses " + dep, [dep])
            flat = c.add_to_store("flat.txt", str(tree / "sub" / "x"), recursive=False)
            infos = {p: c.query_path_info(p) for p in (dep, top, flat)}
        _, url = start_publish(n, None, "-C", "zstd:3", "-C", "gzip:3")
        yield {"n": n, "url": url, "dep": dep, "top": top, "flat": flat, "infos": infos,
               "base": base}  # fmt: skip
    finally:
        stop_node(n)


def test_nix_cache_info_and_home(node: dict[str, object]) -> None:
    n = node["n"]
    assert isinstance(n, Node)
    status, headers, body = get(f"{node['url']}/nix-cache-info")
    assert status == 200 and headers["Content-Type"] == "text/plain;charset=utf-8"
    assert body == f"StoreDir: {n.store}\nWantMassQuery: 0\nPriority: 100\n".encode()
    status, _, body = get(f"{node['url']}/")
    assert status == 200 and b'<a href="signing-key.pub">' in body
    status, _, body = get(f"{node['url']}/signing-key.pub")
    assert status == 200 and body == (n.conf / "signing-key.pub").read_bytes()


def test_narinfo_is_upstream_format_and_verifies(node: dict[str, object]) -> None:
    n, top, dep = node["n"], str(node["top"]), str(node["dep"])
    assert isinstance(n, Node)
    info = node["infos"][top]  # type: ignore[index]
    status, headers, body = get(f"{node['url']}/{os.path.basename(top)[:32]}.narinfo")
    assert status == 200
    assert headers["Content-Type"] == "application/x-nix-narinfo;charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    text = body.decode()
    nar_hash = base32.encode(bytes.fromhex(info.nar_hash))
    item = os.path.basename(top)
    signed = (
        f"StorePath: {top}\nNarHash: sha256:{nar_hash}\nNarSize: {info.nar_size}\n"
        f"References: {os.path.basename(dep)}\n"
    )
    assert text.startswith(signed + "Signature: 1;")
    assert text.endswith(
        f"\nURL: nar/zstd/{item}\nCompression: zstd\nURL: nar/gzip/{item}\nCompression: gzip\n"
    )
    acl = keys.Acl([keys.load_key(n.conf / "signing-key.pub")])
    parsed = parse_narinfo(body, node["url"])  # type: ignore[arg-type]
    assert parsed.is_valid(acl)
    assert not parsed.is_valid(keys.Acl())
    assert not parse_narinfo(body.replace(b"NarSize: ", b"NarSize: 1"), "").is_valid(acl)


def _nar_of(path: str) -> bytes:
    if shutil.which("nix-store") is None:
        pytest.skip("nix-store (Debian package nix-bin) is needed as an independent NAR oracle")
    return subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd", "lzip"])
def test_nar_compressions_match_nix_store_dump(node: dict[str, object], kind: str) -> None:
    dep = str(node["dep"])
    expected = _nar_of(dep)
    prefix = "nar" if kind == "none" else f"nar/{kind}"
    status, headers, body = get(f"{node['url']}/{prefix}/{os.path.basename(dep)}")
    assert status == 200
    assert headers["Content-Type"] == "application/x-nix-archive;charset=ISO-8859-1"
    if kind == "none":
        assert body == expected and int(headers["Content-Length"]) == len(expected)
        return
    tool = {"gzip": "gzip", "zstd": "zstd", "lzip": "lzip"}[kind]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (Debian package {tool}) is needed to check {kind} output")
    out = subprocess.run([tool, "-d", "-c"], input=body, capture_output=True, check=True).stdout
    assert out == expected
    assert hashlib.sha256(out).hexdigest() == node["infos"][dep].nar_hash  # type: ignore[index]


def test_range_on_uncompressed_nar(node: dict[str, object]) -> None:
    dep = str(node["dep"])
    expected = _nar_of(dep)
    url = f"{node['url']}/nar/{os.path.basename(dep)}"
    status, headers, body = get(url, {"Range": "bytes=1000-250999"})
    assert status == 206 and body == expected[1000:251000]
    assert headers["Content-Range"] == f"bytes 1000-250999/{len(expected)}"
    status, _, body = get(url, {"Range": "bytes=-100"})
    assert status == 206 and body == expected[-100:]
    status, _, _ = get(url, {"Range": f"bytes={len(expected)}-"})
    assert status == 416


def test_content_addressed_file(node: dict[str, object]) -> None:
    digest = hashlib.sha256(b"x").digest()
    status, headers, body = get(f"{node['url']}/file/flat.txt/sha256/{base32.encode(digest)}")
    assert status == 200 and body == b"x"
    assert headers["Content-Type"] == "application/octet-stream;charset=ISO-8859-1"
    other = base32.encode(hashlib.sha256(b"y").digest())
    assert get(f"{node['url']}/file/flat.txt/sha256/{other}")[0] == 404


HOSTILE = [
    "/nar/..%2F..%2F..%2Fetc%2Fpasswd",
    "/nar/gzip/..%2F..%2Fetc%2Fpasswd",
    "/nar/zstd/%2e%2e",
    "/nar/..",
    "/nar/gzip/x%2Fy",
    "/nar/00000000000000000000000000000000-nothing",
    "/nar/ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEF-bad",
    "/nar/tooshort-x",
    "/nar/none/{item}",
    "/nar/bzip2/{item}",
    "/{hash}x.narinfo",
    "/{upper}.narinfo",
    "/e.narinfo",
    "/.narinfo",
    "/%2e%2e%2Fetc%2Fpasswd.narinfo",
    "/file/..%2F..%2Fetc%2Fpasswd/sha256/" + "0" * 52,
    "/file/passwd/sha256/" + "e" * 52,
    "/file/passwd/sha256/" + "0" * 40,
    "/file/%2e%2e/sha256/" + "0" * 52,
    "/log/..%2F..%2Fetc%2Fpasswd",
    "/log/{item}",
    "/log/00000000000000000000000000000000-x.drv",
    "/etc/passwd",
    "/nar",
    "/signing-key.sec",
    "/../../etc/passwd",
]


def test_hostile_paths_get_404(node: dict[str, object]) -> None:
    item = os.path.basename(str(node["dep"]))
    for template in HOSTILE:
        path = template.format(item=item, hash=item[:32], upper=item[:32].upper())
        # Send the raw request line so that no client normalises the path.
        with socket.create_connection(("127.0.0.1", int(str(node["url"]).rsplit(":", 1)[1]))) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1])
        assert status in (400, 404), (path, data[:200])
        assert b"root:" not in data and b"private-key" not in data


def test_non_get_methods_are_404(node: dict[str, object]) -> None:
    item = os.path.basename(str(node["dep"]))
    for method in ("HEAD", "POST", "PUT", "DELETE"):
        req = urllib.request.Request(f"{node['url']}/{item[:32]}.narinfo", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 404


def test_pipelined_narinfo_requests(node: dict[str, object]) -> None:
    items = [os.path.basename(str(node[k])) for k in ("top", "dep", "top")] + ["0" * 32 + "-x"]
    port = int(str(node["url"]).rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"".join(
            f"GET /{i[:32]}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in items
        ))  # fmt: skip
        f = s.makefile("rb")
        for i in items:
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = f.read(length)
            if i.startswith("0" * 32):
                assert status == 404 and body.endswith(b".narinfo")
            else:
                assert status == 200 and body.startswith(b"StorePath: ")
                assert i.encode() in body.split(b"\n")[0]


def test_metrics_and_health(node: dict[str, object]) -> None:
    status, _, body = get(f"{node['url']}/health")
    assert status == 200 and b'"ok"' in body
    status, headers, body = get(f"{node['url']}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"guix_publish_requests_total{" in body
    assert b"guix_publish_request_seconds_bucket{" in body


def test_cache_mode_bakes(node: dict[str, object]) -> None:
    n = node["n"]
    assert isinstance(n, Node)
    cache = Path(str(node["base"])) / "cache"
    proc, url = start_publish(
        n, None, "-C", "gzip:3", "-C", "zstd:3", f"--cache={cache}", "--ttl=1d",
        "--cache-bypass-threshold=1K", name="publish-cache",
    )  # fmt: skip
    try:
        top, dep = os.path.basename(str(node["top"])), os.path.basename(str(node["dep"]))
        # Small item: a temporary narinfo with max-age=300; big item: "baking" 404.
        status, headers, body = get(f"{url}/{top[:32]}.narinfo")
        assert status == 200 and headers["Cache-Control"] == "max-age=300"
        status, headers, body = get(f"{url}/{dep[:32]}.narinfo")
        if status == 404:
            assert body.startswith(b"We're baking it: ")
            assert headers["Cache-Control"] == "max-age=300" and headers["X-Baking"] == "1"
        deadline = time.monotonic() + 30
        while not (cache / "gzip" / f"{dep}.narinfo").exists():
            assert time.monotonic() < deadline, "baking did not finish"
            time.sleep(0.1)
        status, headers, body = get(f"{url}/{dep[:32]}.narinfo")
        assert status == 200 and headers["Cache-Control"] == "max-age=86400"
        parsed = parse_narinfo(body, url)
        sizes = {e.compression: e.file_size for e in parsed.entries}
        assert sizes == {
            "gzip": (cache / "gzip" / f"{dep}.nar").stat().st_size,
            "zstd": (cache / "zstd" / f"{dep}.nar").stat().st_size,
        }
        assert os.path.samefile(
            cache / "gzip" / f"{dep}.narinfo", cache / "zstd" / f"{dep}.narinfo"
        )
        assert (cache / "hashes" / dep[:32]).read_text() == str(node["dep"])
        status, headers, body = get(f"{url}/nar/gzip/{dep}")
        assert (
            status == 200
            and headers["Content-Type"] == "application/octet-stream;charset=ISO-8859-1"
        )
        assert int(headers["Content-Length"]) == len(body) == sizes["gzip"]
        status, _, part = get(f"{url}/nar/gzip/{dep}", {"Range": "bytes=10-19"})
        assert status == 206 and part == body[10:20]
        # lzip is not configured: no cache for it, and the item is above the bypass threshold.
        assert get(f"{url}/nar/lzip/{dep}")[0] == 404
    finally:
        stop_proc(proc)


def test_socket_activation(node: dict[str, object]) -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate (Debian package systemd) is needed")
    n = node["n"]
    assert isinstance(n, Node)
    port = free_port()
    n.env["GUIX_DAEMON_SOCKET"] = n.socket
    proc = spawn(
        n, "publish-sa",
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
         *launcher_env_flags(n.env),
         sys.executable, "-m",
         "guixsvc.cli", "publish", "--port=1"],
        None,
    )  # fmt: skip
    try:
        wait_port(port, proc, n.root / "publish-sa.log")
        status, _, body = get(f"http://127.0.0.1:{port}/nix-cache-info")
        assert status == 200 and body.startswith(b"StoreDir: ")
        assert "publishing (started via socket activation)" in n.log("publish-sa")
    finally:
        stop_proc(proc)


def test_bad_options() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "guixsvc.cli", "publish", *args],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    r = run("--port=abc")
    assert r.returncode == 1 and "abc: invalid number" in r.stderr
    r = run("--ttl=3y")
    assert r.returncode == 1 and "3y: invalid duration" in r.stderr
    r = run("extra")
    assert r.returncode == 1 and "extra: extraneous argument" in r.stderr
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
    # LISTEN_PID is not the child's pid: normal start, which fails on the missing keys.
    r = subprocess.run([sys.executable, "-m", "guixsvc.cli", "publish", "--port=0",
                        "--listen=127.0.0.1", "--public-key=/nonexistent"],
                       capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert r.returncode == 1 and "/nonexistent" in r.stderr
