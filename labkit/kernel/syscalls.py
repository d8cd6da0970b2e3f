"""The system calls a container is made of, as typed Python functions.

unshare(2), setns(2), mount(2), umount2(2), pivot_root(2), sethostname(2) and prctl(2),
with the kernel's flag values as ``enum.IntFlag``s. Python 3.12 has ``os.unshare`` and
``os.setns``, and labkit uses them there; everything else (and 3.11) goes through
ctypes into the C library. A failed call raises ``SyscallError`` (an ``OSError``) whose
message names the call, its arguments and the errno:

    mount('overlay' -> '/x', type='overlay'): EINVAL: Invalid argument

Layer: kernel. Used by namespaces, overlay, the runtime's init. Man pages: the ones above.
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
import warnings

from labkit.errors import SyscallError

_libc = ctypes.CDLL(None, use_errno=True)
_libc_gil = ctypes.PyDLL(None, use_errno=True)


class CloneFlags(enum.IntFlag):
    """Namespace flags for unshare(2), setns(2) and clone(2) (linux/sched.h)."""

    CLONE_NEWTIME = 0x00000080
    CLONE_NEWNS = 0x00020000  # mount: the first namespace, hence its generic name
    CLONE_NEWCGROUP = 0x02000000
    CLONE_NEWUTS = 0x04000000
    CLONE_NEWIPC = 0x08000000
    CLONE_NEWUSER = 0x10000000
    CLONE_NEWPID = 0x20000000
    CLONE_NEWNET = 0x40000000


class MountFlags(enum.IntFlag):
    """mountflags for mount(2) (linux/mount.h)."""

    MS_RDONLY = 1
    MS_NOSUID = 2
    MS_NODEV = 4
    MS_NOEXEC = 8
    MS_SYNCHRONOUS = 16
    MS_REMOUNT = 32
    MS_MANDLOCK = 64
    MS_DIRSYNC = 128
    MS_NOSYMFOLLOW = 256
    MS_NOATIME = 1024
    MS_NODIRATIME = 2048
    MS_BIND = 4096
    MS_MOVE = 8192
    MS_REC = 16384
    MS_SILENT = 32768
    MS_POSIXACL = 1 << 16
    MS_UNBINDABLE = 1 << 17  # propagation types: exactly one of these four
    MS_PRIVATE = 1 << 18
    MS_SLAVE = 1 << 19
    MS_SHARED = 1 << 20
    MS_RELATIME = 1 << 21
    MS_STRICTATIME = 1 << 24
    MS_LAZYTIME = 1 << 25


class UmountFlags(enum.IntFlag):
    """flags for umount2(2)."""

    MNT_FORCE = 1
    MNT_DETACH = 2  # lazy: detach now, free when no longer busy
    MNT_EXPIRE = 4
    UMOUNT_NOFOLLOW = 8


class Prctl(enum.IntEnum):
    """The prctl(2) options labkit uses (linux/prctl.h)."""

    PR_SET_PDEATHSIG = 1
    PR_SET_KEEPCAPS = 8
    PR_SET_NAME = 15
    PR_SET_SECCOMP = 22
    PR_CAPBSET_READ = 23
    PR_CAPBSET_DROP = 24
    PR_SET_CHILD_SUBREAPER = 36
    PR_SET_NO_NEW_PRIVS = 38
    PR_GET_NO_NEW_PRIVS = 39
    PR_CAP_AMBIENT = 47


# pivot_root has no wrapper in glibc: call it by number.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "armv7l": 218, "riscv64": 41}


def flag_names(flags: int, kind: type[enum.IntFlag]) -> str:
    """'MS_BIND|MS_REC' for a flags value, '0' for none; unknown bits in hex."""
    names, rest = [], int(flags)
    for member in kind:
        if member.value and rest & member.value == member.value:
            names.append(member.name)
            rest &= ~member.value
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def _check(result: int, call: str, args: str) -> int:
    if result == -1:
        raise SyscallError(ctypes.get_errno(), call, args)
    return result


def _b(path: str | os.PathLike | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def fork() -> int:
    """os.fork(), without Python 3.12's warning about forking a process that has threads.

    The warning is about a child that goes on running Python while another thread held a
    lock at the moment of the fork. labkit's children only make system calls and exec (a
    Jupyter kernel, which has threads, is where the warning would otherwise show).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


_pid_for_children = threading.Lock()


