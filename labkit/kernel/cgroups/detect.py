"""Which cgroup version this machine runs, and where the calling process sits in it.

Three layouts exist (cgroups(7), "CGROUPS VERSION 1 AND VERSION 2"):

- "v2": /sys/fs/cgroup itself is a cgroup2 filesystem, one tree for every controller.
- "hybrid": v1 hierarchies under /sys/fs/cgroup/<controller>, plus an empty cgroup2 tree
  at /sys/fs/cgroup/unified. Controllers live in v1, so labkit treats it as v1.
- "v1": only v1 hierarchies.

On v1 each hierarchy is its own tree and a process has a place in each one:
/proc/self/cgroup has a line per hierarchy ("4:memory:/process_api/abc"), and
/proc/self/mountinfo says where each hierarchy is mounted. labkit puts its groups
under a ``labkit`` directory inside the caller's own cgroup of every hierarchy, so it
never moves anything out of the tree its caller was given.

The parsers take text, so tests can feed them made-up files.
Layer: kernel. Used by cgroups/__init__.py, v1.py and v2.py, and by ``labkit doctor``.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import Unsupported
from labkit.kernel import mounts

from .limits import Limits

CGROUP2_SUPER_MAGIC = 0x63677270  # statfs(2) f_type of a cgroup2 mount ("cgrp")

# The v1 controllers labkit makes a directory in. devices is joined so the runtime can
# write devices.allow/deny; net_cls, perf_event and friends are left alone.
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "blkio", "devices")
# The v2 controllers labkit enables for its groups (freezing and killing need none).
V2_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids")


@functools.cache
def _statfs():
    return ctypes.CDLL(None, use_errno=True).statfs


def _fs_type(path: str) -> int | None:
    """statfs(2) f_type. Python has no statfs, so call it through ctypes."""
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on 64-bit Linux
    if _statfs()(os.fsencode(path), buf) != 0:
        return None
    return int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF  # f_type comes first


def mode() -> str:
    """'v2', 'hybrid' or 'v1': how this machine mounts cgroups."""
    return _mode(str(paths.CGROUP_ROOT))


@functools.cache
def _mode(root: str) -> str:
    # Cached: changing it means remounting /sys/fs/cgroup, which nobody does under a
    # running program (and systemd only does at boot).
    if _fs_type(root) == CGROUP2_SUPER_MAGIC:
        return "v2"
    if _fs_type(os.path.join(root, "unified")) == CGROUP2_SUPER_MAGIC:
        return "hybrid"
    return "v1"


def version() -> int:
    """1 or 2: which Cgroup class manages controllers here (hybrid counts as 1)."""
    return 2 if mode() == "v2" else 1


@dataclass(frozen=True)
class Mount:
    """A v1 hierarchy as /proc/self/mountinfo shows it."""

    mountpoint: str
    root: str  # which directory of the hierarchy is mounted there ("/" normally)
    controllers: tuple[str, ...]


def parse_mountinfo(text: str) -> list[Mount]:
    """The v1 cgroup mounts in a mountinfo text (proc(5), /proc/pid/mountinfo).

    A v1 hierarchy names its controllers in the filesystem's own options, e.g.
    ``rw,cpu,cpuacct``."""
    found = []
    for m in mounts.parse_mountinfo(text):
        controllers = tuple(o for o in m.super_options.split(",") if o in V1_CONTROLLERS)
        if m.fstype == "cgroup" and controllers:
            found.append(Mount(m.mountpoint, m.root, controllers))
    return found


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup -> {controller: path}; the v2 line ("0::/x") gets the key ''."""
    where: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _id, controllers, path = parts
        if controllers == "":
            where[""] = path
        for name in controllers.split(","):
            if name:
                where[name] = path
    return where


def own_base(path: str) -> str:
    """The caller's cgroup path with any labkit group cut off.

    A process that labkit itself placed in /x/labkit/c1 must find the same groups as
    the process that made them, so everything from the ``labkit`` component on is
    dropped: '/x/labkit/c1' -> '/x'.
    """
    parts = [p for p in path.split("/") if p]
    if paths.CGROUP_PARENT in parts:
        parts = parts[: parts.index(paths.CGROUP_PARENT)]
    return "/" + "/".join(parts)


def v1_bases() -> dict[str, Path]:
    """{controller: the caller's own cgroup directory in that v1 hierarchy}."""
    with open("/proc/self/cgroup") as f:
        mine = f.read()
    return dict(_v1_bases(os.stat("/proc/self/ns/mnt").st_ino, mine))


