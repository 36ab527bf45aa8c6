"""Where a builder runs: build users, the chroot, namespaces and the child process set-up.

Upstream's `UserLock`, `startBuilder` (chroot preparation) and `runChild` (spec/build-env.md
§3, §6, §7).  Python 3.11 has no `os.unshare`, so the namespace, mount and personality calls go
through libc with ctypes.  Because `unshare(CLONE_NEWPID)` only affects children, the forked
child unshares and forks once more: that grandchild is PID 1 of the new PID namespace and
becomes the builder, so killing it (or its exiting) kills every process of the build.

A daemon that is not root (upstream's 2025 unprivileged mode) builds the same way in a fresh
*user* namespace created together with the others: the builder is uid 30001 / gid 30000 inside
(upstream's `defaultGuestUID`/`defaultGuestGID`), mapped onto the daemon's own uid and gid, with
`setgroups` denied.  There is no build-user pool then; since every build runs as the daemon's
own uid outside, everything a builder could write through the chroot (the store inputs, extra
chroot directories) is bind-mounted read-only, and file inputs are bind-mounted rather than
hard-linked, so a builder can reach no inode of the store it could chmod.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import grp
import os
import platform
import pwd
import shutil
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from guixsvc.daemon.build import seccomp
from guixsvc.store import safefs
from guixsvc.store.locks import lock_fd

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

#: The builder's uid and gid inside the user namespace of an unprivileged daemon (upstream
#: build.cc `defaultGuestUID`, `defaultGuestGID`).
GUEST_UID = 30001
GUEST_GID = 30000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PER_LINUX32 = 0x0008
UNAME26 = 0x0020000
ADDR_NO_RANDOMIZE = 0x0040000

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "i686": 217, "armv7l": 218}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.personality.argtypes = [ctypes.c_ulong]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]  # fmt: skip


class SandboxError(Exception):
    """Raised with upstream's message when the sandbox cannot be set up."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "cannot set up private namespaces")


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mounting `{source}' on `{target}'",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"unmounting `{target}'")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, "pivot_root: unknown architecture")
    _check(_libc.syscall(nr, new_root.encode(), put_old.encode()), "cannot pivot old root")


def remount_read_only(target: str) -> None:
    """Make the bind mount at `target` read-only, keeping the flags it inherited: in a user
    namespace, nosuid/nodev/noexec/atime flags of a mount from a more privileged namespace are
    locked, and a remount that would clear them fails with EPERM."""
    st = os.statvfs(target)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    kept = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
            (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
            (os.ST_RELATIME, MS_RELATIME))  # fmt: skip
    for st_flag, ms_flag in kept:
        if st.f_flag & st_flag:
            flags |= ms_flag
    mount("none", target, None, flags)


def write_id_maps(host_uid: int, host_gid: int) -> None:
    """In a process that has just unshared its user namespace: the only ids it has are the
    guest ones, mapped onto the daemon's (upstream `initializeUserNamespace`; `setgroups` is
    denied, as an unprivileged process must before writing `gid_map`)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{GUEST_UID} {host_uid} 1\n"),
                       ("gid_map", f"{GUEST_GID} {host_gid} 1\n")):  # fmt: skip
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        except OSError as e:
            raise OSError(e.errno, f"cannot write /proc/self/{name}: {e.strerror}") from None
        finally:
            os.close(fd)


_userns_ok: bool | None = None


def user_namespaces_available() -> bool:
    """Whether this process may create a user namespace with mount, PID and network
    namespaces owned by it (probed once, in a throw-away child)."""
    global _userns_ok
    if _userns_ok is None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                ids = os.geteuid(), os.getegid()  # unmapped (overflow ids) once unshared
                unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                        | CLONE_NEWUTS)  # fmt: skip
                write_id_maps(*ids)
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        _userns_ok = os.waitstatus_to_exitcode(status) == 0
    return _userns_ok


def set_personality(flags: int) -> None:
    if _libc.personality(0xFFFFFFFF) == -1 or _libc.personality(flags) == -1:
        raise OSError(ctypes.get_errno(), "cannot set personality")


def loopback_up() -> None:
    """Bring up `lo` in a fresh network namespace (SIOCSIFFLAGS: UP|LOOPBACK|RUNNING)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0x1 | 0x8 | 0x40)
        fcntl.ioctl(s.fileno(), 0x8914, ifreq)


