"""DerivedPath: the BuildPaths item syntax `PATH` / `DRV!OUT1,OUT2` (upstream
`parseDrvPathWithOutputs`), parsed once into a typed value."""

from __future__ import annotations

import pytest

from guixsvc.store.derived_path import DerivedPath
from guixsvc.store.paths import InvalidStorePath, StoreDir

GNU = StoreDir("/gnu/store")
DRV = "/gnu/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-foo.drv"
SRC = "/gnu/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-foo"


@pytest.mark.parametrize("text", [SRC, DRV, f"{DRV}!out", f"{DRV}!dev,out", f"{DRV}!a,b,doc"])
def test_round_trip(text: str) -> None:
    assert str(DerivedPath.parse(text, GNU)) == text
    assert DerivedPath.parse(str(DerivedPath.parse(text))) == DerivedPath.parse(text)


def test_fields() -> None:
    d = DerivedPath.parse(f"{DRV}!out,dev", GNU)
    assert d == DerivedPath(DRV, frozenset({"out", "dev"}))
    assert d.is_derivation
    assert str(d) == f"{DRV}!dev,out"  # outputs in sorted order
    s = DerivedPath.parse(SRC, GNU)
    assert s == DerivedPath(SRC) and s.outputs is None and not s.is_derivation
    assert hash(d) == hash(DerivedPath(DRV, frozenset({"dev", "out"})))


def test_empty_output_names_dropped() -> None:
    """As upstream's `tokenizeString`: `DRV!` and `DRV!,` want every output."""
    assert DerivedPath.parse(f"{DRV}!") == DerivedPath(DRV)
    assert DerivedPath.parse(f"{DRV}!,") == DerivedPath(DRV)
    assert DerivedPath.parse(f"{DRV}!a,,b").outputs == {"a", "b"}
    assert str(DerivedPath.parse(f"{DRV}!")) == DRV


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("/tmp/foo.drv!out", "/tmp/foo.drv"),
        ("foo", "foo"),
        ("", ""),
        ("!out", ""),
        ("/gnu/store/!out", "/gnu/store/"),
        ("/gnu/store/a/b.drv", "/gnu/store/a/b.drv"),
    ],
)
def test_not_in_the_store(text: str, path: str) -> None:
    """Upstream `assertStorePath` on the path part: "path `X' is not in the store"."""
    with pytest.raises(InvalidStorePath, match=f"^path `{path}' is not in the store$"):
        DerivedPath.parse(text, GNU)
    DerivedPath.parse(text)  # without a store directory, no check
