"""Narinfo parsing, signing and selection rules (spec/substitutes.md §5-§7), including the
signed example of §5.4 made with libgcrypt."""

from __future__ import annotations

import hashlib

from guixsvc.pki import keys
from guixsvc.store import base32
from guixsvc.store.narinfo import (
    best_entries,
    equivalent,
    nar_url,
    parse_narinfo,
    render_narinfo,
    select_hit,
    uri_encode,
)

SPEC_Q = "2E458669F1DBD153A8822B82D317042EC2804A69A684FFDC9ECCA8709BAE51C4"
SPEC_D = "474189E50BC895EF462F3ADB0FA410E9653871691C34213B26FE1443A31F4298"
SPEC_SIG = (
    "KHNpZ25hdHVyZSAKIChkYXRhIAogIChmbGFncyByZmM2OTc5KQogIChoYXNoIHNoYTI1NiAjMDVBMkI1RDRBOERFNzZG"
    "MjAzNDZBMkY3RUEyREQ4RjUyNkNENEUxODNGNTRFMDk1QkQ1NkUwQzZDODFERkEwNiMpCiAgKQogKHNpZy12YWwgCiAg"
    "KGVjZHNhIAogICAociAjQzYzNTRGRUQwNEY1RkZENjkzNTcwODFDRkVFRjVCRTA1MzI1NzY2NjFBNDQxRkUzN0Q1MDlG"
    "M0Y3MjQxMjcjKQogICAocyAjMDhGNDQ1MTlCNEYyQzRCQ0ZBQUFFMEQ5NkUyOTYzQjdDRjYwNjQ3RUZDNThERDZDNDkw"
    "OUM3OTlDNDREN0ExNyMpCiAgICkKICApCiAocHVibGljLWtleSAKICAoZWNjIAogICAoY3VydmUgRWQyNTUxOSkKICAg"
    "KHEgIzJFNDU4NjY5RjFEQkQxNTNBODgyMkI4MkQzMTcwNDJFQzI4MDRBNjlBNjg0RkZEQzlFQ0NBODcwOUJBRTUxQzQj"
    "KQogICApCiAgKQogKQo="
)
H = "0123456789abcdfghijklmnpqrsvwxyz"
SPEC_SIGNED = (
    f"StorePath: /gnu/store/{H}-hello-2.12\n"
    f"URL: nar/gzip/{H}-hello-2.12\nCompression: gzip\nFileSize: 51234\n"
    f"URL: nar/zstd/{H}-hello-2.12\nCompression: zstd\nFileSize: 50000\n"
    "NarHash: sha256:1ir53nicssdw1fjl2jdl6ry3llgdpgan0scc9z8rlgx89anwbahw\n"
    "NarSize: 204336\n"
    f"References: {H}-hello-2.12 1123456789abcdfghijklmnpqrsvwxyz-glibc-2.35\n"
    "Deriver: 2223456789abcdfghijklmnpqrsvwxyz-hello-2.12.drv\n"
)


def spec_key() -> tuple[keys.Key, keys.Key]:
    q, d = bytes.fromhex(SPEC_Q), bytes.fromhex(SPEC_D)
    curve = (b"curve", b"Ed25519")
    return (
        keys.Key((b"public-key", (b"ecc", curve, (b"q", q)))),
        keys.Key((b"private-key", (b"ecc", curve, (b"q", q), (b"d", d)))),
    )


def test_spec_example_verifies_and_parses() -> None:
    public, _ = spec_key()
    body = (SPEC_SIGNED + f"Signature: 1;myhost;{SPEC_SIG}\n").encode()
    info = parse_narinfo(body, "https://example.org")
    assert hashlib.sha256(SPEC_SIGNED.encode()).hexdigest().startswith("05a2b5d4")
    assert info.is_valid(keys.Acl([public]))
    assert not info.is_valid(keys.Acl())
    assert [(e.url, e.compression, e.file_size) for e in info.entries] == [
        (f"https://example.org/nar/gzip/{H}-hello-2.12", "gzip", 51234),
        (f"https://example.org/nar/zstd/{H}-hello-2.12", "zstd", 50000),
    ]
    assert best_entries(info)[0].compression == "zstd"  # smaller FileSize first
    assert info.deriver == "2223456789abcdfghijklmnpqrsvwxyz-hello-2.12.drv"
    tampered = parse_narinfo(body.replace(b"NarSize: 204336", b"NarSize: 204337"), "")
    assert not tampered.is_valid(keys.Acl([public]))


def test_render_round_trip_and_layouts() -> None:
    public, secret = spec_key()
    common = dict(
        path=f"/gnu/store/{H}-gtk+-3",
        nar_hash=bytes(32),
        nar_size=120,
        references=[f"/gnu/store/{H}-gtk+-3"],
        deriver=None,
        compressions=[("lzip", None), ("none", 120)],
        secret_key=secret,
        public_key=public,
        host="h",
    )
    new = render_narinfo(**common)  # type: ignore[arg-type]
    text = new.decode()
    assert text.startswith(
        f"StorePath: /gnu/store/{H}-gtk+-3\nNarHash: sha256:{base32.encode(bytes(32))}\n"
        f"NarSize: 120\nReferences: {H}-gtk+-3\nSignature: 1;h;"
    )
    assert text.endswith(
        f"URL: nar/lzip/{H}-gtk%2B-3\nCompression: lzip\nURL: nar/{H}-gtk%2B-3\n"
        "Compression: none\nFileSize: 120\n"
    )
    assert "Deriver" not in text
    acl = keys.Acl([public])
    assert parse_narinfo(new, "http://x/").is_valid(acl)
    old = render_narinfo(**common, sign_downloads=True)  # type: ignore[arg-type]
    assert old.decode().index("URL:") < old.decode().index("NarHash:")
    assert parse_narinfo(old, "http://x").is_valid(acl)


def test_file_size_zip_truncates_like_upstream() -> None:
    body = b"StorePath: /gnu/store/x\nURL: a\nCompression: none\nFileSize: 5\nURL: b\nCompression: gzip\nNarHash: sha256:0\nReferences: \n"  # noqa: E501
    info = parse_narinfo(body, "http://c")
    assert [(e.url, e.compression) for e in info.entries] == [("http://c/a", "none")]


def test_equivalent_rule() -> None:
    public, secret = spec_key()
    args = dict(path=f"/gnu/store/{H}-x", nar_hash=bytes(32), nar_size=8, references=[],
                deriver=None, compressions=[("gzip", None)], secret_key=secret,
                host="h")  # fmt: skip
    signed = parse_narinfo(render_narinfo(**args), "http://signed")  # type: ignore[arg-type]
    unsigned_text = (
        signed.contents.split(b"Signature:")[0] + b"URL: nar/gzip/x\nCompression: gzip\n"
    )
    unsigned = parse_narinfo(unsigned_text, "http://mirror")
    other = parse_narinfo(unsigned_text.replace(b"NarSize: 8", b"NarSize: 9"), "http://evil")
    acl = keys.Acl([public])
    assert equivalent(unsigned, signed) and not equivalent(other, signed)
    # First equivalent narinfo in server order wins, even unsigned; a lone unsigned one loses.
    assert select_hit([unsigned, signed], acl) is unsigned
    assert select_hit([other, signed], acl) is signed
    assert select_hit([unsigned], acl) is None
    assert select_hit([signed], keys.Acl()) is None


def test_uri_encoding() -> None:
    assert uri_encode("gtk+-3.24 ~_.") == "gtk%2B-3.24%20~_."
    assert nar_url(("a", "b"), "none", "x+y") == "a/b/x%2By"
