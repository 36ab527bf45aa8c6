"""Narinfos: the signed text that describes one substitute, written and read like upstream.

``guix publish`` writes them (``narinfo-string`` in ``guix/scripts/publish.scm``) and ``guix
substitute`` reads them (``read-narinfo``, ``valid-narinfo?``, ``equivalent-narinfo?``,
``narinfo-best-uri`` in ``guix/narinfo.scm``).  Both our server and our daemon's substituter
must agree byte for byte with those procedures, so every rule lives here once
(spec/substitutes.md §5-§7).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from guixsvc.pki import keys
from guixsvc.store import base32

__all__ = [
    "COMPRESSIONS",
    "NarEntry",
    "Narinfo",
    "NarinfoError",
    "best_entries",
    "equivalent",
    "nar_url",
    "parse_narinfo",
    "render_narinfo",
    "select_hit",
    "uri_encode",
]

#: Compressions ``guix publish`` can produce, besides ``none``.
COMPRESSIONS = ("gzip", "lzip", "zstd")

#: Compressions ``guix substitute`` can decompress (``%compression-methods``); ours too.
SUPPORTED_DOWNLOAD = frozenset({"gzip", "lzip", "zstd", "xz", "bzip2", "none"})

_MULTI = frozenset({"URL", "Compression", "FileSize", "FileHash"})


class NarinfoError(ValueError):
    """A narinfo that ``read-narinfo`` would not turn into a record."""


@dataclass(frozen=True)
class NarEntry:
    """One way to download the nar: its URL (absolute), compression and compressed size."""

    url: str
    compression: str
    file_size: int | None


@dataclass
class Narinfo:
    """A parsed narinfo.  ``references`` and ``deriver`` are base names, as in the text."""

    store_path: str
    nar_hash: str  # "" when the narinfo has no NarHash
    nar_size: int | None
    references: list[str]
    deriver: str | None
    entries: list[NarEntry]
    system: str | None
    signature: str | None
    contents: bytes
    cache_url: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def signature_status(self, acl: keys.Acl) -> keys.SignatureStatus:
        """``%signature-status`` of this narinfo's text against ``acl``."""
        return keys.verify_narinfo_signature(self.contents, acl)

    def is_valid(self, acl: keys.Acl) -> bool:
        """``valid-narinfo?``."""
        return self.signature_status(acl) is keys.SignatureStatus.VALID

    @property
    def hash_part(self) -> str:
        base = self.store_path.rsplit("/", 1)[-1]
        return base[:32]


# --- writing --------------------------------------------------------------------------------


def uri_encode(text: str) -> str:
    """Guile's ``uri-encode``: every UTF-8 byte outside ``A-Za-z0-9-._~`` becomes ``%XX``."""
    return quote(text, safe="")


def nar_url(nar_path: Sequence[str], compression: str, base_name: str) -> str:
    """The relative URL of a nar, as ``encode-and-join-uri-path`` builds it."""
    parts = [*nar_path, *(() if compression == "none" else (compression,)), base_name]
    return "/".join(uri_encode(p) for p in parts)


def render_narinfo(
    *,
    path: str,
    nar_hash: bytes,
    nar_size: int,
    references: Iterable[str],
    deriver: str | None,
    compressions: Sequence[tuple[str, int | None]],
    nar_path: Sequence[str] = ("nar",),
    secret_key: keys.Key,
    public_key: keys.Key | None = None,
    host: str | None = None,
    sign_downloads: bool = False,
) -> bytes:
    """The narinfo of ``path`` (a full store file name) as ``guix publish`` writes it.

    ``nar_hash`` is the SHA-256 digest, ``references`` / ``deriver`` full store file names
    (``references`` in the daemon's order, which is byte order), ``compressions`` a list of
    ``(type, file_size or None)`` in ``-C`` order.  The newer layout is used: the signed part
    is StorePath..Deriver, then ``Signature:``, then the URL/Compression/FileSize groups (so
    sizes known only after baking need no new signature).  ``sign_downloads=True`` gives the
    2022 layout, where those groups come before NarHash and are signed.
    """
    base = path.rsplit("/", 1)[-1]
    refs = " ".join(r.rsplit("/", 1)[-1] for r in references)
    head = [f"StorePath: {path}\n"]
    groups = []
    for compression, size in compressions:
        groups.append(f"URL: {nar_url(nar_path, compression, base)}\n")
        groups.append(f"Compression: {compression}\n")
        if size is not None:
            groups.append(f"FileSize: {size}\n")
    body = [
        f"NarHash: sha256:{base32.encode(nar_hash)}\n",
        f"NarSize: {nar_size}\n",
        f"References: {refs}\n",
    ]
    if deriver:
        body.append(f"Deriver: {deriver.rsplit('/', 1)[-1]}\n")
    if sign_downloads:
        signed = "".join(head + groups + body)
        tail = ""
    else:
        signed = "".join(head + body)
        tail = "".join(groups)
    sig = keys.narinfo_signature(secret_key, signed, public_key=public_key, host=host)
    return (signed + f"Signature: {sig}\n" + tail).encode("utf-8")


