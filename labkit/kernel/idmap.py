"""Idmapped mounts: show a directory tree with its owners shifted, without touching a file.

A user namespace maps ids: with ``0 1000000 65536`` root inside is host uid 1000000. An
image's files belong to host uid 0, which that namespace cannot even name (it shows
65534, "nobody"). An *idmapped mount* (Linux 5.12, mount_setattr(2)) of the image's
directory carries a user namespace's map: through it, a file of host uid 0 is seen, and
written, as uid 1000000, so root in the container owns its image, while the files on disk
stay as they are. overlayfs accepts idmapped lower layers from Linux 5.19 on.

It takes the new mount API, three system calls with no wrapper in Python or glibc:

    fd = open_tree(dir, OPEN_TREE_CLONE)       a copy of the mount at dir, attached nowhere
    mount_setattr(fd, MOUNT_ATTR_IDMAP, ns)    give the copy the map of user namespace ns
    move_mount(fd, target)                     attach it, in the mount namespace of the caller

Only root of the host may idmap a host filesystem, so the first two run in the shim,
before the container's user namespace exists: a throwaway process with the same map
lends its namespace (``map_holder``), since a mount keeps the map, not the process. init
inherits the fds and does the third inside its own mount namespace: the host's mount
table never shows them.

Man pages: mount_setattr(2), open_tree(2), move_mount(2), user_namespaces(7).
Layer: kernel. Used by the runtime (shim.py makes them, filesystem.py attaches them).
"""

from __future__ import annotations

import ctypes
import os
import signal

from labkit.errors import SyscallError
from labkit.kernel import syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# syscall numbers (the same on x86_64 and on the newer "generic" table of aarch64/riscv64)
_NR = {"x86_64": (428, 429, 442), "aarch64": (428, 429, 442), "riscv64": (428, 429, 442)}
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):  # struct mount_attr (linux/mount.h)
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _call(index: int, name: str, args: str, *params) -> int:
    numbers = _NR.get(os.uname().machine)
    if numbers is None:
        raise SyscallError(38, name, args)  # ENOSYS
    result = _libc.syscall(ctypes.c_long(numbers[index]), *params)
    if result < 0:
        raise SyscallError(ctypes.get_errno(), name, args)
    return result


def map_holder(uid_map, gid_map) -> int:
    """An fd of a user namespace with these maps (rows of inside, outside, count). A child
    makes it and is gone again at once; the fd keeps the namespace alive."""
    from labkit.kernel.namespaces.unshare import write_id_maps

    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # unshare, tell the parent, wait to be killed
        try:
            syscalls.unshare(syscalls.CloneFlags.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        os.close(done_r)
        if os.read(ready_r, 1) != b"u":
            raise SyscallError(1, "unshare", "CLONE_NEWUSER")
        write_id_maps(child, uid_map, gid_map, allow_setgroups=True)
        return os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)  # the child reads EOF and leaves
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached copy of the mount at ``path`` (and below), idmapped with ``userns_fd``'s
    map: an fd to hand to ``attach``."""
    fd = _call(0, "open_tree", repr(path), AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | os.O_CLOEXEC)
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _call(2, "mount_setattr", f"{path!r}, MOUNT_ATTR_IDMAP", fd, b"", AT_EMPTY_PATH,
              ctypes.byref(attr), ctypes.sizeof(attr))  # fmt: skip
    except SyscallError:
        os.close(fd)
        raise
    return fd


def attach(fd: int, target: str) -> None:
    """Mount the detached tree ``fd`` on the directory ``target`` (move_mount(2))."""
    _call(1, "move_mount", f"fd {fd} -> {target!r}", fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)


def supported(path: str) -> bool:
    """Can the filesystem at ``path`` be idmapped here (kernel, filesystem, our rights), and
    be an overlay's lower layer so (Linux 5.19)? Tried for real: make a map holder, idmap a
    copy of ``path``, throw both away."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (5, 19) or os.geteuid() != 0:
        return False
    try:
        holder = map_holder(((0, 1, 1),), ((0, 1, 1),))
    except (OSError, ValueError):
        return False
    try:
        os.close(idmapped_tree(path, holder))
        return True
    except OSError:
        return False
    finally:
        os.close(holder)
