"""Store A publishes with `guixsvc publish`; store B (same store directory, other namespace)
substitutes a 3-item closure when A's key is authorised, and refuses -- registering nothing --
when it is not, when the nar is tampered with, or when the narinfo is (spec/substitutes.md §6-§7,
worker-protocol.md §6.2, §6.8, §6.14, §6.19)."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from guixsvc.protocol.client import DaemonError
from tests.substitutes.helpers import (
    Node,
    need_unshare,
    start_node,
    start_publish,
    stop_node,
    wipe_store,
)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    need_unshare()
    base = tmp_path_factory.mktemp("subst")
    shared, a_store = base / "store", base / "a-store"
    tree = base / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "data").write_bytes(os.urandom(300_000))
    (tree / "bin" / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(tree / "bin" / "run", 0o755)
    os.symlink("bin/run", tree / "link")
    a = start_node(base / "a", shared, a_store)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "archive", "--generate-key"],
            env=a.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "gathering entropy" in r.stderr
        with a.client() as c:
            dep1 = c.add_to_store("dep1", str(tree))
            dep2 = c.add_text_to_store("dep2", "needs " + dep1, [dep1])
            top = c.add_text_to_store("top", f"{dep1} {dep2}", [dep1, dep2])
            infos = {p: c.query_path_info(p) for p in (dep1, top, dep2)}
        _, url = start_publish(a, a_store, "-C", "zstd:3", "-C", "gzip:3", "-C", "lzip:3")
        yield {
            "base": base, "shared": shared, "a": a, "url": url, "dep1": dep1, "dep2": dep2,
            "top": top, "infos": infos, "a_store": a_store,
            "public": (a.conf / "signing-key.pub").read_bytes(),
        }  # fmt: skip
    finally:
        stop_node(a)


_counter = iter(range(1000))


def node_b(published: dict[str, object], urls: str, authorise: bool) -> Node:
    shared = published["shared"]
    assert isinstance(shared, Path)
    wipe_store(shared)
    root = published["base"] / f"b{next(_counter)}"  # type: ignore[operator]
    b = start_node(root, shared, None, f"--substitute-urls={urls}")
    if authorise:
        subprocess.run(
            [sys.executable, "-m", "guixsvc.cli", "archive", "--authorize"],
            input=published["public"], env=b.env, check=True,
        )  # fmt: skip
    return b


def assert_nothing_registered(b: Node, published: dict[str, object]) -> None:
    paths = [published["dep1"], published["dep2"], published["top"]]
    with b.client() as c:
        assert c.query_valid_paths(paths) == []  # type: ignore[arg-type]
        assert c.query_all_valid_paths() == []
    leftovers = [e for e in os.listdir(b.store) if e != ".links"]
    assert leftovers == []


def test_authorised_closure_is_substituted(published: dict[str, object]) -> None:
    b = node_b(published, str(published["url"]), authorise=True)
    dep1, dep2, top = published["dep1"], published["dep2"], published["top"]
    infos = published["infos"]
    assert isinstance(infos, dict)
    try:
        with b.client() as c:
            assert c.has_substitutes(top)  # type: ignore[arg-type]
            absent = f"{b.store}/{'0' * 32}-x"
            found = c.query_substitutable_paths([top, dep1, absent])  # type: ignore[list-item]
            assert sorted(found) == sorted([top, dep1])  # type: ignore[type-var]
            c.ensure_path(top)  # type: ignore[arg-type]
            assert c.query_valid_paths([dep1, dep2, top]) == sorted([dep1, dep2, top])  # type: ignore[arg-type,type-var]
            for path, info in infos.items():
                got = c.query_path_info(path)
                assert (got.nar_hash, got.nar_size, got.references, got.deriver) == (
                    info.nar_hash, info.nar_size, info.references, info.deriver,
                )  # fmt: skip
        data = Path(str(dep1), "data")
        a_copy = Path(str(published["a_store"]), os.path.basename(str(dep1)), "data")
        assert data.read_bytes() == a_copy.read_bytes()
        assert os.readlink(Path(str(dep1), "link")) == "bin/run"
        assert os.stat(Path(str(dep1), "bin", "run")).st_mode & 0o777 == 0o555
        # The narinfo cache is upstream's file format, in <state>/substitute/cache.
        cache = Path(b.env["GUIX_STATE_DIRECTORY"], "substitute", "cache")
        entries = list(cache.rglob(os.path.basename(str(top))[:32]))
        assert entries and entries[0].read_text().startswith("(narinfo (version 2)")
    finally:
        stop_node(b)


def test_substitutable_path_infos(published: dict[str, object]) -> None:
    from guixsvc.protocol.ops import Op
    from guixsvc.protocol.wire import encode_strings

    b = node_b(published, str(published["url"]), authorise=True)
    top, dep1, dep2 = published["top"], published["dep1"], published["dep2"]
    try:
        with b.client() as c:
            c.call(Op.QUERY_SUBSTITUTABLE_PATH_INFOS, encode_strings([top]))  # type: ignore[list-item]
            assert c.read_int() == 1
            assert c.read_string() == top
            assert c.read_string() == ""  # deriver
            assert sorted(c.read_strings()) == sorted([dep1, dep2])
            c.read_int()  # download size (unknown without --cache: 0)
            assert c.read_int() == published["infos"][top].nar_size  # type: ignore[index]
    finally:
        stop_node(b)


def test_unauthorised_key_is_refused(published: dict[str, object]) -> None:
    b = node_b(published, str(published["url"]), authorise=False)
    try:
        with b.client() as c:
            assert not c.has_substitutes(published["top"])  # type: ignore[arg-type]
            with pytest.raises(DaemonError, match="does not exist and cannot be created"):
                c.ensure_path(published["top"])  # type: ignore[arg-type]
        assert_nothing_registered(b, published)
    finally:
        stop_node(b)


def test_no_substitutes_flag(published: dict[str, object]) -> None:
    b = node_b(published, str(published["url"]), authorise=True)
    try:
        with b.client() as c:
            c.set_options(use_substitutes=False)
            assert not c.has_substitutes(published["top"])  # type: ignore[arg-type]
            with pytest.raises(DaemonError):
                c.ensure_path(published["top"])  # type: ignore[arg-type]
        assert_nothing_registered(b, published)
    finally:
        stop_node(b)


class _Mirror:
    """A copy of A's narinfos and uncompressed nars, served over HTTP, for tampering."""

    def __init__(self, published: dict[str, object], name: str) -> None:
        self.dir = published["base"] / name  # type: ignore[operator]
        (self.dir / "nar").mkdir(parents=True)
        for p in (published["dep1"], published["dep2"], published["top"]):
            item = os.path.basename(str(p))
            with urllib.request.urlopen(f"{published['url']}/{item[:32]}.narinfo") as r:
                text = r.read().decode()
            signed, _, rest = text.partition("Signature:")
            sig_line = "Signature:" + rest.split("\n", 1)[0] + "\n"
            text = signed + sig_line + f"URL: nar/{item}\nCompression: none\n"
            (self.dir / f"{item[:32]}.narinfo").write_text(text)
            with urllib.request.urlopen(f"{published['url']}/nar/{item}") as r:
                (self.dir / "nar" / item).write_bytes(r.read())
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(self.dir))
        handler.log_message = lambda *a: None  # type: ignore[attr-defined]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def narinfo(self, path: object) -> Path:
        return self.dir / f"{os.path.basename(str(path))[:32]}.narinfo"

    def nar(self, path: object) -> Path:
        return self.dir / "nar" / os.path.basename(str(path))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_mirror_untampered_works(published: dict[str, object]) -> None:
    """The mirror itself is fine (so the tampering tests below fail for the right reason)."""
    m = _Mirror(published, "mirror-ok")
    b = node_b(published, m.url, authorise=True)
    try:
        with b.client() as c:
            c.ensure_path(published["top"])  # type: ignore[arg-type]
            assert c.is_valid_path(published["top"])  # type: ignore[arg-type]
    finally:
        stop_node(b)
        m.close()


