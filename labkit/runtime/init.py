"""The container's first process: everything it does between fork() and execve().

This is the part of runc called ``runc init``. It runs in the child, already PID 1 of
a new PID namespace, and turns itself into a container one step at a time, in the
order the notebooks build a container by hand:

 0. with a user namespace (we were born in it): wait for our id maps, be root in it (09)
 1. new namespaces: mount, UTS, IPC, network ... with unshare(2)      (notebooks 02, 03)
    and a new time namespace's clock offsets (time_namespaces(7))
 2. make every mount private, so nothing we mount leaks to the host   (notebook 04)
 3. the root filesystem: an overlay of the image's layers             (notebook 05)
 4. /proc, /dev, /dev/pts, /dev/shm, /sys read-only, the cgroup
    files, the user's volumes: all inside the new root               (notebook 04)
 5. pivot_root into it, and drop the old root: the host's files are gone (notebook 04)
 6. hide the /proc and /sys files that leak host data                 (notebook 09)
 7. hostname, loopback up, resource limits                            (notebooks 02, 08)
 8. be in the container's cgroup                                      (notebooks 06, 07)
 9. say "created", wait for ``start`` at the exec fifo (handshake.py)
10. drop capabilities, switch uid/gid, cd, execve the command         (notebook 09)
    with the seccomp filter loaded last (its BPF compiled or read from the
    cache before step 5, while the host's filesystem is reachable)     (notebook 09)

Step 8 is where the cgroup is *known* to hold us. On cgroup v2 the shim moves us while
we run steps 1-7 (a first move waits for the kernel, so it overlaps our work) and we
wait for its word; on v1 we move ourselves before step 1, while the host's cgroup
files are still in reach (V1Cgroup.join).

With LABKIT_TIMING=FILE each step writes the moment it begins into FILE (timing.py):
that is how notebook 12 draws a container start, phase by phase.

Errors before execve go back to the parent as one line on the sync pipe, with the
exit code Docker uses: 127 for a command that is not found, 126 for one that cannot be
executed. Man pages: unshare(2), mount_namespaces(7), pivot_root(2), capabilities(7),
execve(2). Layer: runtime. Called by shim.py in the forked child.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource  # imported now: after pivot_root the host's Python library is gone
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.errors import LabkitError, SyscallError
from labkit.kernel import mounts, seccomp, seccomp_cache, security, syscalls
from labkit.kernel.syscalls import CloneFlags, MountFlags
from labkit.runtime import filesystem, handshake, timing
from labkit.runtime.spec import NAMESPACES, Spec

EXIT_NOT_FOUND, EXIT_CANNOT_EXEC, EXIT_SETUP = 127, 126, 1


@dataclass
class Context:
    """What the parent hands to init besides the spec (all set up before fork)."""

    spec: Spec
    rootfs: str  # absolute path of the (future) root directory on the host
    fifo: str  # exec.fifo: opening it for writing blocks until `start` opens it for reading
    sync_fd: int  # write end of the pipe the parent reads "created" or an error from
    go_fd: int  # read end: the parent writes one byte once we are in our cgroup (-1: no wait)
    cgroup_dirs: dict[str, str] = field(default_factory=dict)  # controller -> host dir
    console: str | None = None  # path of a pty slave to bind on /dev/console
    join_cgroup: Callable[[], None] | None = None  # moves us into our cgroup (v1), else None
    seccomp_filter: bytes | None = None  # the BPF program, compiled (or cached) in setup, loaded before execve
    lower_fds: list[int] = field(default_factory=list)  # the layers as idmapped mounts, to attach (shim.py)


class InitError(Exception):
    """A step failed: carries the exit code the container will report."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def main(ctx: Context) -> None:
    """Run in the forked child; never returns (execve, or os._exit with an error)."""
    try:
        exe = setup(ctx)  # steps 1-7
        wait_for_cgroup(ctx)  # 8. in our cgroup before we say "created"
        os.close(wait_for_start(ctx))  # 9.
        finish_and_exec(ctx.spec, exe, ctx.seccomp_filter)  # 10.
    except InitError as err:
        _report(ctx.sync_fd, err.code, str(err))
    except LabkitError as err:
        _report(ctx.sync_fd, EXIT_SETUP, err.one_line())
    except BaseException as err:  # noqa: BLE001 - nothing may escape a forked child
        _report(ctx.sync_fd, EXIT_SETUP, f"init: {type(err).__name__}: {err}")
    os._exit(EXIT_SETUP)


