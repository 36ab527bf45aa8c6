"""The builder's environment and build directory names (spec/build-env.md §4, §5).

Kept apart from the process set-up so the exact variable list, which derivations and clients
depend on, is in one place and easy to test.
"""

from __future__ import annotations

import os

from guixsvc.store.derivation import Derivation

HOMELESS = "/homeless-shelter"


def is_fixed_output_build(drv: Derivation) -> bool:
    """The build machinery's notion: every output has a hash (spec/store.md §7)."""
    return bool(drv.outputs) and all(o.hash for o in drv.outputs.values())


def build_dir_name(drv_base_name: str) -> str:
    """`guix-build-<name>.drv`: the build directory prefix for a .drv base name."""
    return "guix-build-" + drv_base_name.split("-", 1)[1]


def create_build_dir(drv_base_name: str, tmp_root: str | None = None) -> str:
    """Create `<T>/guix-build-<name>.drv-<n>` (mode 0700) for the first free n."""
    root = tmp_root or os.environ.get("TMPDIR") or "/tmp"
    prefix = os.path.join(root, build_dir_name(drv_base_name))
    n = 0
    while True:
        candidate = f"{prefix}-{n}"
        try:
            os.mkdir(candidate, 0o700)
        except FileExistsError:
            n += 1
            continue
        os.chmod(candidate, 0o700)
        os.chown(candidate, -1, os.getegid())
        return candidate


def builder_environment(
    drv: Derivation,
    *,
    store_dir: str,
    cores: int,
    build_dir: str,
    daemon_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The variables the builder gets, in upstream's order (nothing else is inherited)."""
    env: dict[str, str] = {
        "PATH": "/path-not-set",
        "HOME": HOMELESS,
        "NIX_STORE": store_dir,
        "NIX_BUILD_CORES": str(cores),
    }
    env.update(drv.env)
    for name in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[name] = build_dir
    if is_fixed_output_build(drv):
        source = os.environ if daemon_env is None else daemon_env
        for name in drv.env.get("impureEnvVars", "").split():
            env[name] = source.get(name, "")
    return env