@functools.lru_cache(maxsize=8)
def _v1_bases(mount_ns: int, proc_cgroup: str) -> tuple[tuple[str, Path], ...]:
    # Cached on what it depends on: the mount namespace and /proc/self/cgroup's text
    mine = parse_proc_cgroup(proc_cgroup)
    bases: dict[str, Path] = {}
    for mount in _v1_mounts(mount_ns):
        for controller in mount.controllers:
            if controller in bases or controller not in mine:
                continue
            path = own_base(mine[controller])
            # mounted from a subdirectory (inside a container): paths are relative to it
            if mount.root != "/" and (path + "/").startswith(mount.root.rstrip("/") + "/"):
                path = path[len(mount.root.rstrip("/")):] or "/"
            bases[controller] = Path(mount.mountpoint) / path.lstrip("/")
    return tuple(bases.items())


@functools.lru_cache(maxsize=4)
def _v1_mounts(mount_ns: int) -> tuple[Mount, ...]:
    # The cgroup mounts of one mount namespace (the key) do not change in practice;
    # parsing mountinfo is most of the cost of finding a group, so it is done once.
    with open("/proc/self/mountinfo") as f:
        return tuple(parse_mountinfo(f.read()))


def v2_caller() -> Path:
    """The caller's own cgroup directory in the unified tree (the '0::' line)."""
    with open("/proc/self/cgroup") as f:
        mine = parse_proc_cgroup(f.read())
    return paths.CGROUP_ROOT / own_base(mine.get("", "/")).lstrip("/")


def v2_base() -> Path:
    """Where the v2 ``labkit`` parent goes: the caller's cgroup, or the nearest ancestor
    that may have children with controllers.

    cgroup v2's "no internal processes" rule: a cgroup other than the root that holds
    processes cannot hand controllers to its children. The caller always sits in its
    own cgroup, so that cgroup qualifies only if it is the root (the VM case: PID 1's
    shell and pytest run in the root). Otherwise labkit goes up to the first ancestor
    holding no processes itself (e.g. a systemd slice) and makes ``labkit`` a sibling
    of the caller's cgroup there. No process is moved: only the processes labkit
    starts go into its groups.
    """
    here = v2_caller()
    while here != paths.CGROUP_ROOT:
        try:
            if not (here / "cgroup.procs").read_text().strip():
                return here
        except OSError:
            pass
        here = here.parent
    return here


def available_controllers() -> set[str]:
    """The controllers labkit can use here, in this version's names.

    v1: the mounted hierarchies labkit knows (cpu, cpuacct, memory, blkio, ...).
    v2: what the labkit parent's base lists in cgroup.controllers (cpu, io, memory, ...).
    """
    if version() == 1:
        return set(v1_bases())
    try:
        return set((v2_base() / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


# limit field -> the controller it needs, in each version's names
_NEEDS = {
    "memory": ("memory", "memory"), "memory_swap": ("memory", "memory"), "memory_high": (None, "memory"),
    "cpu_quota_us": ("cpu", "cpu"), "cpu_shares": ("cpu", "cpu"), "cpu_weight": ("cpu", "cpu"),
    "pids": ("pids", "pids"), "cpuset_cpus": ("cpuset", "cpuset"),
    "io_read_bps": ("blkio", "io"), "io_write_bps": ("blkio", "io"),
    "io_read_iops": ("blkio", "io"), "io_write_iops": ("blkio", "io"),
}


def check_supported(limits: Limits) -> None:
    """Raise Unsupported if a limit that is set needs what this kernel lacks."""
    given = limits.given()
    if not given:
        return
    v, here = version(), mode()
    available = available_controllers()
    for name in given:
        controller = _NEEDS[name][v - 1]
        if controller is None:
            file = name.replace("_", ".")
            raise Unsupported(f"{name} needs cgroup v2 ({file}); this machine runs cgroup {here}")
        if controller not in available:
            raise Unsupported(f"{name} needs the {controller} controller, which cgroup {here} does not offer "
                              f"here (available: {', '.join(sorted(available)) or 'none'})")
    if v == 1 and "memory_swap" in given:
        if not (v1_bases()["memory"] / "memory.memsw.limit_in_bytes").exists():
            raise Unsupported("memory_swap needs swap accounting (memory.memsw.* files): "
                              "boot with swapaccount=1")
