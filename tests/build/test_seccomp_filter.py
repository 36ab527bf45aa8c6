"""The builder's seccomp program, run by a small classic-BPF interpreter (no root needed).

The behavioural tests (test_sandbox_attacks.py) can only exercise the host's ABIs; this checks
the dispatch and every rule for each table, aarch64 and 32-bit ARM included.
"""

from __future__ import annotations

import errno
import struct

import pytest

from guixsvc.daemon.build import seccomp

ALLOW = seccomp.SECCOMP_RET_ALLOW
KILL = seccomp.SECCOMP_RET_KILL_PROCESS


def run(program: bytes, arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """Interpret `program` on a `struct seccomp_data`; returns the action."""
    argv = list(args) + [0] * (6 - len(args))
    data = struct.pack("=iIQ6Q", nr, arch, 0, *argv)
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == seccomp.BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == seccomp.BPF_JGE_K:
            pc += jt if acc >= k else jf
        elif code == seccomp.BPF_JSET_K:
            pc += jt if acc & k else jf
        elif code == seccomp.BPF_RET_K:
            return k
        else:  # pragma: no cover - the generator emits nothing else
            raise AssertionError(f"unknown instruction {code:#x}")


def errno_of(action: int) -> int | None:
    if action & 0xFFFF0000 == seccomp.SECCOMP_RET_ERRNO:
        return action & 0xFFFF
    return None


@pytest.mark.parametrize("machine", sorted(seccomp.TABLES))
def test_every_rule_of_every_abi(machine: str) -> None:
    program = seccomp.build_filter(machine)
    assert program is not None
    for table in seccomp.TABLES[machine]:
        for name, (nr, arg) in table.calls.items():
            if arg is None:
                expected = errno.ENOSYS if name == "openat2" else errno.ENOTSUP
                assert errno_of(run(program, table.arch, nr)) == expected, name
                continue
            for mode in (0o4755, 0o2755, 0o6000, 0o104755):
                args = tuple(mode if i == arg else 0o7777 for i in range(arg + 1))
                assert errno_of(run(program, table.arch, nr, args)) == errno.EPERM, (name, mode)
            # Set-id bits in another argument (flags) do not matter.
            args = tuple(0o755 if i == arg else 0o6000 for i in range(arg + 1))
            assert run(program, table.arch, nr, args) == ALLOW, name
        # Unrelated system calls pass.
        assert run(program, table.arch, 0) == ALLOW
        assert run(program, table.arch, 1000, (0o4755,) * 6) == ALLOW


def test_foreign_abis_are_killed() -> None:
    x86 = seccomp.build_filter("x86_64")
    arm = seccomp.build_filter("aarch64")
    assert x86 is not None and arm is not None
    assert run(x86, seccomp.AUDIT_ARCH_AARCH64, 0) == KILL
    assert run(arm, seccomp.AUDIT_ARCH_X86_64, 0) == KILL
    assert run(x86, 0xDEADBEEF, 90, (0, 0o4755)) == KILL
    # x32 system calls: refused outright.
    assert errno_of(run(x86, seccomp.AUDIT_ARCH_X86_64, seccomp.X32_SYSCALL_BIT | 90)) == (
        errno.ENOSYS
    )


def test_unknown_host_gets_no_filter() -> None:
    assert seccomp.build_filter("riscv64") is None


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_slirp_filter_program(machine: str) -> None:
    program = seccomp.build_slirp_filter(machine)
    assert program is not None
    arch, nr = seccomp._SYS_SOCKET[machine]
    assert errno_of(run(program, arch, nr, (seccomp.AF_UNIX, 1, 0))) == errno.EPERM
    assert run(program, arch, nr, (2, 1, 0)) == ALLOW  # AF_INET
    assert run(program, arch, nr, (10, 2, 0)) == ALLOW  # AF_INET6
    assert run(program, arch, nr + 1, (seccomp.AF_UNIX,)) == ALLOW
    assert run(program, seccomp.AUDIT_ARCH_I386, 1) == KILL


@pytest.mark.skipif(seccomp.build_slirp_filter() is None, reason="no filter for this host")
def test_slirp_filter_in_a_real_process() -> None:
    """What slirp4netns runs under: no Unix socket (so no abstract socket of the host), but
    IP sockets and socketpair work."""
    import os
    import socket

    program = seccomp.build_slirp_filter()
    assert program is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        results = []
        try:
            seccomp.slirp_preexec(program)
            for family in (socket.AF_UNIX, socket.AF_INET):
                try:
                    socket.socket(family, socket.SOCK_STREAM).close()
                    results.append("ok")
                except OSError as exc:
                    results.append(errno.errorcode[exc.errno or 0])
            a, b = socket.socketpair()
            a.close()
            b.close()
            results.append("pair")
        except BaseException as exc:
            results.append(repr(exc))
        os.write(w, ",".join(results).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    assert text == "EPERM,ok,pair"
