"""What root inside a container may still do: capabilities, no_new_privs, masked paths.

Root in a container is root on the host as far as uids go (without a user namespace),
so the runtime takes powers away instead:

- capabilities(7): root's privilege split into ~41 bits. A process has five sets
  (effective, permitted, inheritable, bounding, ambient); ``/proc/PID/status`` shows them
  as CapEff, CapPrm, CapInh, CapBnd, CapAmb. Docker keeps 14 of them.
- ``PR_SET_NO_NEW_PRIVS`` (prctl(2)): execve can never grant more (setuid bits, file caps).
- masked paths: /proc files that leak host data get /dev/null (files) or an empty
  read-only tmpfs (directories) mounted over them; read-only paths are bind-mounted onto
  themselves and remounted read-only (runc's ``rootfs_linux.go`` does the same).

Man pages: capabilities(7), capset(2), prctl(2) (PR_CAPBSET_DROP, PR_CAP_AMBIENT),
mount(2) (MS_BIND|MS_REMOUNT|MS_RDONLY). Kernel doc: Documentation/security/credentials.rst.
Layer: kernel. Called by the runtime's init (inside the new namespaces) and the notebooks.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass

from labkit.errors import InvalidValue, SyscallError
from labkit.kernel import syscalls
from labkit.kernel.syscalls import MountFlags, Prctl

# linux/capability.h: the bit number of each capability.
CAPABILITIES: dict[str, int] = {
    name: bit
    for bit, name in enumerate(
        ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
    )
}

# Docker's default set (moby daemon/pkg/oci/caps/defaults.go), in its order.
DOCKER_DEFAULT_CAPS: tuple[str, ...] = tuple(
    "CAP_" + c
    for c in ["CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"]
)
# What `runc spec` writes.
RUNC_SPEC_CAPS: tuple[str, ...] = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")

# Docker's defaultLinuxMaskedPaths and read-only paths (moby daemon/pkg/oci/defaults.go).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY_PATHS: tuple[str, ...] = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # two 32-bit words per set
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def cap_name(name: str) -> str:
    """The canonical ``CAP_X`` name for ``x``, ``CAP_X`` or ``X``; InvalidValue otherwise.

    >>> cap_name("net_admin")
    'CAP_NET_ADMIN'
    """
    bare = name.strip().upper().removeprefix("CAP_")
    if bare not in CAPABILITIES:
        raise InvalidValue("capability", name, "a name from capabilities(7), e.g. NET_ADMIN or CAP_NET_ADMIN")
    return "CAP_" + bare


def cap_last_cap() -> int:
    """The highest capability this kernel knows (the bounding set has one bit per cap)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def to_mask(names: Iterable[str]) -> int:
    """A bit mask (as CapEff shows it) from capability names."""
    mask = 0
    for n in names:
        mask |= 1 << CAPABILITIES[cap_name(n).removeprefix("CAP_")]
    return mask


def from_mask(mask: int) -> list[str]:
    """The names of the bits set in ``mask``, lowest bit first."""
    return ["CAP_" + n for n, bit in CAPABILITIES.items() if mask >> bit & 1]


@dataclass(frozen=True)
class CapSets:
    """The five capability sets of a process, as masks (read from /proc/PID/status)."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int

    def names(self, which: str = "effective") -> list[str]:
        return from_mask(getattr(self, which))


def capsets(pid: int | str = "self") -> CapSets:
    """The capability sets of ``pid``, e.g. ``capsets(1).names("bounding")``."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, value = line.split(":")
                fields[key] = int(value, 16)
    return CapSets(fields["CapEff"], fields["CapPrm"], fields["CapInh"], fields["CapBnd"], fields["CapAmb"])


def drop_bounding(keep: Iterable[str]) -> None:
    """Remove every capability not in ``keep`` from the bounding set, for good.

    The bounding set limits what any later execve can grant, even to root. Dropping
    needs CAP_SETPCAP, so this must run before capset() takes that away.
    """
    kept = to_mask(keep)
    for bit in range(cap_last_cap() + 1):
        if not kept >> bit & 1 and syscalls.prctl(Prctl.PR_CAPBSET_READ, bit) == 1:
            syscalls.prctl(Prctl.PR_CAPBSET_DROP, bit)


def set_caps(effective: Iterable[str], permitted: Iterable[str], inheritable: Iterable[str] = ()) -> None:
    """capset(2) on the calling thread, and clear the ambient set.

    A capability can only be kept, never added: asking for one the caller lacks is EPERM.
    """
    eff, prm, inh = to_mask(effective), to_mask(permitted), to_mask(inheritable)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):  # word 0 holds caps 0-31, word 1 caps 32-63
        shift = 32 * i
        data[i].effective = (eff >> shift) & 0xFFFFFFFF
        data[i].permitted = (prm >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inh >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise SyscallError(ctypes.get_errno(), "capset", f"permitted={prm:#x}")
    # ambient capabilities survive execve for non-root users; Docker leaves the set empty
    syscalls.prctl(Prctl.PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)


def keep_only(caps: Iterable[str]) -> None:
    """What a runtime does before execve: the bounding, effective, permitted sets = ``caps``."""
    caps = [cap_name(c) for c in caps]
    drop_bounding(caps)
    set_caps(caps, caps)


def set_no_new_privs() -> None:
    """From now on execve never raises privileges (setuid binaries, file capabilities)."""
    syscalls.prctl(Prctl.PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs(pid: int | str = "self") -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.split() == ["NoNewPrivs:", "1"] for line in f)


def mask_path(path: str) -> None:
    """Hide ``path``: /dev/null over a file, an empty read-only tmpfs over a directory.

    A path that does not exist on this kernel is skipped, as runc does.
    """
    try:
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if not os.path.lexists(path):
            return
    except OSError:
        return
    if is_dir:
        syscalls.mount("tmpfs", path, "tmpfs", MountFlags.MS_RDONLY)  # empty, and it stays so
    else:
        syscalls.mount("/dev/null", path, None, MountFlags.MS_BIND)


def readonly_path(path: str) -> None:
    """Make ``path`` read-only: bind it onto itself, then remount that bind read-only.

    A bind mount ignores MS_RDONLY on creation; only the remount applies it.
    """
    if not os.path.lexists(path):
        return
    syscalls.mount(path, path, None, MountFlags.MS_BIND | MountFlags.MS_REC)
    flags = MountFlags.MS_BIND | MountFlags.MS_REMOUNT | MountFlags.MS_RDONLY
    try:
        syscalls.mount(path, path, None, flags | MountFlags.MS_NOSUID | MountFlags.MS_NODEV | MountFlags.MS_NOEXEC)
    except SyscallError:
        # proc's own mount flags (nosuid,nodev,noexec) must be kept on a remount;
        # /proc/sys on some kernels refuses the extra ones: retry with the bare request
        syscalls.mount(path, path, None, flags)
