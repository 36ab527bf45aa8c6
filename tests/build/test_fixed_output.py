"""Fixed-output derivations: network access, hash checks, builtin:download."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Callable, Iterator

import pytest

from guixsvc.protocol.client import DaemonError
from guixsvc.store import base32, nar
from tests.build.conftest import Builds, requires_root

pytestmark = requires_root

PAYLOAD = b"the tarball contents\n" * 100


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/file.tar":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _fetch_script(b: Builds, url: str) -> str:
    # busybox wget, run inside the chroot (slirp4netns connects 127.0.0.1 to the host's).
    return f"{b.busybox}/bin/busybox wget -q -O $out {url}/file.tar"


def test_fixed_output_fetch(make_builds: Callable[..., Builds], http_url: str) -> None:
    b = make_builds()
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    drv, outs = b.derivation("file.tar", _fetch_script(b, http_url), fixed=("sha256", digest))
    try:
        b.client.build_paths([drv])
    except Exception:
        print(b.logs)
        raise
    with open(outs["out"], "rb") as f:
        assert f.read() == PAYLOAD
    assert b.client.query_path_info(outs["out"]).deriver == drv


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha512"])
def test_fixed_output_algorithms(
    make_builds: Callable[..., Builds], http_url: str, algo: str
) -> None:
    b = make_builds()
    digest = hashlib.new(algo, PAYLOAD).hexdigest()
    drv, outs = b.derivation("f", _fetch_script(b, http_url), fixed=(algo, digest))
    try:
        b.client.build_paths([drv])
    except Exception:
        print(b.logs)
        raise
    assert b.client.is_valid_path(outs["out"])


def test_fixed_output_recursive(make_builds: Callable[..., Builds]) -> None:
    b = make_builds()
    digest = hashlib.sha256(nar.dump_regular(b"exec\n", executable=True)).hexdigest()
    drv, outs = b.derivation("rec", "echo exec > $out; chmod +x $out", fixed=("r:sha256", digest))
    try:
        b.client.build_paths([drv])
    except Exception:
        print(b.logs)
        raise
    assert b.client.is_valid_path(outs["out"])


def test_fixed_output_wrong_hash(make_builds: Callable[..., Builds], http_url: str) -> None:
    b = make_builds()
    wrong = hashlib.sha256(b"something else").digest()
    drv, outs = b.derivation("bad.tar", _fetch_script(b, http_url), fixed=("sha256", wrong.hex()))
    with pytest.raises(DaemonError) as exc:
        b.client.build_paths([drv])
    assert exc.value.status == 1  # output rejected, not a permanent failure
    text = "".join(b.logs)
    assert f"hash mismatch for store item '{outs['out']}'" in text
    actual = base32.encode(hashlib.sha256(PAYLOAD).digest())
    if "@ build-started" in text:  # build traces on: the hashes are printed
        assert f"@ hash-mismatch {outs['out']} sha256 {base32.encode(wrong)} {actual}" in text
    assert not b.client.is_valid_path(outs["out"])


def test_builtin_download(make_builds: Callable[..., Builds], http_url: str) -> None:
    b = make_builds()
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    drv, outs = b.derivation(
        "file.tar",
        "",
        builder="builtin:download",
        args=[],
        fixed=("sha256", digest),
        env={"url": f'("{http_url}/missing" "{http_url}/file.tar")', "preferLocalBuild": "1",
             "impureEnvVars": "http_proxy https_proxy LC_ALL LC_MESSAGES LANG COLUMNS"},
    )  # fmt: skip
    try:
        b.client.build_paths([drv])
    except Exception:
        print(b.logs)
        raise
    with open(outs["out"], "rb") as f:
        assert f.read() == PAYLOAD


def test_builtin_download_wrong_hash(make_builds: Callable[..., Builds], http_url: str) -> None:
    b = make_builds()
    drv, outs = b.derivation(
        "file.tar",
        "",
        builder="builtin:download",
        args=[],
        fixed=("sha256", hashlib.sha256(b"no").hexdigest()),
        env={"url": f'"{http_url}/file.tar"'},
    )
    with pytest.raises(DaemonError):
        b.client.build_paths([drv])
    assert f"hash mismatch for store item '{outs['out']}'" in "".join(b.logs)
