"""What happens to a build's outputs: checks, canonicalisation, references, registration.

Upstream `DerivationGoal::registerOutputs` (spec/build-env.md §9.2, §11): outputs are moved out
of the chroot, checked (permissions, fixed-output hashes), given canonical metadata, scanned
for references to the build's input closure while their NAR hash is computed, compared between
rounds or against the registered item in check mode, and finally registered together with
their deriver in one database transaction.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable

from guixsvc.store import base32
from guixsvc.store.canonical import CanonicalisationError, canonicalise
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.derivation import Derivation, DerivationError
from guixsvc.store.hashes import new_hasher
from guixsvc.store.nar import hash_path
from guixsvc.store.references import scan_path


class BuildError(Exception):
    """A build failed or its output was rejected: the goal fails, the worker goes on."""


class NotDeterministic(BuildError):
    pass


def show_paths(paths: Iterable[str]) -> str:
    """Upstream `showPaths`: `` `a', `b' ``."""
    return ", ".join(f"`{p}'" for p in sorted(paths))


def _print_hash(algo: str, digest: bytes) -> str:
    """`printHash16or32`: base16 for md5, nix-base32 otherwise."""
    return digest.hex() if algo == "md5" else base32.encode(digest)


def hash_file(algo: str, path: str) -> bytes:
    h = new_hasher(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
    return h.digest()


def check_permissions(path: str, build_uid: int | None) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (
        build_uid is not None and st.st_uid != build_uid
    ):
        raise BuildError(
            f"suspicious ownership or permission on `{path}'; rejecting this build output"
        )


def check_fixed_output(
    drv: Derivation, name: str, path: str, actual: str, trace: Callable[[str], None] | None
) -> None:
    """Verify a fixed output's content hash (flat or recursive)."""
    out = drv.outputs[name]
    if not out.hash:
        return
    try:
        recursive, algo, expected = out.parse_hash_info()
    except DerivationError as exc:
        raise BuildError(str(exc)) from None
    if not recursive:
        st = os.lstat(actual)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IXUSR:
            raise BuildError(f"output path `{path} should be a non-executable regular file")
    got = hash_path(actual, algo)[0] if recursive else hash_file(algo, actual)
    if got != expected:
        if trace is not None:
            trace(
                f"@ hash-mismatch {path} {out.hash_algo} {_print_hash(algo, expected)} "
                f"{_print_hash(algo, got)}"
            )
        raise BuildError(f"hash mismatch for store item '{path}'")


def scan_output(
    path: str,
    actual: str,
    *,
    build_uid: int | None,
    inodes_seen: set[tuple[int, int]],
    candidates: Iterable[str],
    drv_path: str,
) -> ValidPathInfo:
    """Canonicalise `actual` (the output's current location) and compute its registration."""
    try:
        canonicalise(actual, uid=build_uid, inodes_seen=inodes_seen)
    except CanonicalisationError as exc:
        raise BuildError(str(exc)) from None
    refs, digest, size = scan_path(actual, candidates)
    return ValidPathInfo(
        path=path,
        nar_hash="sha256:" + digest.hex(),
        nar_size=size,
        references=frozenset(refs),
        deriver=drv_path,
    )


def _resolve(spec: str, drv: Derivation) -> str:
    return drv.outputs[spec].path if spec in drv.outputs else spec


def check_reference_constraints(
    drv: Derivation,
    infos: dict[str, ValidPathInfo],
    closure: Callable[[Iterable[str]], set[str]],
) -> None:
    """`allowedReferences`, `allowedRequisites`, `disallowedReferences`, `disallowedRequisites`."""
    for info in infos.values():
        for var, allowed, requisites in (
            ("allowedReferences", True, False),
            ("allowedRequisites", True, True),
            ("disallowedReferences", False, False),
            ("disallowedRequisites", False, True),
        ):
            if var not in drv.env:
                continue
            spec = {_resolve(s, drv) for s in drv.env[var].split()}
            used = set(info.references)
            if requisites:
                used = closure(used)
            for ref in sorted(used):
                if (ref not in spec) if allowed else (ref in spec):
                    raise BuildError(
                        f"output (`{info.path}') is not allowed to refer to path `{ref}'"
                    )
