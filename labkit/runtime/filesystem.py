"""What init mounts in the container's root filesystem, before pivot_root.

Every entry of the spec's ``mounts`` (proc, a tmpfs /dev, devpts, sysfs, the cgroup
files, the user's volumes) lands at its destination *inside* the new root, resolved
with ``secure_join`` so that a symlink in the image cannot point a mount at the host.
/dev gets the six device nodes every container has, and the console.

Man pages: mount(2), mount(8) (the option words), overlayfs(5) ("lowerdir").
Layer: runtime. Used by init.py in the container's first process.
"""

from __future__ import annotations

import errno
import os
import stat

from labkit.errors import SyscallError
from labkit.kernel import mounts, syscalls
from labkit.kernel.syscalls import MountFlags
from labkit.runtime.spec import Mount, Spec

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



def mount_rootfs(spec: Spec, root: str, lower_fds: list[int] | None = None) -> None:
    """Mount the root filesystem on ``root`` (pivot_root needs it to be a mount point).

    ``lower_fds``: the layers as idmapped mounts (kernel/idmap.py), which are attached at
    ``lower/0``, ``lower/1`` ... beside ``root`` first, and are the overlay's lower layers."""
    if spec.layers:
        layers = list(spec.layers)
        if lower_fds:
            from labkit.kernel import idmap  # (only with --userns=auto)

            layers = [os.path.join(os.path.dirname(root), "lower", str(i)) for i in range(len(lower_fds))]
            for fd, target in zip(lower_fds, layers, strict=True):
                idmap.attach(fd, target)
                os.close(fd)
        # overlayfs(5): lowerdir top first; upper gets every write; work is its scratch
        data = f"lowerdir={':'.join(layers)},upperdir={spec.upper},workdir={spec.work}"
        if "user" in spec.namespaces:  # in a user namespace only user.* xattrs mark opaque dirs
            data += ",userxattr"
        try:
            syscalls.mount("overlay", root, "overlay", 0, data)
        except SyscallError as err:
            if err.errno == errno.EINVAL and mounts.fstype_of(spec.upper) == "overlay":
                raise SyscallError(err.errno, "mount", f"overlay -> {root!r}",
                                   f"the upper dir {spec.upper} lies on an overlayfs, which overlayfs cannot "
                                   "write into: put the state root on ext4, xfs, btrfs or tmpfs (LABKIT_ROOT; "
                                   "rootless: XDG_DATA_HOME)") from None  # fmt: skip
            raise
    else:
        mounts.bind(root, root)


def mount_one(m: Mount, root: str, cgroup_dirs: dict[str, str]) -> None:
    """Mount one spec entry at its destination inside ``root`` (not yet pivoted)."""
    flags, data = parse_options(m.options)
    target = secure_join(root, m.destination)
    if m.is_bind:
        _make_target(target, is_dir=os.path.isdir(m.source))
        extra = flags & ~(MountFlags.MS_BIND | MountFlags.MS_REC | MountFlags.MS_RDONLY)
        mounts.bind(m.source, target, readonly=bool(flags & MountFlags.MS_RDONLY),
                    recursive=bool(flags & MountFlags.MS_REC), flags=extra)  # fmt: skip
        return
    _make_target(target, is_dir=True)
    if m.type == "cgroup":
        mount_cgroups(target, flags, cgroup_dirs)
        return
    try:
        syscalls.mount(m.source, target, m.type, flags, data or None)
    except SyscallError as err:
        # In a user namespace sysfs mounts only for the owner of the network namespace:
        # a container on the host's network gets the host's /sys, bound read-only (runc too).
        if m.type != "sysfs" or err.errno != errno.EPERM:
            raise
        mounts.bind("/sys", target, readonly=True, recursive=True, flags=flags & ~MountFlags.MS_RDONLY)


def mount_cgroups(target: str, flags: int, cgroup_dirs: dict[str, str]) -> None:
    """/sys/fs/cgroup shows the container only its own cgroup, read-only.

    cgroup v1 (what runc does): a tmpfs with one directory per controller, each a bind
    mount of the container's directory in that hierarchy. cgroup v2: a bind of its one
    directory. Without a cgroup the container sees an empty tmpfs.
    """
    plain = flags & ~(MountFlags.MS_RDONLY | MountFlags.MS_BIND | MountFlags.MS_REC)
    if set(cgroup_dirs) == {""}:  # v2: one tree
        mounts.bind(cgroup_dirs[""], target, readonly=True, recursive=False, flags=plain)
        return
    syscalls.mount("tmpfs", target, "tmpfs", plain, "mode=755")
    for controller, host_dir in sorted(cgroup_dirs.items()):
        sub = os.path.join(target, controller)
        os.mkdir(sub)
        mounts.bind(host_dir, sub, readonly=True, recursive=False, flags=plain)
    syscalls.mount(None, target, None, MountFlags.MS_REMOUNT | MountFlags.MS_RDONLY | plain)


def make_dev(root: str, console: str | None, bind_nodes: bool = False) -> None:
    """Fill the /dev tmpfs: six device nodes, the usual links, and the console.

    In a user namespace mknod(2) is refused (a device node would reach the host's
    hardware): ``bind_nodes`` bind-mounts the host's six nodes instead, as runc does."""
    dev = secure_join(root, "/dev")
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        if os.path.lexists(path):
            continue
        if bind_nodes:
            open(path, "w").close()
            mounts.bind(os.path.join("/dev", name), path, recursive=False)
        else:
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
        mounts.bind(console, path, recursive=False)


def copy_host_devices(root: str, host_dev: str = "/dev", limit: int = 4096) -> int:
    """--privileged: a node in the container's /dev for each of the host's devices (two
    levels deep, as /dev/net/tun). New nodes on the container's tmpfs, as Docker makes
    them: the host's /dev is never written. Returns how many were made."""
    dev, made = secure_join(root, "/dev"), 0
    for parent, rel in ((host_dev, ""), *((e.path, e.name) for e in os.scandir(host_dev)
                                          if e.is_dir(follow_symlinks=False) and e.name not in ("pts", "shm", "mqueue"))):  # fmt: skip
        for entry in os.scandir(parent):
            st = entry.stat(follow_symlinks=False)
            target = os.path.join(dev, rel, entry.name)
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) or os.path.lexists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.mknod(target, st.st_mode, st.st_rdev)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            made += 1
            if made >= limit:
                return made
    return made


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