def setup(ctx: Context) -> str:
    """Steps 1-7. Returns the command's resolved path inside the new root."""
    spec = ctx.spec
    os.umask(0o022)  # what a shell in a Docker container starts with
    if ctx.join_cgroup is not None:  # (v1) step 8 comes first: the host's cgroupfs is still in reach
        timing.mark("cgroup")  # LABKIT_TIMING: each step notes when it begins (timing.py)
        ctx.join_cgroup()
    if "user" in spec.namespaces:  # 0.
        become_root_inside(ctx)
    timing.mark("namespaces")
    enter_namespaces(ctx)  # 1.
    timing.mark("mounts")
    mounts.make_private("/")  # 2.
    filesystem.mount_rootfs(spec, ctx.rootfs, ctx.lower_fds)  # 3.
    mount_inside(ctx)  # 4.
    if ctx.seccomp_filter is None:  # (with a user namespace the shim compiled it)
        ctx.seccomp_filter = compile_seccomp(spec)  # for 10., while the host's libseccomp is reachable
    timing.mark("pivot_root")
    # exec.fifo lies outside the new root: keep an O_PATH fd that still reaches it
    fifo = os.open(ctx.fifo, os.O_PATH | os.O_CLOEXEC)
    mounts.pivot_into(ctx.rootfs)  # 5.
    ctx.fifo = f"/proc/self/fd/{fifo}"
    hide_host_files(spec)  # 6.
    set_environment(spec)  # 7.
    return find_executable(spec)


def become_root_inside(ctx: Context) -> None:
    """0. We were born in a new user namespace (shim.py), as uid 65534 with every
    capability *in it*, and no ids mapped yet. The parent writes our uid_map and gid_map,
    puts us into our cgroup (we may not write the host's cgroup files any more) and says
    go. Then setresuid(0): root inside, the map's first host id outside. Being root of
    the namespace that owns the ones we make next is what lets us mount in them."""
    wait_for_cgroup(ctx)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)  # all three were unmapped: we keep our capabilities (capabilities(7))


def enter_namespaces(ctx: Context) -> None:
    """1. Join the namespaces the spec names by path, then unshare(2) the new ones
    (the PID namespace is new already: we were born in it)."""
    spec = ctx.spec
    # (with a user namespace of our own the shim joined these for us, as we were cloned)
    for ns_type, path in () if "user" in spec.namespaces else spec.namespace_paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, _clone_flag(ns_type))
        finally:
            os.close(fd)
    flags = 0
    for ns_type in spec.namespaces:
        if ns_type not in ("pid", "user"):  # those two we were born in
            flags |= _clone_flag(ns_type)
    if "cgroup" in spec.namespaces:
        wait_for_cgroup(ctx)  # a new cgroup namespace is rooted at the cgroup we are in now
        timing.mark("namespaces")
    syscalls.unshare(flags)
    if "time" in spec.namespaces:
        set_clocks(spec)


