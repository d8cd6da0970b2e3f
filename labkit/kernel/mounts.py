"""The mount table: read it, bind-mount, change propagation, unmount a subtree.

``/proc/PID/mountinfo`` is the mount table as one process sees it (its mount namespace
and its root). Each line names a mount, its parent, what is mounted where, and how it
propagates: ``shared:N`` (mounts and unmounts spread to the peer group N), ``master:N``
(a slave: receives from N, sends nothing back), or nothing (private).

Man pages: proc(5) "/proc/pid/mountinfo", mount(2), mount_namespaces(7).
Layer: kernel. Used by overlay, namespaces.spawn, the runtime's init, cleanup and the notebooks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from labkit.kernel import syscalls
from labkit.kernel.syscalls import MountFlags, UmountFlags


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo."""

    mount_id: int
    parent_id: int
    major_minor: str
    root: str  # the directory of the filesystem that is mounted (not "/" for a bind mount)
    mountpoint: str
    options: str
    propagation: str  # "shared:1", "master:2", "shared:1 master:2" or "private"
    fstype: str
    source: str
    super_options: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options.split(",")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...)
    if "\\" not in field:  # nearly every field: every container start reads the table
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text (pure function: tests feed it fixed strings)."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        optional = [x for x in f[6:] if x]
        mounts.append(
            Mount(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                major_minor=f[2],
                root=_unescape(f[3]),
                mountpoint=_unescape(f[4]),
                options=f[5],
                propagation=" ".join(optional) or "private",
                fstype=r[0],
                source=_unescape(r[1]) if len(r) > 1 else "",
                super_options=r[2] if len(r) > 2 else "",
            )
        )
    return mounts


def mountinfo(pid: int | str = "self") -> list[Mount]:
    """The mount table as process ``pid`` sees it."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return parse_mountinfo(f.read())


def on_noexec_mount(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies on a mount with ``noexec``: no program there may run, whatever
    its mode says (execve fails with EACCES). /run is one on some systems (Debian 13)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_NOEXEC)
    except OSError:
        return False


def fstype_of(path: str | os.PathLike) -> str:
    """The filesystem type ``path`` lies on ("ext4", "tmpfs", "overlay" ...): the mount
    with the longest mount point that holds it."""
    real = os.path.realpath(path)
    best = max((m for m in mountinfo() if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")),
               key=lambda m: len(m.mountpoint), default=None)  # fmt: skip
    return best.fstype if best else ""


def is_mountpoint(path: str | os.PathLike) -> bool:
    real = os.path.realpath(path)
    return any(m.mountpoint == real for m in mountinfo())


def mounts_below(path: str | os.PathLike, pid: int | str = "self") -> list[Mount]:
    """Mounts at or below ``path``, deepest first (the order to unmount them in)."""
    top = os.path.realpath(path).rstrip("/") or "/"
    found = [m for m in mountinfo(pid) if m.mountpoint == top or m.mountpoint.startswith(top + "/")]
    return sorted(found, key=lambda m: (m.mountpoint.count("/"), m.mount_id), reverse=True)


def bind(src: str | os.PathLike, dst: str | os.PathLike, *, readonly: bool = False, recursive: bool = True,
         flags: int = 0) -> None:  # fmt: skip
    """Make ``src`` visible at ``dst`` too (``mount --bind``; ``--rbind`` when recursive).

    A read-only bind needs a second call: the first mount(2) ignores MS_RDONLY together
    with MS_BIND, so remount the new mount with MS_REMOUNT|MS_BIND|MS_RDONLY. ``flags``
    (MS_NOSUID, MS_NODEV, ...) go with that remount too: it replaces the mount's flags.
    """
    syscalls.mount(src, dst, None, flags | MountFlags.MS_BIND | (MountFlags.MS_REC if recursive else 0))
    if readonly:
        syscalls.mount(None, dst, None, flags | MountFlags.MS_REMOUNT | MountFlags.MS_BIND | MountFlags.MS_RDONLY)


def pivot_into(root: str | os.PathLike) -> None:
    """Make the mount point ``root`` this mount namespace's ``/``, and drop the old root.

    This is runc's way: with pivot_root(".", ".") the old root ends up stacked under the
    new one, where a lazy unmount detaches it. No directory for the old root is needed,
    and nothing of the host's tree stays reachable (unlike chroot, which a root process
    can escape). ``root`` must be a mount point (``bind(root, root)`` makes it one), in a
    mount namespace whose mounts are private (``make_private("/")``).
    """
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", UmountFlags.MNT_DETACH)
    os.chdir("/")


def make_private(path: str | os.PathLike = "/", recursive: bool = True) -> None:
    """Stop mount events at ``path`` from spreading to or from other namespaces."""
    syscalls.mount(None, path, None, MountFlags.MS_PRIVATE | (MountFlags.MS_REC if recursive else 0))


def unmount(path: str | os.PathLike, *, lazy: bool = False) -> None:
    syscalls.umount2(path, UmountFlags.MNT_DETACH if lazy else 0)


def unmount_below(path: str | os.PathLike) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; return what was unmounted.

    Each is detached lazily (MNT_DETACH): it disappears from the tree at once and is freed
    when its last user lets go, so a busy mount cannot stop a cleanup halfway.
    """
    done = []
    for m in mounts_below(path):
        try:
            syscalls.umount2(m.mountpoint, UmountFlags.MNT_DETACH)
            done.append(m.mountpoint)
        except OSError as e:
            if e.errno not in (22, 2):  # EINVAL/ENOENT: already gone with its parent
                raise
    return done
