"""The builder's system-call filter, its keyring and `no_new_privs`.

A builder runs as a build user that later builds reuse, and whatever it leaves behind may end up
where other users reach it (a failed output, a `--keep-failed` tree).  Like Nix's
`setupSeccomp`, the child installs a classic BPF seccomp filter right before `exec` so a builder
can never make a setuid or setgid file (`chmod`, `fchmod`, `fchmodat`, `fchmodat2` and also
`open`/`openat`/`creat`/`mknod`/`mknodat`, whose creation mode honours those bits) nor read or
set extended attributes (file capabilities, ACLs); `openat2`, whose mode sits in a structure the
filter cannot read, answers ENOSYS so libc falls back to `openat`.  `PR_SET_NO_NEW_PRIVS` comes
with it (the kernel requires it for an unprivileged filter, and it stops setuid programs from
gaining anything).  Each builder also joins a fresh anonymous session keyring, so it sees no key
of the daemon or of an earlier build; the build user's own keyrings (user, user-session,
persistent), which outlive a build, are emptied before and after each build.

The filter is built by hand (no libseccomp binding needed): `struct sock_filter` entries packed
with `struct`, loaded with `prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog)` through
ctypes.  System calls of an architecture the filter does not know kill the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import platform
import struct
from dataclasses import dataclass

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
OFF_NR = 0
OFF_ARCH = 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of args[index] (little-endian machines only)."""
    return 16 + 8 * index


AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
X32_SYSCALL_BIT = 0x40000000

S_ISUID = 0o4000
S_ISGID = 0o2000

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_CLEAR = 7
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5


@dataclass(frozen=True)
class _Table:
    """System call numbers of one ABI: name → (number, mode argument index or None)."""

    arch: int
    calls: dict[str, tuple[int, int | None]]


# Mode-checked calls have the index of their `mode` argument; the xattr calls and openat2 have
# None (always refused).  Numbers from the kernel's syscall tables.
_X86_64 = _Table(
    AUDIT_ARCH_X86_64,
    {
        "open": (2, 2), "creat": (85, 1), "chmod": (90, 1), "fchmod": (91, 1),
        "mknod": (133, 1), "openat": (257, 3), "mknodat": (259, 2), "fchmodat": (268, 2),
        "fchmodat2": (452, 2), "openat2": (437, None),
        "setxattr": (188, None), "lsetxattr": (189, None), "fsetxattr": (190, None),
        "getxattr": (191, None), "lgetxattr": (192, None), "fgetxattr": (193, None),
    },
)  # fmt: skip
_I386 = _Table(
    AUDIT_ARCH_I386,
    {
        "open": (5, 2), "creat": (8, 1), "mknod": (14, 1), "chmod": (15, 1), "fchmod": (94, 1),
        "openat": (295, 3), "mknodat": (297, 2), "fchmodat": (306, 2),
        "fchmodat2": (452, 2), "openat2": (437, None),
        "setxattr": (226, None), "lsetxattr": (227, None), "fsetxattr": (228, None),
        "getxattr": (229, None), "lgetxattr": (230, None), "fgetxattr": (231, None),
    },
)  # fmt: skip
_AARCH64 = _Table(
    AUDIT_ARCH_AARCH64,
    {
        "mknodat": (33, 2), "fchmod": (52, 1), "fchmodat": (53, 2), "openat": (56, 3),
        "fchmodat2": (452, 2), "openat2": (437, None),
        "setxattr": (5, None), "lsetxattr": (6, None), "fsetxattr": (7, None),
        "getxattr": (8, None), "lgetxattr": (9, None), "fgetxattr": (10, None),
    },
)  # fmt: skip

# 32-bit ARM (EABI), for armhf-linux builds on aarch64 hosts.
_ARM = _Table(
    AUDIT_ARCH_ARM,
    {
        "open": (5, 2), "creat": (8, 1), "mknod": (14, 1), "chmod": (15, 1), "fchmod": (94, 1),
        "openat": (322, 3), "mknodat": (324, 2), "fchmodat": (333, 2),
        "fchmodat2": (452, 2), "openat2": (437, None),
        "setxattr": (226, None), "lsetxattr": (227, None), "fsetxattr": (228, None),
        "getxattr": (229, None), "lgetxattr": (230, None), "fgetxattr": (231, None),
    },
)  # fmt: skip