def set_clocks(spec: Spec) -> None:
    """1. The new time namespace's offsets, then step into it.

    unshare(CLONE_NEWTIME) leaves us in the host's time namespace: the new one is only
    /proc/self/ns/time_for_children, and the kernel takes offsets until the first process
    enters it. Newer kernels (this course's 6.18) move us in at execve(2), older ones
    (Debian 12's 6.1, which the cgroup v2 guest boots) only our children: so we enter it
    ourselves, with setns(2) on that file, and the command we become, PID 1, is in it on
    every kernel.
    """
    from labkit.kernel.namespaces.unshare import set_time_offsets  # only a time namespace needs it

    if spec.time_offsets:
        set_time_offsets({clock: (secs, nanosecs) for clock, secs, nanosecs in spec.time_offsets})
    fd = os.open("/proc/self/ns/time_for_children", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(fd, CloneFlags.CLONE_NEWTIME)
    finally:
        os.close(fd)


def mount_inside(ctx: Context) -> None:
    """4. Every mount of the spec, then the device nodes, below the new root."""
    for m in ctx.spec.mounts:
        filesystem.mount_one(m, ctx.rootfs, ctx.cgroup_dirs)
    filesystem.make_dev(ctx.rootfs, ctx.console, bind_nodes="user" in ctx.spec.namespaces)
    if ctx.spec.host_devices:
        filesystem.copy_host_devices(ctx.rootfs)


def hide_host_files(spec: Spec) -> None:
    """6. Mask and write-protect what /proc and /sys tell about the host; a read-only root."""
    for path in spec.masked_paths:
        security.mask_path(path)
    for path in spec.readonly_paths:
        security.readonly_path(path)
    if spec.readonly:
        syscalls.mount(None, "/", None, MountFlags.MS_BIND | MountFlags.MS_REMOUNT | MountFlags.MS_RDONLY)


def set_environment(spec: Spec) -> None:
    """7. The hostname, a working loopback, the resource limits."""
    if "uts" in spec.namespaces and spec.hostname:
        syscalls.sethostname(spec.hostname)
    if "network" in spec.namespaces:
        loopback_up()
    for r in spec.rlimits:
        resource.setrlimit(getattr(resource, r.type), (r.soft, r.hard))


def wait_for_cgroup(ctx: Context) -> None:
    """8. Block until the parent has put us into the container's cgroup (once)."""
    if ctx.go_fd < 0:
        return
    timing.mark("cgroup")
    if not handshake.wait_go(ctx.go_fd):
        raise InitError(EXIT_SETUP, "the parent went away before the container was created")
    os.close(ctx.go_fd)
    ctx.go_fd = -1


def wait_for_start(ctx: Context) -> int:
    """9. Tell the parent we are created, then block on exec.fifo until `start` opens it."""
    timing.mark("created")
    handshake.send(ctx.sync_fd, "created")
    return handshake.wait_for_start(ctx.fifo)


def compile_seccomp(spec: Spec) -> bytes | None:
    """The BPF program for the spec's rules (None without any), not yet loaded: compiled
    by libseccomp the first time, then read from the state root's cache."""
    if spec.seccomp is None:
        return None
    timing.mark("seccomp")
    return seccomp_cache.program(spec.seccomp)


def finish_and_exec(spec: Spec, exe: str, seccomp_filter: bytes | None = None) -> None:
    """10. Become the user's process. After this, only the kernel can help.

    The seccomp filter comes last, so that it only judges the command, not our set-up.
    Without no_new_privs, loading one needs CAP_SYS_ADMIN, which the capability step
    takes away: then it is loaded just before that step (runc does the same).
    """
    if spec.no_new_privileges:
        security.set_no_new_privs()
    elif seccomp_filter is not None:
        timing.mark("seccomp")
        seccomp.load(seccomp_filter)
    timing.mark("capabilities")
    security.drop_bounding(spec.capabilities)  # needs CAP_SETPCAP: before the switch
    if _setgroups_allowed():
        os.setgroups(list(spec.additional_gids))
    elif spec.additional_gids:
        raise InitError(EXIT_SETUP, "additional groups: this user namespace denies setgroups(2) (rootless, "
                                    "without a subordinate gid range in /etc/subgid)")  # fmt: skip
    os.setgid(spec.gid)
    if spec.uid != 0:
        # setuid from 0 clears every capability unless KEEPCAPS is set; keep them so
        # capset below decides, as runc does, then execve drops what a non-root lacks
        syscalls.prctl(syscalls.Prctl.PR_SET_KEEPCAPS, 1)
    os.setuid(spec.uid)
    security.set_caps(spec.capabilities, spec.capabilities)
    for cap in spec.ambient:
        try:  # an ambient cap must be permitted and inheritable; runc ignores failures too
            syscalls.prctl(syscalls.Prctl.PR_CAP_AMBIENT, 2, security.CAPABILITIES[cap.removeprefix("CAP_")])
        except SyscallError:
            pass
    try:
        os.chdir(spec.cwd)
    except OSError as err:
        raise InitError(EXIT_CANNOT_EXEC, f"chdir to cwd ({spec.cwd!r}) set in config.json failed: {err.strerror}")
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across
    # execve, so give the command the default actions every program expects
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    env = dict(e.split("=", 1) for e in spec.env)
    if spec.no_new_privileges and seccomp_filter is not None:
        timing.mark("seccomp")
        seccomp.load(seccomp_filter)  # the last step: from here on the filter judges every call
    timing.mark("exec")
    try:
        os.execve(exe, list(spec.args), env)
    except OSError as err:
        code = EXIT_NOT_FOUND if err.errno == errno.ENOENT else EXIT_CANNOT_EXEC
        raise InitError(code, f'exec: "{spec.args[0]}": {err.strerror.lower()}')



# -- helpers ------------------------------------------------------------------------------


def loopback_up() -> None:
    """`ip link set lo up` without netlink: the SIOCSIFFLAGS ioctl (netdevice(7))."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


def _setgroups_allowed() -> bool:
    """/proc/self/setgroups says "deny" in a user namespace whose gid map an ordinary
    user wrote (user_namespaces(7)); setgroups(2) then fails even for root inside."""
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() != "deny"
    except OSError:
        return True


def find_executable(spec: Spec) -> str:
    """execvp's search, done now so a missing command is an error of `create`, as in runc."""
    name = spec.args[0]
    env = dict(e.split("=", 1) for e in spec.env)
    if "/" in name:
        candidates = [name if name.startswith("/") else os.path.join(spec.cwd, name)]
    else:
        candidates = [os.path.join(d or ".", name) for d in env.get("PATH", "").split(":")]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    for path in candidates:
        if os.path.exists(path):
            raise InitError(EXIT_CANNOT_EXEC, f'exec: "{name}": permission denied')
    if "/" in name:
        raise InitError(EXIT_NOT_FOUND, f'exec: "{name}": stat {name}: no such file or directory')
    raise InitError(EXIT_NOT_FOUND, f'exec: "{name}": executable file not found in $PATH')


def _clone_flag(ns_type: str) -> int:
    return {
        "pid": CloneFlags.CLONE_NEWPID, "net": CloneFlags.CLONE_NEWNET, "mnt": CloneFlags.CLONE_NEWNS,
        "ipc": CloneFlags.CLONE_NEWIPC, "uts": CloneFlags.CLONE_NEWUTS, "user": CloneFlags.CLONE_NEWUSER,
        "cgroup": CloneFlags.CLONE_NEWCGROUP, "time": CloneFlags.CLONE_NEWTIME,
    }[NAMESPACES[ns_type]]  # fmt: skip


def _report(sync_fd: int, code: int, message: str) -> None:
    """Send ``error CODE MESSAGE`` and exit; after `start` nobody listens: stderr gets it."""
    if not handshake.send(sync_fd, f"error {code} {message}".strip()):
        os.write(2, f"labkit: {message}\n".encode())
    os._exit(code)
