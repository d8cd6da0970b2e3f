"""The container's first process: everything it does between fork() and execve().

This is the part of runc called ``runc init``. It runs in the child, already PID 1 of
a new PID namespace, and turns itself into a container step by step, in the order you
would write it by hand:

 1. new namespaces (mount, UTS, IPC, network, ...) with unshare(2)
 2. make every mount private, so nothing we mount leaks back to the host
 3. the root filesystem: an overlay of the image's layers (or the bundle's rootfs dir)
 4. /proc, /dev (a tmpfs with only a few device nodes), /dev/pts, /dev/shm,
    /dev/mqueue, /sys read-only, the cgroup files, the user's volumes
 5. pivot_root into it, and unmount the old root: the host's files are gone
 6. mask and write-protect the /proc and /sys files that leak host data
 7. hostname, loopback up, resource limits
 8. be in the container's cgroup: on cgroup v2 the parent moves us while we run steps
    1-7 and we wait for its word; on v1 we moved ourselves before step 1, which is
    cheaper (see V1Cgroup.join). Then wait until ``start`` (a fifo, like runc's exec.fifo)
 9. drop capabilities, switch uid/gid, cd, execve the command

Errors before execve go back to the parent as one line on the sync pipe, with the
exit code Docker uses: 127 for a command that is not found, 126 for one that cannot be
executed. Man pages: unshare(2), mount(2), mount_namespaces(7), pivot_root(2),
capabilities(7), execve(2). Layer: runtime. Called by container.py in a forked child.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource  # imported now: after pivot_root the host's Python library is gone
import signal
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.errors import LabkitError, SyscallError
from labkit.kernel import security, syscalls
from labkit.kernel.syscalls import CloneFlags, MountFlags, UmountFlags
from labkit.runtime.spec import NAMESPACES, Mount, Spec

# mount(8) option words -> (flag, set it?). Anything else goes to the filesystem as data.
_OPTION_FLAGS = {
    "ro": (MountFlags.MS_RDONLY, True), "rw": (MountFlags.MS_RDONLY, False),
    "nosuid": (MountFlags.MS_NOSUID, True), "suid": (MountFlags.MS_NOSUID, False),
    "nodev": (MountFlags.MS_NODEV, True), "dev": (MountFlags.MS_NODEV, False),
    "noexec": (MountFlags.MS_NOEXEC, True), "exec": (MountFlags.MS_NOEXEC, False),
    "relatime": (MountFlags.MS_RELATIME, True), "strictatime": (MountFlags.MS_STRICTATIME, True),
    "noatime": (MountFlags.MS_NOATIME, True), "bind": (MountFlags.MS_BIND, True),
    "rbind": (MountFlags.MS_BIND | MountFlags.MS_REC, True),
}  # fmt: skip
_PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave"}

# The device nodes every container gets (runtime-spec "Default Devices"): name -> (major, minor)
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}  # fmt: skip

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


class InitError(Exception):
    """A step failed: carries the exit code the container will report."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def main(ctx: Context) -> None:
    """Run in the forked child; never returns (execve, or os._exit with an error)."""
    try:
        exe = setup(ctx)
        _wait_for_parent(ctx)  # in our cgroup before we say "created"
        os.close(_wait_for_start(ctx))
        finish_and_exec(ctx.spec, exe)
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
        ctx.join_cgroup()
    # 1. namespaces: join the given ones, then make new ones (the PID one is already new)
    for ns_type, path in spec.namespace_paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, _clone_flag(ns_type))
        finally:
            os.close(fd)
    flags = 0
    for ns_type in spec.namespaces:
        if ns_type != "pid":
            flags |= _clone_flag(ns_type)
    if "cgroup" in spec.namespaces:
        _wait_for_parent(ctx)  # a new cgroup namespace is rooted at the cgroup we are in now
    syscalls.unshare(flags)
    if "mount" not in spec.namespaces:
        raise InitError(EXIT_SETUP, "a container needs its own mount namespace ('mount' in linux.namespaces)")
    # 2. no mount event may travel back to the host's mount table
    syscalls.mount(None, "/", None, MountFlags.MS_REC | MountFlags.MS_PRIVATE)
    # 3. the root filesystem, then 4. everything mounted inside it
    root = ctx.rootfs
    mount_rootfs(spec, root)
    for m in spec.mounts:
        mount_one(m, root, ctx.cgroup_dirs)
    make_dev(root, ctx.console)
    fifo = os.open(ctx.fifo, os.O_PATH | os.O_CLOEXEC)  # reachable after pivot_root
    # 5. the new root becomes "/"; the old one is stacked under it and then dropped
    pivot_into(root)
    ctx.fifo = f"/proc/self/fd/{fifo}"
    # 6. hide what /proc and /sys tell about the host
    for path in spec.masked_paths:
        security.mask_path(path)
    for path in spec.readonly_paths:
        security.readonly_path(path)
    if spec.readonly:
        flags = MountFlags.MS_BIND | MountFlags.MS_REMOUNT | MountFlags.MS_RDONLY
        syscalls.mount(None, "/", None, flags)
    # 7. the rest of the environment
    if "uts" in spec.namespaces and spec.hostname:
        syscalls.sethostname(spec.hostname)
    if "network" in spec.namespaces:
        loopback_up()
    for r in spec.rlimits:
        resource.setrlimit(getattr(resource, r.type), (r.soft, r.hard))
    return find_executable(spec)