# The user-mode network of fixed-output builds (slirp4netns defaults, as upstream's setupTap).
TAP_NAME = "tap0"
TAP_ADDRESS = "10.0.2.100"
TAP_NETMASK = "255.255.255.0"
SLIRP_GATEWAY = "10.0.2.2"  # also the host's loopback, unless --disable-host-loopback
SLIRP_DNS = "10.0.2.3"

SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCADDRT = 0x890B
IFF_UP = 0x1
IFF_RUNNING = 0x40
RTF_UP = 0x1
RTF_GATEWAY = 0x2


class _Sockaddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_ushort),
                ("addr", ctypes.c_ubyte * 4), ("zero", ctypes.c_ubyte * 8)]  # fmt: skip

    @classmethod
    def inet(cls, address: str) -> _Sockaddr:
        return cls(socket.AF_INET, 0, (ctypes.c_ubyte * 4)(*socket.inet_aton(address)))


class _Rtentry(ctypes.Structure):
    """`struct rtentry` (SIOCADDRT)."""

    _fields_ = [
        ("pad1", ctypes.c_ulong), ("dst", _Sockaddr), ("gateway", _Sockaddr),
        ("genmask", _Sockaddr), ("flags", ctypes.c_ushort), ("pad2", ctypes.c_short),
        ("pad3", ctypes.c_ulong), ("pad4", ctypes.c_void_p), ("metric", ctypes.c_short),
        ("dev", ctypes.c_char_p), ("mtu", ctypes.c_ulong), ("window", ctypes.c_ulong),
        ("irtt", ctypes.c_ushort),
    ]  # fmt: skip


def _ifreq_inet(name: str, address: str) -> bytes:
    return struct.pack("16sH2s4s16x", name.encode(), socket.AF_INET, b"", socket.inet_aton(address))


def configure_tap(host_loopback: bool) -> None:
    """In the build's network namespace, once slirp4netns has created `tap0`: address
    10.0.2.100/24, MTU 1500, up, default route through slirp's 10.0.2.2.

    With `host_loopback` (upstream's default), `lo` stays down and `route_localnet` is on, so
    127.0.0.1 is routed to slirp4netns, which connects to the host's loopback (a proxy on
    127.0.0.1 keeps working); with --isolate-host-loopback `lo` comes up, 127.0.0.1 is the
    build's own loopback and slirp4netns refuses 10.0.2.2 (`--disable-host-loopback`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fd = s.fileno()
        name = TAP_NAME.encode()
        fcntl.ioctl(fd, SIOCSIFMTU, struct.pack("16si20x", name, 1500))
        fcntl.ioctl(fd, SIOCSIFADDR, _ifreq_inet(TAP_NAME, TAP_ADDRESS))
        fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq_inet(TAP_NAME, TAP_NETMASK))
        fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack("16sH22x", name, IFF_UP | IFF_RUNNING))
        route = _Rtentry()
        route.dst = _Sockaddr.inet("0.0.0.0")
        route.genmask = _Sockaddr.inet("0.0.0.0")
        route.gateway = _Sockaddr.inet(SLIRP_GATEWAY)
        route.flags = RTF_UP | RTF_GATEWAY
        fcntl.ioctl(fd, SIOCADDRT, bytes(route))
    if host_loopback:
        # Packets from the host loopback come back with 127.0.0.1 as their source.
        with open("/proc/sys/net/ipv4/conf/all/route_localnet", "w") as f:
            f.write("1")
    else:
        loopback_up()


def wait_for_network(fd: int) -> None:
    """Block until the daemon says slirp4netns runs (one byte on `fd`; EOF: it failed)."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        break
    os.close(fd)
    if not data:
        raise SandboxError("while setting up the build environment: no network for the build")


# ------------------------------------------------------------------------------------------------
# Build users


class BuildUsersError(Exception):
    pass


_locked_uids: set[int] = set()


@dataclass
class BuildUser:
    """A locked build user (upstream `UserLock`); `release()` closes the userpool lock."""

    user: str
    uid: int
    gid: int
    groups: list[int]
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _locked_uids.discard(self.uid)


