"""ExportPath / ImportPaths: signed archives from an authorised key import, anything else is
refused with nothing registered (spec/worker-protocol.md §6.10, §6.17)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from guixsvc.pki import keys
from guixsvc.protocol.client import DaemonError
from guixsvc.protocol.wire import encode_int
from tests.conftest import Daemon, start_daemon, stop_daemon


@pytest.fixture
def exported(tmp_path: Path) -> dict[str, object]:
    """Make a 2-item closure in store A, export it (signed and unsigned), then move A away so a
    fresh daemon B can use the very same store directory."""
    root = tmp_path / "node"
    root.mkdir()
    (root / "etc").mkdir()
    keys.generate_key_files(str(root / "etc"))
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_bytes(os.urandom(50_000))
    a = start_daemon(root)
    try:
        with a.client() as c:
            dep = c.add_to_store("dep", str(tmp_path / "tree"))
            top = c.add_text_to_store("top", "uses " + dep, [dep])
            infos = {p: c.query_path_info(p) for p in (dep, top)}
            signed = b"".join(c.export_paths([dep, top], sign=True))
            unsigned = b"".join(c.export_paths([dep, top], sign=False))
    finally:
        stop_daemon(a)
    public = (root / "etc" / "signing-key.pub").read_bytes()
    shutil.move(str(root), str(tmp_path / "old-node"))
    return {
        "root": root, "dep": dep, "top": top, "infos": infos, "signed": signed,
        "unsigned": unsigned, "public": public, "old": tmp_path / "old-node",
    }  # fmt: skip


def fresh_daemon(exported: dict[str, object], authorise: bool) -> Daemon:
    root = exported["root"]
    assert isinstance(root, Path)
    (root / "etc").mkdir(parents=True)
    if authorise:
        acl = keys.Acl()
        acl.add(exported["public"])  # type: ignore[arg-type]
        acl.save(str(root / "etc" / "acl"))
    return start_daemon(root)


def test_signed_closure_from_authorised_key_imports(exported: dict[str, object]) -> None:
    b = fresh_daemon(exported, authorise=True)
    try:
        with b.client() as c:
            imported = c.import_paths(io.BytesIO(exported["signed"]))  # type: ignore[arg-type]
            assert imported == [exported["dep"], exported["top"]]
            for path, info in exported["infos"].items():  # type: ignore[union-attr]
                got = c.query_path_info(path)
                assert (got.nar_hash, got.nar_size, got.references) == (
                    info.nar_hash, info.nar_size, info.references,
                )  # fmt: skip
            # Importing again is harmless and reports the same paths.
            again = c.import_paths(io.BytesIO(exported["signed"]))  # type: ignore[arg-type]
            assert again == imported
        old = exported["old"]
        dep = str(exported["dep"])
        rel = os.path.relpath(dep, str(exported["root"]))
        assert Path(dep, "file").read_bytes() == Path(old, rel, "file").read_bytes()  # type: ignore[arg-type]
    finally:
        stop_daemon(b)


@pytest.mark.parametrize("case", ["unauthorised", "unsigned", "tampered", "truncated"])
def test_refused_archives_register_nothing(exported: dict[str, object], case: str) -> None:
    data: bytes = exported["unsigned" if case == "unsigned" else "signed"]  # type: ignore[assignment]
    if case == "tampered":
        i = data.index(b"contents") + 100  # a byte of the first file's contents
        data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    if case == "truncated":
        data = data[: len(data) // 3]
    b = fresh_daemon(exported, authorise=case != "unauthorised")
    try:
        with b.client() as c:
            expected = {
                "unauthorised": "unauthorized public key",
                "unsigned": "lacks a signature",
                "tampered": "signed hash doesn't match",
                "truncated": "unexpected end-of-file",
            }[case]
            with pytest.raises(DaemonError, match=expected):
                c.import_paths(io.BytesIO(data))
            assert c.query_all_valid_paths() == []
            assert c.is_valid_path(c.add_text_to_store("after", b"session goes on"))
        store = b.store_dir
        leftovers = [n for n in os.listdir(store) if n.startswith("nix-")]
        assert leftovers == []
    finally:
        stop_daemon(b)


def test_bad_stream_marker(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(DaemonError, match="nix-store --export"):
            c.import_paths(io.BytesIO(encode_int(7)))
        assert c.import_paths(io.BytesIO(encode_int(0))) == []


def test_export_signing_needs_a_secret_key(daemon: Daemon) -> None:
    with daemon.client() as c:
        p = c.add_text_to_store("x", b"x")
        with pytest.raises(DaemonError, match=r"signing-key\.sec"):
            c.export_path(p, sign=True)
        assert c.export_path(p, sign=False).endswith(encode_int(0))
