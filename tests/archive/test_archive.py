"""`guixsvc archive`: key generation, --authorize, --list/--extract on nars, --missing,
--export/--import (spec/cli.md §3, substitutes.md §8)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from guixsvc.pki import keys
from guixsvc.store import nar
from tests.conftest import Daemon


def archive(
    env: dict[str, str], *args: str, data: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "guixsvc.cli", "archive", *args], input=data,
                          capture_output=True, env=env, timeout=60)  # fmt: skip


def conf_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, GUIX_CONFIGURATION_DIRECTORY=str(tmp_path / "etc"),
                NIX_STORE_DIR=str(tmp_path / "store"))  # fmt: skip


def test_generate_key_and_authorize(tmp_path: Path) -> None:
    env = conf_env(tmp_path)
    r = archive(env, "--generate-key")
    assert r.returncode == 0, r.stderr
    pub, sec = tmp_path / "etc" / "signing-key.pub", tmp_path / "etc" / "signing-key.sec"
    assert stat.S_IMODE(pub.stat().st_mode) == 0o444
    assert stat.S_IMODE(sec.stat().st_mode) == 0o400
    assert pub.read_text().startswith("(public-key \n (ecc \n  (curve Ed25519)\n  (q #")
    r = archive(env, "--generate-key")
    assert r.returncode == 1
    assert f"key pair exists under '{tmp_path / 'etc'}'; remove it first" in r.stderr.decode()
    other_pub, _ = keys.generate_key_pair()
    for _ in range(2):
        r = archive(env, "--authorize", data=other_pub)
        assert r.returncode == 0, r.stderr
    acl = keys.Acl.load(tmp_path / "etc" / "acl")
    # The ACL was created with the machine's own key, then the new key was put first, once.
    assert len(acl) == 2 and acl.authorizes(other_pub) and acl.authorizes(pub.read_bytes())
    r = archive(env, "--authorize", data=b"(private-key (ecc))")
    assert r.returncode == 1 and b"s-expression does not denote a public key" in r.stderr
    r = archive(env, "--authorize", data=b"(public-key")
    assert r.returncode == 1 and b"failed to read public key: " in r.stderr
    r = archive(env)
    assert r.returncode == 1
    assert b"either '--export' or '--import' must be specified" in r.stderr


def test_list_and_extract(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "README").write_bytes(b"hi")
    (tree / "bin" / "hello").write_bytes(b"abc")
    os.chmod(tree / "bin" / "hello", 0o755)
    os.symlink("bin/hello", tree / "link")
    data = b"".join(nar.dump(tree))
    env = conf_env(tmp_path)
    r = archive(env, "--list", data=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == (
        "D \n"
        f"r {'/README':<60} {2:>10} B\n"
        "D /bin\n"
        f"x {'/bin/hello':<60} {3:>10} B\n"
        "S /link -> bin/hello\n"
    )
    r = archive(env, "-x", str(tmp_path / "out"), data=data)
    assert r.returncode == 0, r.stderr
    assert b"".join(nar.dump(tmp_path / "out")) == data
    r = archive(env, "--list", data=data[:-16])
    assert r.returncode == 1


def test_missing_export_import(daemon: Daemon, tmp_path: Path) -> None:
    env = dict(daemon.env, GUIX_DAEMON_SOCKET=daemon.socket)
    assert archive(env, "--generate-key").returncode == 0
    with daemon.client() as c:
        a = c.add_text_to_store("a", "aaa", [])
        b = c.add_text_to_store("b", a, [a])
    absent = f"{daemon.store_dir}/{'0' * 32}-x"
    r = archive(env, "--missing", data=f"{a}\n{absent}\n{b}\n".encode())
    assert r.returncode == 0 and r.stdout.decode() == f"{absent}\n"
    r = archive(env, "--export", "-r", b)
    assert r.returncode == 0, r.stderr
    bundle = r.stdout
    # a (the reference) comes before b; both are in the bundle, signed.
    from guixsvc.protocol.ops import EXPORT_MAGIC
    from guixsvc.protocol.wire import encode_int, encode_string

    def trailer(p: str) -> int:
        return bundle.index(encode_int(EXPORT_MAGIC) + encode_string(p))

    assert trailer(a) < trailer(b)
    r = archive(env, "--import", data=bundle)
    assert r.returncode == 0, r.stderr