def fork_as_pid1() -> int:
    """fork() a child that is PID 1 of a new PID namespace, with no process in between.

    unshare(CLONE_NEWPID) does not move the caller: it only changes the namespace the
    caller's next children are born in (/proc/self/ns/pid_for_children). So change it for
    the moment of one fork, then set it back with setns() to our own PID namespace. The
    lock keeps another thread of ours from forking in between.
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _pid_for_children:  # released in the parent and in the child alike
            unshare(CloneFlags.CLONE_NEWPID)
            child = -1
            try:
                child = fork()
            finally:
                if child != 0:  # the parent (or a failed fork) goes back to normal
                    setns(own, CloneFlags.CLONE_NEWPID)
            return child
    finally:
        os.close(own)


# clone(2) by number: glibc's wrapper wants a new stack and a function to run on it
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "armv7l": 120, "riscv64": 220}


def fork_into_user_namespace(pid_namespace: bool = True) -> int:
    """fork() a child born in a new user namespace (and a new PID namespace it owns).

    A process cannot give a user namespace to its children the way unshare(CLONE_NEWPID)
    does ("for children"): unshare(CLONE_NEWUSER) moves the caller itself. So this is
    clone(2) without a new stack, which returns twice like fork(): 0 in the child, its pid
    in the parent. Both namespaces are made by the same call, so the PID namespace belongs
    to the new user namespace, and root there may mount a /proc for it.

    The child starts as uid 65534 (no mapping yet) with every capability *inside*; the
    parent writes /proc/CHILD/uid_map and gid_map (user_namespaces(7)). A raw clone skips
    Python's own fork bookkeeping, so the caller must have one thread only (a shim has).
    """
    nr = _SYS_CLONE.get(os.uname().machine)
    if nr is None:
        raise SyscallError(38, "clone", f"no syscall number for {os.uname().machine}")
    flags = CloneFlags.CLONE_NEWUSER | (CloneFlags.CLONE_NEWPID if pid_namespace else 0)
    with _pid_for_children:
        # through PyDLL, which keeps the GIL during the call: no other Python thread is
        # halfway through anything at the moment the child's copy of memory is taken
        pid = _libc_gil.syscall(ctypes.c_long(nr), ctypes.c_ulong(int(flags) | 17), None, None, None, None)  # 17: SIGCHLD
    if pid == -1:
        err = ctypes.get_errno()
        if os.geteuid() != 0 and err in (1, 13, 28):  # EPERM, EACCES, ENOSPC: the system says no
            raise SyscallError(err, "clone", flag_names(flags, CloneFlags), _USERNS_OFF)
        raise SyscallError(err, "clone", flag_names(flags, CloneFlags))
    return pid


# where a distribution turns unprivileged user namespaces off
_USERNS_OFF = ("unprivileged user namespaces are off here: see sysctl user.max_user_namespaces (0 turns "
               "them off), kernel.unprivileged_userns_clone (older Debian kernels) and "
               "kernel.apparmor_restrict_unprivileged_userns (Ubuntu 24.04)")


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces of the kinds in ``flags``.

    A new PID namespace applies to the caller's *next* child, not to the caller.
    """
    args = flag_names(flags, CloneFlags)
    if hasattr(os, "unshare"):  # Python 3.12+
        try:
            os.unshare(flags)
        except OSError as e:
            raise SyscallError(e.errno, "unshare", args) from None
        return
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", args)


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace that ``fd`` (an open /proc/PID/ns/KIND) refers to.

    ``nstype`` 0 accepts any kind; a CLONE_NEW* value makes the kernel check the kind.
    """
    args = f"fd={fd}, {flag_names(nstype, CloneFlags)}"
    if hasattr(os, "setns"):
        try:
            os.setns(fd, nstype)
        except OSError as e:
            raise SyscallError(e.errno, "setns", args) from None
        return
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", args)


def mount(
    source: str | os.PathLike | None,
    target: str | os.PathLike,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2). ``data`` is the comma-separated option string (e.g. overlay's dirs)."""
    args = f"{os.fspath(source) if source is not None else None!r} -> {os.fspath(target)!r}"
    if fstype:
        args += f", type={fstype!r}"
    if flags:
        args += f", {flag_names(flags, MountFlags)}"
    res = _libc.mount(
        _b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data) if data else None
    )
    _check(res, "mount", args)


def umount2(target: str | os.PathLike, flags: int = 0) -> None:
    """Unmount ``target``; ``UmountFlags.MNT_DETACH`` for a lazy unmount."""
    args = repr(os.fspath(target)) + (f", {flag_names(flags, UmountFlags)}" if flags else "")
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount2", args)


def pivot_root(new_root: str | os.PathLike, put_old: str | os.PathLike) -> None:
    """Make ``new_root`` the root of this mount namespace; the old root moves to ``put_old``.

    ``new_root`` must be a mount point, and must not be on the same mount as the
    current root (bind-mount it onto itself first); ``put_old`` must be below it.
    """
    args = f"{os.fspath(new_root)!r}, {os.fspath(put_old)!r}"
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SyscallError(38, "pivot_root", args, f"unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(nr), _b(new_root), _b(put_old)), "pivot_root", args)


def sethostname(name: str) -> None:
    """Set the hostname of the caller's UTS namespace."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", repr(name))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns the call's result (some options return a value)."""
    name = Prctl(option).name if option in Prctl._value2member_map_ else str(option)
    res = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(arg4),
        ctypes.c_ulong(arg5),
    )
    return _check(res, "prctl", f"{name}, {arg2}")