def mount_rootfs(spec: Spec, root: str) -> None:
    """Mount the root filesystem on ``root`` (pivot_root needs it to be a mount point)."""
    if spec.layers:
        # overlayfs(5): lowerdir top first; upper gets every write; work is its scratch
        data = f"lowerdir={':'.join(spec.layers)},upperdir={spec.upper},workdir={spec.work}"
        syscalls.mount("overlay", root, "overlay", 0, data)
    else:
        syscalls.mount(root, root, None, MountFlags.MS_BIND | MountFlags.MS_REC)


def mount_one(m: Mount, root: str, cgroup_dirs: dict[str, str]) -> None:
    """Mount one spec entry at its destination inside ``root`` (not yet pivoted)."""
    flags, data = parse_options(m.options)
    target = secure_join(root, m.destination)
    if m.is_bind:
        _make_target(target, is_dir=os.path.isdir(m.source))
        syscalls.mount(m.source, target, None, flags | MountFlags.MS_BIND)
        if flags & MountFlags.MS_RDONLY:  # a bind takes MS_RDONLY only on a remount
            syscalls.mount(None, target, None, flags | MountFlags.MS_BIND | MountFlags.MS_REMOUNT)
        return
    _make_target(target, is_dir=True)
    if m.type == "cgroup":
        mount_cgroups(target, flags, cgroup_dirs)
        return
    syscalls.mount(m.source, target, m.type, flags, data or None)


def mount_cgroups(target: str, flags: int, cgroup_dirs: dict[str, str]) -> None:
    """/sys/fs/cgroup shows the container only its own cgroup, read-only.

    cgroup v1 (what runc does): a tmpfs with one directory per controller, each a bind
    mount of the container's directory in that hierarchy. cgroup v2: a bind of its one
    directory. Without a cgroup the container sees an empty tmpfs.
    """
    ro = MountFlags.MS_BIND | MountFlags.MS_REMOUNT | MountFlags.MS_RDONLY
    plain = flags & ~(MountFlags.MS_RDONLY | MountFlags.MS_BIND | MountFlags.MS_REC)
    if set(cgroup_dirs) == {""}:  # v2: one tree
        syscalls.mount(cgroup_dirs[""], target, None, MountFlags.MS_BIND)
        syscalls.mount(None, target, None, ro | plain)
        return
    syscalls.mount("tmpfs", target, "tmpfs", plain, "mode=755")
    for controller, host_dir in sorted(cgroup_dirs.items()):
        sub = os.path.join(target, controller)
        os.mkdir(sub)
        syscalls.mount(host_dir, sub, None, MountFlags.MS_BIND)
        syscalls.mount(None, sub, None, ro | plain)
    syscalls.mount(None, target, None, MountFlags.MS_REMOUNT | MountFlags.MS_RDONLY | plain)


def make_dev(root: str, console: str | None) -> None:
    """Fill the /dev tmpfs: six device nodes, the usual links, and the console."""
    dev = secure_join(root, "/dev")
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        if not os.path.lexists(path):
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)  # the umask took bits away from mknod's mode
    for name, target in DEV_LINKS.items():
        path = os.path.join(dev, name)
        if not os.path.lexists(path):
            os.symlink(target, path)
    if console:
        path = os.path.join(dev, "console")
        if not os.path.lexists(path):
            open(path, "w").close()
        syscalls.mount(console, path, None, MountFlags.MS_BIND)