@pytest.mark.parametrize("what", ["nar-content", "nar-truncated", "narinfo-size", "narinfo-refs"])
def test_tampering_is_refused(published: dict[str, object], what: str) -> None:
    m = _Mirror(published, f"mirror-{what}")
    dep1 = published["dep1"]
    if what == "nar-content":
        nar = bytearray(m.nar(dep1).read_bytes())
        nar[len(nar) // 2] ^= 0x01  # inside the random file's contents
        m.nar(dep1).write_bytes(bytes(nar))
    elif what == "nar-truncated":
        nar = m.nar(dep1).read_bytes()
        m.nar(dep1).write_bytes(nar[: len(nar) - 200])
    elif what == "narinfo-size":
        text = m.narinfo(dep1).read_text()
        size = published["infos"][dep1].nar_size  # type: ignore[index]
        m.narinfo(dep1).write_text(text.replace(f"NarSize: {size}", f"NarSize: {size + 8}"))
    else:
        top = published["top"]
        text = m.narinfo(top).read_text()
        m.narinfo(top).write_text(text.replace("References: ", "References: " + "1" * 32 + "-x "))
    b = node_b(published, m.url, authorise=True)
    try:
        with b.client() as c, pytest.raises(DaemonError, match="cannot be created"):
            c.ensure_path(published["top"])  # type: ignore[arg-type]
        assert_nothing_registered(b, published)
    finally:
        stop_node(b)
        m.close()


@pytest.mark.parametrize("compression", ["none", "gzip", "lzip", "zstd"])
def test_each_compression_round_trips(published: dict[str, object], compression: str) -> None:
    """Narinfos whose (unsigned) download lines point at one compression of A's server."""
    m = _Mirror(published, f"mirror-c-{compression}")
    for p in (published["dep1"], published["dep2"], published["top"]):
        item = os.path.basename(str(p))
        text = m.narinfo(p).read_text()
        head = text[: text.index("URL: ")]
        prefix = "nar" if compression == "none" else f"nar/{compression}"
        m.narinfo(p).write_text(
            head + f"URL: {published['url']}/{prefix}/{item}\nCompression: {compression}\n"
        )
    b = node_b(published, m.url, authorise=True)
    try:
        with b.client() as c:
            c.ensure_path(published["top"])  # type: ignore[arg-type]
            got = c.query_path_info(published["dep1"])  # type: ignore[arg-type]
            assert got.nar_hash == published["infos"][published["dep1"]].nar_hash  # type: ignore[index]
    finally:
        stop_node(b)
        m.close()