#: The ABIs a builder may use, by host machine (`platform.machine()`): i686-linux builds run
#: on x86_64 and armhf-linux builds on aarch64 (`can_build_locally`).
TABLES: dict[str, tuple[_Table, ...]] = {
    "x86_64": (_X86_64, _I386),
    "aarch64": (_AARCH64, _ARM),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _errno(e: int) -> int:
    return SECCOMP_RET_ERRNO | (e & 0xFFFF)


def _abi_block(table: _Table) -> list[bytes]:
    """Instructions for one ABI, entered with the accumulator = anything; always returns."""
    out = [_insn(BPF_LD_W_ABS, 0, 0, OFF_NR)]
    if table.arch == AUDIT_ARCH_X86_64:
        # x32 system calls (the ABI bit set): not supported in builds.
        out.append(_insn(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT))
        out.append(_insn(BPF_RET_K, 0, 0, _errno(errno.ENOSYS)))
    for name, (nr, arg) in sorted(table.calls.items(), key=lambda kv: kv[1][0]):
        if arg is None:
            result = errno.ENOSYS if name == "openat2" else errno.ENOTSUP
            out.append(_insn(BPF_JEQ_K, 0, 1, nr))
            out.append(_insn(BPF_RET_K, 0, 0, _errno(result)))
        else:
            out.append(_insn(BPF_JEQ_K, 0, 4, nr))
            out.append(_insn(BPF_LD_W_ABS, 0, 0, _arg_low(arg)))
            out.append(_insn(BPF_JSET_K, 0, 1, S_ISUID | S_ISGID))
            out.append(_insn(BPF_RET_K, 0, 0, _errno(errno.EPERM)))
            out.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    out.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return out


def build_filter(machine: str | None = None) -> bytes | None:
    """The packed `sock_filter` array for `machine`, or None when it has no table here."""
    tables = TABLES.get(machine or platform.machine())
    if tables is None:
        return None
    blocks = [_abi_block(t) for t in tables]
    prog = [_insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH)]
    # Dispatch: one `jeq arch` per ABI, jumping over the remaining dispatch and earlier blocks.
    n = len(tables)
    for i, table in enumerate(tables):
        # After this jeq: (n - i - 1) more jeqs, then the kill, then blocks 0..i-1.
        skip = (n - i - 1) + 1 + sum(len(b) for b in blocks[:i])
        if skip > 255:
            raise ValueError("seccomp filter too large for a jump")
        prog.append(_insn(BPF_JEQ_K, skip, 0, table.arch))
    prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS))
    for block in blocks:
        prog.extend(block)
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                        ctypes.c_ulong]  # fmt: skip
_libc.syscall.restype = ctypes.c_long

_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}


def set_no_new_privs() -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot set no_new_privs: {errno.errorcode.get(err, err)}")


def install_filter(program: bytes) -> None:
    """Load `program` (needs no_new_privs or CAP_SYS_ADMIN); it then applies to every child."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "unable to load seccomp BPF program")


def keyctl(op: int, *args: int) -> int:
    nr = _SYS_KEYCTL.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, "keyctl: unknown architecture")
    values = [ctypes.c_long(a) for a in args] + [ctypes.c_long(0)] * (4 - len(args))
    result = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(op), *values)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl: {errno.errorcode.get(err, err)}")
    return int(result)


def join_fresh_session_keyring() -> None:
    """`keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: a new anonymous session keyring."""
    try:
        keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return
        # A container manager may filter the keyring calls out (systemd-nspawn answers EPERM):
        # then no process of ours, builders included, can reach any keyring, which is what a
        # fresh one is for.  Go on only when even looking the session keyring up is refused.
        if exc.errno == errno.EPERM and not _keyrings_reachable():
            return
        raise


def _keyrings_reachable() -> bool:
    try:
        keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)
    except OSError as exc:
        return exc.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)
    return True


def clear_user_keyrings() -> None:
    """Empty the calling uid's user, user-session and persistent keyrings (the keyrings a
    build user's processes share across builds); missing keyring support is fine."""
    for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
        try:
            keyctl(KEYCTL_CLEAR, ring)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOKEY, errno.EACCES):
                raise
    try:
        persistent = keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_SESSION_KEYRING)
    except OSError:
        return
    with contextlib.suppress(OSError):
        keyctl(KEYCTL_CLEAR, persistent)


def confine_builder() -> None:
    """In the child, after dropping to the build user, right before exec: a fresh session
    keyring, no_new_privs and the filter (refused when the filter cannot be loaded)."""
    join_fresh_session_keyring()
    set_no_new_privs()
    program = build_filter()
    if program is not None:
        install_filter(program)


# ------------------------------------------------------------------------------------------------
# slirp4netns

AF_UNIX = 1
_SYS_SOCKET = {"x86_64": (AUDIT_ARCH_X86_64, 41), "aarch64": (AUDIT_ARCH_AARCH64, 198)}


def build_slirp_filter(machine: str | None = None) -> bytes | None:
    """For slirp4netns, which stays in the host's network namespace: `socket(AF_UNIX, ...)`
    fails with EPERM, so even a compromised slirp4netns cannot reach the host's abstract Unix
    sockets (upstream's `slirpSeccompFilter` allows only AF_INET/AF_INET6 sockets).
    `socketpair`, which slirp4netns 1.2 uses to pass the tap descriptor, creates a connected
    pair and reaches nobody.  Other ABIs are killed."""
    entry = _SYS_SOCKET.get(machine or platform.machine())
    if entry is None:
        return None
    arch, nr = entry
    prog = [
        _insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(BPF_JEQ_K, 1, 0, arch),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0, 0, OFF_NR),
    ]
    if arch == AUDIT_ARCH_X86_64:
        prog.append(_insn(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT))
        prog.append(_insn(BPF_RET_K, 0, 0, _errno(errno.ENOSYS)))
    prog += [
        _insn(BPF_JEQ_K, 0, 3, nr),
        _insn(BPF_LD_W_ABS, 0, 0, _arg_low(0)),
        _insn(BPF_JEQ_K, 0, 1, AF_UNIX),
        _insn(BPF_RET_K, 0, 0, _errno(errno.EPERM)),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(prog)


def slirp_preexec(program: bytes) -> None:
    """`preexec_fn` for slirp4netns: no_new_privs and `program` (built in the parent)."""
    set_no_new_privs()
    install_filter(program)
