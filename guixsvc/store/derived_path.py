"""The items of BuildPaths: a store path, or a derivation and some of its outputs.

The worker protocol sends them as strings, `PATH` or `DRV!OUT1,OUT2` (upstream
`DrvPathWithOutputs`, parsed by `parseDrvPathWithOutputs` in nix/libstore/misc.cc).  They are
parsed here once, into a typed value, instead of by a `"!"` split wherever one is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from guixsvc.store.paths import StoreDir


@dataclass(frozen=True)
class DerivedPath:
    """`path`, and for a derivation the outputs wanted (None: all of them).

    As upstream's `tokenizeString`, empty output names are dropped, so `DRV!` wants every
    output, like `DRV`."""

    path: str
    outputs: frozenset[str] | None = None

    @classmethod
    def parse(cls, text: str, store_dir: StoreDir | None = None) -> DerivedPath:
        """Parse the wire form; with `store_dir`, the path must be directly in that store
        (upstream `assertStorePath`: InvalidStorePath, "path `X' is not in the store")."""
        path, bang, names = text.partition("!")
        if store_dir is not None:
            store_dir.parse_lax(path)
        wanted = frozenset(n for n in names.split(",") if n) if bang else frozenset()
        return cls(path, wanted or None)

    @property
    def is_derivation(self) -> bool:
        """Upstream `isDerivation`: the name ends with `.drv`."""
        return self.path.endswith(".drv")

    def __str__(self) -> str:
        if not self.outputs:
            return self.path
        return f"{self.path}!{','.join(sorted(self.outputs))}"
