"""What happens to a build's outputs: checks, canonicalisation, references, registration.

Upstream `DerivationGoal::registerOutputs` (spec/build-env.md §9.2, §11): outputs are moved out
of the chroot, checked (permissions, fixed-output hashes), given canonical metadata, scanned
for references to the build's input closure while their NAR hash is computed, compared between
rounds or against the registered item in check mode, and finally registered together with
their deriver in one database transaction.

Two rules keep what a builder made from reaching anyone else as it is: a fixed-output build's
outputs are *copied* to fresh inodes owned by the daemon before they are checked and registered
(`copy_fresh`; upstream's fix for CVE-2024-27297: a builder may have handed a descriptor of its
output to a process outside the build), and a failed build's outputs or kept build tree lose
setuid/setgid bits and group/world write permission and get a new owner before anybody else may
see them (`secure_tree`; CVE-2024-52867).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable

from guixsvc.store import base32, safefs
from guixsvc.store.canonical import CanonicalisationError, canonicalise
from guixsvc.store.db import ValidPathInfo
from guixsvc.store.derivation import Derivation, DerivationError
from guixsvc.store.hashes import new_hasher
from guixsvc.store.locks import SysError
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


#: Bits a file handed over from a build may never keep (upstream `secureFilePerms`, plus
#: group write: the group of a build tree is the build users' group).
UNSAFE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_IWGRP | stat.S_IWOTH


def secure_tree(path: str, owner: tuple[int, int] | None) -> None:
    """Make the tree at `path` safe to expose: no setuid/setgid bit, no group or world write
    permission, and (if `owner` is given) owned by `owner` (uid, gid) instead of the build user.

    Runs once the build's processes are dead.  Every change goes through safefs (descriptors,
    no symlink followed, inode-checked), so a tree rearranged under us can only fail the call.
    A missing tree is fine.
    """
    for node in safefs.walk(path, missing_ok=True):
        if node.kind == safefs.LEAVE:
            continue
        st = node.st
        # Mode first, then owner: safefs checks that the inode still has the owner it had
        # when examined, and the set-id bits must be gone before anybody else owns the file.
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISLNK(st.st_mode) and mode & UNSAFE_BITS:
            safefs.chmod_node(
                node.name, node.parent_fd, st, mode & ~UNSAFE_BITS, node.path, fd=node.fd
            )
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            safefs.chown_node(node.name, node.parent_fd, st, owner[0], owner[1], node.path)


def copy_fresh(src: str, dst: str) -> None:
    """Copy the tree `src` to the new path `dst`: fresh inodes owned by the daemon, created
    private (files 0600/0700, directories 0700; canonicalisation sets the store modes), so no
    descriptor or hard link a builder kept can reach what gets registered.  Only regular files,
    directories and symlinks are copied; anything else fails with BuildError."""
    dst_fds: list[int] = []
    top_parent, top_name = safefs.open_parent(dst)
    try:
        for node in safefs.walk(src):
            st = node.st
            parent = dst_fds[-1] if node.depth else top_parent
            name = node.name if node.depth else top_name
            if node.kind == safefs.LEAVE:
                os.close(dst_fds.pop())
                continue
            if node.kind == safefs.ENTER:
                os.mkdir(name, 0o700, dir_fd=parent)
                dst_fds.append(safefs.open_dir(name, parent, node.path))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(node.name, dir_fd=node.parent_fd)
                os.symlink(target, name, dir_fd=parent)
            elif stat.S_ISREG(st.st_mode):
                _copy_file(node, parent, name)
            else:
                raise BuildError(f"file `{node.path}' has an unsupported type")
    except BaseException:
        for fd in dst_fds:
            os.close(fd)
        dst_fds.clear()
        safefs.remove_tree(dst)
        raise
    finally:
        os.close(top_parent)


def _copy_file(node: safefs.Node, dst_dir: int, name: str) -> None:
    try:
        sfd = safefs.open_nofollow(node.name, node.parent_fd)
    except OSError as e:
        raise SysError(f"opening `{node.path}'", e.errno) from e
    try:
        st = os.fstat(sfd)
        if (st.st_dev, st.st_ino) != (node.st.st_dev, node.st.st_ino):
            raise safefs.TreeChanged(node.path)
        mode = 0o700 if st.st_mode & stat.S_IXUSR else 0o600
        dfd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
            dir_fd=dst_dir,
        )  # fmt: skip
        try:
            left = st.st_size
            while left > 0:
                n = os.sendfile(dfd, sfd, None, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
            # A file that grew while being copied: copy the rest too, the hash check decides.
            while chunk := os.read(sfd, 1 << 16):
                os.write(dfd, chunk)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
