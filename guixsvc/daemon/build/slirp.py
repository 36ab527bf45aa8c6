"""slirp4netns: the network of a fixed-output build, from outside its namespaces.

Upstream runs slirp4netns for fixed-output builds rather than the builder in the host's network
namespace ("running the builder in the global network namespace would give it access to the
global namespace of abstract sockets").  One `Slirp` per such build, stopped by the build's
clean-up (local_build.py).
"""

from __future__ import annotations

import os
import select
import subprocess
from dataclasses import dataclass

from guixsvc.daemon.build import sandbox, seccomp


@dataclass
class Slirp:
    """A running slirp4netns serving one build's network namespace."""

    proc: subprocess.Popen[bytes]
    exit_fd: int  # closing it (or the worker dying) makes slirp4netns exit

    @classmethod
    def start(
        cls, program: str, pid: int, host_loopback: bool, timeout: float = 20, *, userns: bool
    ) -> Slirp:
        """Start slirp4netns for the network namespace of `pid` and wait until `tap0` is there.

        As root it enters the namespace itself (`--netns-type=pid`); for an unprivileged daemon
        (`userns`) it first joins the build's user namespace, which owns the network namespace
        and which the daemon's uid, its creator, holds every capability in (`--userns-path`);
        in root mode only, `--enable-sandbox` puts it
        in its own mount namespace without capabilities, `--enable-seccomp` restricts its
        system calls, and our own filter keeps it from creating Unix sockets (the host's
        abstract ones are in its network namespace); `--exit-fd` ties its life to this
        worker."""
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        args = [program, "--enable-seccomp", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                "--mtu=1500"]  # fmt: skip
        if userns:
            # slirp4netns's own sandbox needs uid 0 in the namespace it starts in (it fails
            # with "setegid(0)" otherwise): see README, "Rootless mode".
            args.append(f"--userns-path=/proc/{pid}/ns/user")
        else:
            args.append("--enable-sandbox")
        if not host_loopback:
            args.append("--disable-host-loopback")
        args += [str(pid), sandbox.TAP_NAME]
        bpf = seccomp.build_slirp_filter()
        try:
            proc = subprocess.Popen(
                args,
                pass_fds=(ready_w, exit_r),
                preexec_fn=None if bpf is None else lambda: seccomp.slirp_preexec(bpf),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise
        os.close(ready_w)
        os.close(exit_r)
        slirp = cls(proc, exit_w)
        try:
            ready, _, _ = select.select([ready_r], [], [], timeout)
            if not ready or os.read(ready_r, 1) != b"1":
                raise sandbox.SandboxError(
                    f"while setting up the build environment: `{program}' failed to start"
                )
        except BaseException:
            slirp.stop()
            raise
        finally:
            os.close(ready_r)
        return slirp

    def stop(self) -> None:
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