# --- reading --------------------------------------------------------------------------------


def _recutils(text: str) -> list[tuple[str, str]]:
    """``recutils->alist`` on the first record (raises NarinfoError on a bad line)."""
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line:
            if fields:
                break
            continue
        first = line[0]
        if first.isalpha() or first == "%":
            name, colon, value = line.partition(":")
            if not colon:
                raise NarinfoError(f"invalid line: {line!r}")
            fields.append((name, value.lstrip()))
        elif first == "#":
            continue
        elif first == "+" and fields:
            rest = line[2:] if line.startswith("+ ") else line[1:]
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + rest)
        else:
            raise NarinfoError(f"invalid line: {line!r}")
    return fields


_NUMBER = re.compile(r"[+-]?[0-9]+")


def _number(text: str | None) -> int | None:
    """``string->number`` restricted to integers (what sizes are); None otherwise."""
    if text is None or not _NUMBER.fullmatch(text):
        return None
    return int(text)


def _resolve(url: str, cache_url: str) -> str:
    """An absolute URI stays; a relative one is appended to the cache URL."""
    parts = urlsplit(url)
    if parts.scheme and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme):
        return url
    return cache_url + url if cache_url.endswith("/") else f"{cache_url}/{url}"


def parse_narinfo(body: bytes, cache_url: str = "") -> Narinfo:
    """``read-narinfo``: parse a narinfo body fetched from ``cache_url``.

    No authentication here: see :meth:`Narinfo.signature_status` and :func:`select_hit`.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NarinfoError(f"narinfo is not UTF-8: {exc}") from None
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {name: [] for name in _MULTI}
    for name, value in _recutils(text):
        if name in _MULTI:
            multi[name].append(value)
        else:
            single.setdefault(name, value)
    store_path = single.get("StorePath")
    if store_path is None:
        raise NarinfoError("narinfo lacks StorePath")
    # `read-narinfo` takes a narinfo without NarHash (the item is substitutable; fetching it
    # then fails the hash check): "" here.
    nar_hash = single.get("NarHash", "")
    urls = multi["URL"]
    sizes: list[int | None] = (
        [_number(s) for s in multi["FileSize"]] if multi["FileSize"] else [None] * len(urls)
    )
    entries = [
        NarEntry(_resolve(u, cache_url), c, s)
        for u, c, s in zip(urls, multi["Compression"], sizes, strict=False)
    ]
    deriver = single.get("Deriver") or None
    return Narinfo(
        store_path=store_path,
        nar_hash=nar_hash,
        nar_size=_number(single.get("NarSize")),
        references=single.get("References", "").split(),
        deriver=deriver,
        entries=entries,
        system=single.get("System"),
        signature=single.get("Signature"),
        contents=body,
        cache_url=cache_url,
        fields=single,
    )


# --- choosing -------------------------------------------------------------------------------


def equivalent(a: Narinfo, b: Narinfo) -> bool:
    """``equivalent-narinfo?``: same NarHash, StorePath, References (in order), NarSize."""
    return (
        a.nar_hash == b.nar_hash
        and a.store_path == b.store_path
        and a.references == b.references
        and a.nar_size == b.nar_size
    )


def select_hit(candidates: Sequence[Narinfo], acl: keys.Acl) -> Narinfo | None:
    """``select-hit``: given one path's narinfos in server order, the one to use, or None.

    The last authorised narinfo decides what the item is; the first narinfo (in server order)
    equivalent to it is returned, whoever signed it.
    """
    authorised = [n for n in candidates if n.is_valid(acl)]
    if not authorised:
        return None
    reference = authorised[-1]
    return next(n for n in candidates if equivalent(n, reference))


_RATIO_RANK = {"lzip": 0, "zstd": 1, "xz": 1, "bzip2": 1, "gzip": 2, "none": 3}
_SPEED_RANK = {"none": 0, "zstd": 0, "gzip": 1, "lzip": 2, "xz": 2, "bzip2": 2}


def best_entries(
    info: Narinfo,
    *,
    fast_decompression: bool = False,
    supported: frozenset[str] = SUPPORTED_DOWNLOAD,
) -> list[NarEntry]:
    """The supported download entries, best first (``narinfo-best-uri`` as a total order:
    known sizes smallest first, then by compression ratio; or by decompression speed)."""
    choices = [e for e in info.entries if e.compression in supported]
    if fast_decompression:
        return sorted(choices, key=lambda e: _SPEED_RANK.get(e.compression, 3))
    return sorted(
        choices,
        key=lambda e: (
            e.file_size is None,
            e.file_size or 0,
            _RATIO_RANK.get(e.compression, 1),
        ),
    )
