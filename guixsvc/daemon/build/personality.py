"""Which systems this machine builds for, and the personality a builder runs with.

Upstream's `canBuildLocally` (an i686 build on x86_64, armhf on aarch64) and the
`personality(2)` flags of `startBuilder`: 32-bit personality for those builds, no address
space randomisation, and Linux 2.6 impersonation on request (`build-impersonate-linux-26`).
"""

from __future__ import annotations

import platform

from guixsvc.daemon.build import sandbox


def can_build_locally(system: str, this_system: str) -> bool:
    """Upstream `canBuildLocally`: the system itself, or one it runs natively."""
    return (
        system == this_system
        or (system == "i686-linux" and this_system == "x86_64-linux")
        or (system == "armhf-linux" and this_system == "aarch64-linux")
    )


def personality(system: str, this_system: str, impersonate_linux_26: bool) -> int:
    """The `personality(2)` flags of a builder for `system` on `this_system`."""
    machine = platform.machine()
    flags = sandbox.ADDR_NO_RANDOMIZE
    if (system == "i686-linux" and (this_system == "x86_64-linux" or machine == "x86_64")) or (
        system == "armhf-linux" and this_system.startswith("aarch64")
    ):
        flags |= sandbox.PER_LINUX32
    if impersonate_linux_26 and system in ("i686-linux", "x86_64-linux"):
        flags |= sandbox.UNAME26
    return flags