def acquire_build_user(group: str, state_dir: str) -> BuildUser | None:
    """Lock the first free member of `group`; None when all are busy."""
    try:
        gr = grp.getgrnam(group)
    except KeyError:
        raise BuildUsersError(
            f"the group `{group}' specified in `build-users-group' does not exist"
        ) from None
    if not gr.gr_mem:
        raise BuildUsersError(f"the build users group `{group}' has no members")
    pool = os.path.join(state_dir, "userpool")
    os.makedirs(pool, exist_ok=True)
    for name in gr.gr_mem:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise BuildUsersError(
                f"the user `{name}' in the group `{group}' does not exist"
            ) from None
        if pw.pw_uid in _locked_uids:
            continue
        fd = os.open(os.path.join(pool, str(pw.pw_uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)  # fmt: skip
        if not lock_fd(fd, "w", False):
            os.close(fd)
            continue
        if pw.pw_uid in (os.getuid(), os.geteuid()):
            os.close(fd)
            raise BuildUsersError(f"the build user should not be a member of `{group}'")
        groups = os.getgrouplist(name, pw.pw_gid)
        if len(groups) > 10:
            os.close(fd)
            raise BuildUsersError(f"failed to get list of supplementary groups for ‘{name}’")
        _locked_uids.add(pw.pw_uid)
        return BuildUser(name, pw.pw_uid, gr.gr_gid, groups, fd)
    return None


def kill_user(uid: int) -> None:
    """Kill every process of `uid` (upstream `killUser`: a child that setuids and kill(-1)),
    and empty the keyrings the uid keeps across builds, so nothing a build started or planted
    survives into the next build that gets this user."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(uid, uid, uid)
            # kill(-1) spares the caller: repeat until no process of the uid is left (a
            # process that forks in between is caught by the next round).
            for _ in range(100):
                try:
                    os.kill(-1, signal.SIGKILL)
                except InterruptedError:
                    continue
                except ProcessLookupError:
                    break
            with contextlib.suppress(OSError):
                seccomp.clear_user_keyrings()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SandboxError(f"cannot kill processes for uid `{uid}'")


# ------------------------------------------------------------------------------------------------
# The chroot


@dataclass
class ChildSpec:
    """Everything the child needs to become the builder."""

    builder: str
    args: list[str]
    env: dict[str, str]
    work_dir: str  # the build directory as the builder sees it
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    chroot: str | None = None  # the chroot's root directory
    binds: dict[str, str] = field(default_factory=dict)  # target inside chroot -> source
    private_network: bool = True
    #: Fixed-output build networked by slirp4netns: the read end of the pipe on which the
    #: daemon signals that slirp4netns runs (then `tap0` is configured), and whether 127.0.0.1
    #: reaches the host's loopback.
    network_fd: int | None = None
    host_loopback: bool = True
    personality: int | None = None
    builtin: Callable[[], None] | None = None  # run in the child instead of exec
    #: Fresh session keyring, no_new_privs and the seccomp filter (see `seccomp`).
    confine: bool = True
    #: The worker that forks the child (0: not checked).
    parent_pid: int = 0
    #: Unprivileged daemon: (uid, gid) of the daemon, mapped to GUEST_UID/GUEST_GID in a new
    #: user namespace that owns the build's other namespaces.
    userns: tuple[int, int] | None = None
    #: Bind targets left writable (the build directory); with `userns`, every other bind is
    #: read-only.
    writable: frozenset[str] = frozenset()
    #: The store directory as the builder sees it (with `userns`: kept writable).
    store_dir: str = ""


DEV_NODES = ("/dev/full", "/dev/kvm", "/dev/null", "/dev/random", "/dev/tty", "/dev/urandom",
             "/dev/zero")  # fmt: skip


def prepare_chroot(
    root: str,
    *,
    store_dir: str,
    uid: int,
    gid: int,
    build_gid: int | None,
    fixed_output: bool,
    inputs: list[str],
    binds: dict[str, str],
    slirp: bool = False,
    host_loopback: bool = True,
    rootless: bool = False,
) -> dict[str, str]:
    """Create the chroot tree (parent side) and return the full bind list (target → source).

    Inputs that are directories are bind-mounted, other files hard-linked (copied when that
    fails); mount points are created here so the child only has to mount.  `rootless`: the
    builder runs as the daemon's own uid, so a hard link would hand it a store inode it owns;
    file inputs are bind-mounted too (read-only, see `_setup_mounts`) and symlinks recreated.
    """
    if os.path.lexists(root):
        safefs.remove_tree(root)
    os.mkdir(root, 0o750)
    os.chmod(root, 0o750)
    if not rootless:
        os.chown(root, 0, build_gid if build_gid is not None else 0)
    os.mkdir(os.path.join(root, "tmp"), 0o1777)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    etc = os.path.join(root, "etc")
    os.mkdir(etc, 0o755)
    _write(os.path.join(etc, "passwd"),
           f"nixbld:x:{uid}:{gid}:Nix build user:/:/noshell\n"
           "nobody:x:65534:65534:Nobody:/:/noshell\n")  # fmt: skip
    _write(os.path.join(etc, "group"), f"nixbld:!:{gid}:\n")
    all_binds = dict(binds)
    if not fixed_output:
        _write(os.path.join(etc, "hosts"), "127.0.0.1 localhost\n")
    else:
        files = ["/etc/nsswitch.conf", "/etc/services"]
        if not slirp:
            files += ["/etc/resolv.conf", "/etc/hosts"]
        else:
            # Upstream: slirp's DNS forwarder; with the host loopback reachable, the host's
            # loopback names point at slirp's gateway.
            _write(os.path.join(etc, "resolv.conf"), f"nameserver {SLIRP_DNS}\n")
            if host_loopback:
                try:
                    with open("/etc/hosts") as f:
                        hosts = f.read()
                except OSError:
                    hosts = "127.0.0.1 localhost\n::1 localhost\n"
                hosts = hosts.replace("127.0.0.1", SLIRP_GATEWAY).replace("::1", "fd00::2")
                _write(os.path.join(etc, "hosts"), hosts)
            else:
                files.append("/etc/hosts")
        for name in files:
            if os.path.exists(name):
                all_binds[name] = name
    fake_store = root + store_dir
    os.makedirs(fake_store, 0o755)
    os.chmod(fake_store, 0o1775)
    if not rootless:
        os.chown(fake_store, 0, build_gid if build_gid is not None else 0)
    for path in inputs:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) or (rootless and stat.S_ISREG(st.st_mode)):
            all_binds[path] = path
        elif rootless:
            if not stat.S_ISLNK(st.st_mode):
                raise SandboxError(f"unsupported file type of input `{path}'")
            os.symlink(os.readlink(path), root + path)
        else:
            target = root + path
            try:
                os.link(path, target, follow_symlinks=False)
            except OSError:
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(path), target)
                else:
                    shutil.copy2(path, target)
    if "/dev" not in all_binds:
        os.makedirs(os.path.join(root, "dev", "shm"))
        os.makedirs(os.path.join(root, "dev", "pts"))
        for node in DEV_NODES:
            if os.path.exists(node):
                all_binds[node] = node
        links = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
                 "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}  # fmt: skip
        for name, target in links.items():
            os.symlink(target, os.path.join(root, "dev", name))
    os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    for target, source in all_binds.items():
        if source == "/proc":
            continue
        mount_point = root + target
        try:
            st = os.stat(source)
        except OSError as e:
            raise SandboxError(f"getting attributes of path `{source}': {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            os.makedirs(mount_point, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(mount_point), exist_ok=True)
            if not os.path.lexists(mount_point):
                _write(mount_point, "")
    return all_binds


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------
# The child


def _setup_mounts(spec: ChildSpec) -> None:
    root = spec.chroot
    assert root is not None
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount(root, root, None, MS_BIND)
    if spec.userns is not None:
        # The builder owns the chroot's files here: all but /tmp and the store directory
        # (where outputs appear) become read-only below, as root mode's root-owned tree is.
        for writable in ("/tmp", spec.store_dir):
            if writable and os.path.isdir(root + writable):
                mount(root + writable, root + writable, None, MS_BIND)
    for target, source in spec.binds.items():
        if source == "/proc":
            continue
        mount(source, root + target, None, MS_BIND | MS_REC)
        if spec.userns is not None and target not in spec.writable:
            remount_read_only(root + target)
    mount("none", os.path.join(root, "proc"), "proc", 0)
    if os.path.isdir(os.path.join(root, "dev", "shm")) and os.path.exists("/dev/shm"):
        mount("none", os.path.join(root, "dev", "shm"), "tmpfs", 0)
    pts = os.path.join(root, "dev", "pts")
    if (os.path.exists("/dev/pts/ptmx") and os.path.isdir(pts)
            and not os.path.lexists(os.path.join(root, "dev", "ptmx"))
            and "/dev/pts" not in spec.binds):  # fmt: skip
        mount("none", pts, "devpts", 0, "newinstance,mode=0620")
        os.symlink("/dev/pts/ptmx", os.path.join(root, "dev", "ptmx"))
        os.chmod(os.path.join(pts, "ptmx"), 0o666)
    os.chdir(root)
    os.mkdir("real-root")
    pivot_root(".", "real-root")
    os.chroot(".")
    umount("real-root", MNT_DETACH)
    os.rmdir("real-root")
    if spec.userns is not None:
        remount_read_only("/")


def _become_builder(spec: ChildSpec, log_fd: int) -> None:
    """Final steps in the process that execs the builder; never returns."""
    if spec.chroot is not None:
        _setup_mounts(spec)
        if spec.private_network and spec.network_fd is None:
            loopback_up()
        socket.sethostname("localhost")
        _check(_libc.setdomainname(b"(none)", 7), "cannot set domain name")
    os.chdir(spec.work_dir)
    if spec.personality is not None:
        set_personality(spec.personality)
    if spec.userns is not None:
        # Already the guest ids: the only ones mapped.  The capabilities held in the user
        # namespace are dropped by execve (a non-zero uid, no file capabilities) and
        # no_new_privs keeps them from coming back.
        if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (
            GUEST_UID,
            GUEST_UID,
            GUEST_GID,
            GUEST_GID,
        ):
            raise OSError(errno.EPERM, "cannot set uid")
    elif spec.uid is not None and spec.gid is not None:
        os.setgroups(spec.groups)
        os.setgid(spec.gid)
        os.setuid(spec.uid)
        if os.getuid() != spec.uid or os.geteuid() != spec.uid:
            raise OSError(errno.EPERM, "cannot set uid")
        if os.getgid() != spec.gid or os.getegid() != spec.gid:
            raise OSError(errno.EPERM, "cannot set gid")
    # Dies with its parent (set after the uid change, which clears it): a worker that dies
    # takes its builds with it, the build's PID namespace included.
    die_with_parent(spec.parent_pid if spec.chroot is None else None)
    if spec.confine:
        seccomp.confine_builder()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.write(2, b"\n")
    if spec.builtin is not None:
        try:
            spec.builtin()
        except Exception as e:
            sys.stdout.flush()
            os.write(2, f"error: {e}\n".encode())
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)
    argv = [os.path.basename(spec.builder), *spec.args]
    try:
        os.execve(spec.builder, argv, spec.env)
    except OSError as e:
        os.write(
            2,
            f"while setting up the build environment: executing `{spec.builder}': "
            f"{e.strerror}\n".encode(),
        )
        os._exit(1)


_fds_ready = False

PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL when the parent dies; exit at once if it already has (`expected_parent`)."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set the parent death signal")
    if expected_parent and os.getppid() != expected_parent:
        os._exit(1)


def _child_fds(log_fd: int) -> None:
    global _fds_ready
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, 65536)
    _fds_ready = True


def child_main(spec: ChildSpec, log_fd: int, pid_fd: int) -> None:
    """Runs in the forked child; never returns.

    Writes the builder's host PID (decimal + newline) to `pid_fd` so the daemon can kill the
    build's PID namespace; setup errors go to the log pipe before the `\\n` handshake.
    """
    try:
        os.setsid()
        die_with_parent(spec.parent_pid)
        if spec.chroot is None:
            os.write(pid_fd, f"{os.getpid()}\n".encode())
            os.close(pid_fd)
            _child_fds(log_fd)
            _become_builder(spec, 2)
        flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
        if spec.private_network:
            flags |= CLONE_NEWNET
        if spec.userns is not None:
            flags |= CLONE_NEWUSER
        unshare(flags)
        if spec.userns is not None:
            write_id_maps(*spec.userns)
        pid = os.fork()
        if pid == 0:
            os.close(pid_fd)
            if spec.network_fd is not None:
                wait_for_network(spec.network_fd)
                configure_tap(spec.host_loopback)
            _child_fds(log_fd)
            _become_builder(spec, 2)
        if spec.network_fd is not None:
            os.close(spec.network_fd)
        os.write(pid_fd, f"{pid}\n".encode())
        os.close(pid_fd)
        os.close(log_fd)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    except BaseException as e:
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        elif isinstance(e, OSError) and e.args:
            msg = str(e.args[-1])
        else:
            msg = str(e)
        with contextlib.suppress(OSError):
            text = f"while setting up the build environment: {msg}\n".encode()
            os.write(2 if _fds_ready else log_fd, text)
        os._exit(1)
    finally:
        sys.stderr.flush()
        os._exit(1)
