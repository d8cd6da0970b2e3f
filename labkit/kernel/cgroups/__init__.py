"""Control groups: limit, account for, freeze and kill a group of processes.

One interface over both kernel versions, chosen by a small factory, the way runc's
cgroups library and youki do it:

    from labkit.kernel import cgroups
    cgroups.mode()                           # 'v1', 'hybrid' or 'v2'
    with cgroups.create("demo", memory="64m", cpus=0.5, pids=20) as cg:
        cg.add(pid)                          # echo $pid > cgroup.procs
        cg.stats().memory_current            # memory.usage_in_bytes / memory.current
        cg.freeze(); cg.thaw()               # docker pause / unpause
    # leaving the block kills what is left in the group and removes it

Every group labkit makes sits below a ``labkit`` directory inside the caller's own
cgroup (detect.py says exactly where), so ``list_all()`` and ``labkit cleanup`` find
them all and nothing else. Limits are spelled as Docker spells them and validated
before any directory is made (limits.py).

Kernel docs: Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/; cgroups(7).
Layer: kernel. Used by the runtime (one group per container), ``labkit stats``,
``labkit doctor`` and ``labkit cleanup``, and the cgroup notebooks.
"""

from __future__ import annotations

import os
from pathlib import Path

from labkit import paths
from labkit.errors import InvalidValue, NotFound, require_root

from .base import Cgroup, CgroupStats, IoStat, check_name
from .detect import available_controllers, check_supported, mode, v1_bases, v2_base, version
from .limits import DeviceRate, Limits, shares_to_weight, weight_to_shares
from .watch import Sample, record

__all__ = [
    "Cgroup", "CgroupStats", "DeviceRate", "IoStat", "Limits", "Sample", "available_controllers",
    "NoCgroup", "check_supported", "create", "list_all", "may_create", "mode", "open", "record",
    "shares_to_weight", "version",
    "weight_to_shares", "where",
]


def _impl() -> type[Cgroup]:
    """The Cgroup class for this machine's version: the factory loads only that one."""
    if version() == 2:
        from .v2 import V2Cgroup

        return V2Cgroup
    from .v1 import V1Cgroup

    return V1Cgroup


_check_supported = check_supported  # the name older callers use


def create(name: str, limits: Limits | None = None, **given: object) -> Cgroup:
    """Make the group ``name`` (e.g. "demo", "containers/abc123") with Docker-style limits.

    ``create("c1", memory="64m", cpus=0.5, pids=20)`` or ``create("c1", limits=Limits(...))``.
    Every value is checked before anything is created: InvalidValue for a bad value,
    Unsupported for a limit this kernel cannot enforce, AlreadyExists for a taken name.
    """
    check_name(name)
    if limits is not None and given:
        raise InvalidValue("limits", sorted(given), "either limits=Limits(...) or keyword limits, not both")
    parsed = limits if limits is not None else Limits.parse(**given)
    check_supported(parsed)
    if not may_create():
        require_root(f"create cgroup {name}")
    return _impl().make(name, parsed)  # type: ignore[attr-defined]


def may_create() -> bool:
    """May this process make cgroups? Root may; anyone else only in a cgroup v2 subtree
    that was delegated to them (systemd does that for a user's session with Delegate=yes:
    the caller's own cgroup is then theirs to write). v1 hierarchies are never delegated."""
    return os.geteuid() == 0 or (version() == 2 and os.access(v2_base(), os.W_OK))


class NoCgroup:
    """What a container gets where no cgroup may be made (rootless, nothing delegated):
    the same calls as a ``Cgroup``, which limit nothing and leave nothing to remove."""

    version = 0
    name = ""
    path = None
    paths: dict[str, Path] = {}

    def add(self, pid: int) -> None:
        pass

    def join(self) -> None:
        pass

    def oom_kills(self) -> int:
        return 0

    def procs(self, recursive: bool = False) -> list[int]:
        return []

    def close(self, keep_parents: bool = False) -> None:
        pass


def where(name: str) -> dict[str, Path]:
    """The directories the group ``name`` has or would have, per controller."""
    return _impl().locate(check_name(name))  # type: ignore[attr-defined]


def open(name: str) -> Cgroup:
    """The existing group ``name``, e.g. to add a process or read stats from another process."""
    cls = _impl()
    group = cls(check_name(name), cls.locate(name))  # type: ignore[attr-defined]
    if not group.exists():
        raise NotFound(f"no labkit cgroup named {name!r} (looked for {group.path})")
    return group


def _parents() -> list[Path]:
    """Every ``labkit`` parent directory: one per hierarchy on v1, one on v2."""
    if version() == 2:
        return [v2_base() / paths.CGROUP_PARENT]
    return sorted({base / paths.CGROUP_PARENT for base in v1_bases().values()})


def list_all() -> list[str]:
    """Names of every existing labkit group, parents before their nested groups."""
    names: set[str] = set()
    for parent in _parents():
        if not parent.is_dir():
            continue
        stack = [parent]
        while stack:
            d = stack.pop()
            for entry in d.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    names.add(str(entry.relative_to(parent)))
                    stack.append(entry)
    return sorted(names)