def pivot_into(root: str) -> None:
    """pivot_root(".", "."): the old root ends up stacked under the new one; detach it.

    This is runc's trick: no put_old directory is needed, and after the lazy unmount
    nothing of the host's file tree is reachable from this mount namespace.
    """
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", UmountFlags.MNT_DETACH)
    os.chdir("/")


def loopback_up() -> None:
    """`ip link set lo up` without netlink: the SIOCSIFFLAGS ioctl (netdevice(7))."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


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


def finish_and_exec(spec: Spec, exe: str) -> None:
    """Step 9: become the user's process. After this, only the kernel can help."""
    if spec.no_new_privileges:
        security.set_no_new_privs()
    security.drop_bounding(spec.capabilities)  # needs CAP_SETPCAP: before the switch
    os.setgroups(list(spec.additional_gids))
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
    try:
        os.execve(exe, list(spec.args), env)
    except OSError as err:
        code = EXIT_NOT_FOUND if err.errno == errno.ENOENT else EXIT_CANNOT_EXEC
        raise InitError(code, f'exec: "{spec.args[0]}": {err.strerror.lower()}')


# -- helpers ------------------------------------------------------------------------------


def secure_join(root: str, path: str) -> str:
    """``root/path`` with every symlink resolved as if ``root`` were ``/``.

    An image may contain ``/proc -> /etc``, or ``/data -> /``: following such a link on
    the host side would mount over the host's own files. Here ``..`` and absolute link
    targets never climb above ``root`` (the same idea as Go's filepath-securejoin).
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        if os.path.islink(here):
            hops += 1
            if hops > 40:
                raise SyscallError(errno.ELOOP, "secure_join", repr(path))
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def parse_options(options: tuple[str, ...]) -> tuple[int, str]:
    """mount(8) options -> (MS_* flags, filesystem data string)."""
    flags, data = 0, []
    for opt in options:
        if opt in _OPTION_FLAGS:
            bit, on = _OPTION_FLAGS[opt]
            flags = flags | bit if on else flags & ~bit
        elif opt not in _PROPAGATION:
            data.append(opt)
    return flags, ",".join(data)


def _make_target(target: str, is_dir: bool) -> None:
    if os.path.lexists(target):
        return
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()


def _clone_flag(ns_type: str) -> int:
    return {
        "pid": CloneFlags.CLONE_NEWPID, "net": CloneFlags.CLONE_NEWNET, "mnt": CloneFlags.CLONE_NEWNS,
        "ipc": CloneFlags.CLONE_NEWIPC, "uts": CloneFlags.CLONE_NEWUTS, "user": CloneFlags.CLONE_NEWUSER,
        "cgroup": CloneFlags.CLONE_NEWCGROUP, "time": CloneFlags.CLONE_NEWTIME,
    }[NAMESPACES[ns_type]]  # fmt: skip


def _wait_for_parent(ctx: Context) -> None:
    """Block until the parent has put us into the container's cgroup (once)."""
    if ctx.go_fd < 0:
        return
    if not os.read(ctx.go_fd, 1):
        raise InitError(EXIT_SETUP, "the parent went away before the container was created")
    os.close(ctx.go_fd)
    ctx.go_fd = -1


def _wait_for_start(ctx: Context) -> int:
    """Tell the parent we are created, then block on exec.fifo until `start` reads it."""
    send(ctx.sync_fd, "created")
    fd = os.open(ctx.fifo, os.O_WRONLY | os.O_CLOEXEC)  # blocks here: this is "created"
    os.write(fd, b"0")
    return fd


def send(fd: int, line: str) -> None:
    """One line on the sync pipe; a parent that stopped listening is not an error."""
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass


def _report(sync_fd: int, code: int, message: str) -> None:
    try:
        os.write(sync_fd, f"error {code} {message}\n".replace("\n", " ").strip().encode() + b"\n")
    except OSError:  # nobody listens any more (after `start`): the log/terminal gets it
        os.write(2, f"labkit: {message}\n".encode())
    os._exit(code)
