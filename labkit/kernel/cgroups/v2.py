"""cgroup v2: one tree, one directory per group, controllers handed down explicitly.

On v2 every controller works in the same tree (/sys/fs/cgroup), so a group is a single
directory. A controller is usable in a directory only when its parent lists it in
``cgroup.subtree_control``; labkit writes "+cpu +io +memory +pids +cpuset" there at
each level from its base down to the group's parent. The "no internal processes"
rule says a non-root cgroup that hands controllers down must hold no processes
itself, so the ``labkit`` parent and intermediate groups ("containers" in
"containers/abc") never get a process; detect.v2_base() explains where the labkit
parent goes. The controllers stay enabled in the base after labkit's groups are gone:
undoing that could take them from someone else's groups.

Files: memory.max, memory.swap.max, memory.high, cpu.max, cpu.weight, cpuset.cpus,
pids.max, io.max, cgroup.freeze, cgroup.kill; accounting in cpu.stat, memory.current,
memory.peak, memory.events, pids.current, pids.events, io.stat.
Kernel doc: Documentation/admin-guide/cgroup-v2.rst.
Layer: kernel. Made by cgroups/__init__.py's create() and open().
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from labkit import paths, poll
from labkit.errors import AlreadyExists, CgroupError, StateError

from . import detect
from .base import Cgroup, CgroupStats, IoStat, read, read_keyed, write
from .limits import CPU_PERIOD_US, UNLIMITED, Limits


class V2Cgroup(Cgroup):
    """A group in the unified tree; every entry of ``paths`` is the same directory."""

    version = 2

    @classmethod
    def locate(cls, name: str) -> dict[str, Path]:
        base = detect.v2_base()
        leaf = base / paths.CGROUP_PARENT / name
        try:
            controllers = (base / "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
        usable = [c for c in detect.V2_CONTROLLERS if c in controllers] or ["unified"]
        return {c: leaf for c in usable}

    @classmethod
    def make(cls, name: str, limits: Limits) -> V2Cgroup:
        """mkdir each level, enabling controllers on the way down, then write the limits."""
        group = cls(name, cls.locate(name))
        leaf = group.path
        if leaf.exists():
            raise AlreadyExists(f"cgroup {name} already exists at {leaf}: open() or remove() it")
        base = detect.v2_base()
        wanted = [c for c in group.paths if c != "unified"]
        levels = [base / paths.CGROUP_PARENT, *(base / paths.CGROUP_PARENT / p for p in _prefixes(name))]
        try:
            parent = base
            for d in levels:
                _enable(parent, wanted)
                _mkdir(d, must_be_new=(d == leaf))
                parent = d
            group.apply(limits)
        except FileExistsError:
            raise AlreadyExists(f"cgroup {name} already exists at {leaf}: open() or remove() it") from None
        except BaseException:
            if leaf.exists():
                group.remove(timeout=1.0)
            raise
        return group

    def apply(self, limits: Limits) -> None:
        d = self.path
        if limits.memory is not None:
            write(d / "memory.max", limits.memory)
        if limits.memory_swap is not None:
            # v2 limits swap alone; Docker's number is memory + swap
            swap = "max" if limits.memory_swap == UNLIMITED else limits.memory_swap - (limits.memory or 0)
            write(d / "memory.swap.max", swap)
        if limits.memory_high is not None:
            write(d / "memory.high", limits.memory_high)
        if limits.cpu_quota_us is not None:
            write(d / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")
        if limits.weight() is not None:
            write(d / "cpu.weight", limits.weight())  # type: ignore[arg-type]
        if limits.pids is not None:
            write(d / "pids.max", "max" if limits.pids == UNLIMITED else limits.pids)
        if limits.cpuset_cpus is not None:
            write(d / "cpuset.cpus", limits.cpuset_cpus)
        for kind, key in (("io_read_bps", "rbps"), ("io_write_bps", "wbps"),
                          ("io_read_iops", "riops"), ("io_write_iops", "wiops")):
            for rule in getattr(limits, kind):
                write(d / "io.max", f"{rule.device} {key}={rule.rate}")  # other keys keep their value

    # -- freezer (part of the core on v2, no controller needed) ------------------------
    def _wait_frozen(self, want: int, timeout: float) -> None:
        events = self.path / "cgroup.events"
        if not poll.until(lambda: read_keyed(events).get("frozen", 0) == want, timeout, first=self.POLL_S):
            raise StateError(f"cgroup {self.name} did not reach frozen {want} in {timeout} s ({events})")

    def freeze(self, timeout: float = 5.0) -> None:
        write(self.path / "cgroup.freeze", 1)
        self._wait_frozen(1, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        write(self.path / "cgroup.freeze", 0)
        self._wait_frozen(0, timeout)

    @property
    def is_frozen(self) -> bool:
        return read_keyed(self.path / "cgroup.events").get("frozen", 0) == 1

    def _kill_all(self) -> None:
        # cgroup.kill (5.14+) SIGKILLs the whole subtree at once, forks included
        if (self.path / "cgroup.kill").exists():
            write(self.path / "cgroup.kill", 1)

    # -- accounting ---------------------------------------------------------------------
    def oom_kills(self) -> int | None:
        events = self.path / "memory.events"
        return read_keyed(events).get("oom_kill") if events.exists() else None

    def stats(self) -> CgroupStats:
        d = self.path

        def number(file: str) -> int | None:
            if not (d / file).exists():
                return None
            text = read(d / file).strip()
            return None if text == "max" else int(text)

        def keyed(file: str) -> dict[str, int]:
            return read_keyed(d / file) if (d / file).exists() else {}

        cpu = keyed("cpu.stat")  # usage/user/system are always there; the rest need +cpu
        memory_events = keyed("memory.events")
        pids_events = keyed("pids.events")

        def us_to_ns(key: str) -> int | None:
            return cpu[key] * 1000 if key in cpu else None

        return CgroupStats(
            cpu_usage_ns=us_to_ns("usage_usec"),
            cpu_user_ns=us_to_ns("user_usec"),
            cpu_system_ns=us_to_ns("system_usec"),
            nr_periods=cpu.get("nr_periods"),
            nr_throttled=cpu.get("nr_throttled"),
            throttled_ns=us_to_ns("throttled_usec"),
            memory_current=number("memory.current"),
            memory_peak=number("memory.peak"),  # Linux 5.19+
            memory_limit=number("memory.max"),
            oom_kills=memory_events.get("oom_kill"),
            pids_current=number("pids.current"),
            pids_limit=number("pids.max"),
            pids_refused=pids_events.get("max"),
            io=parse_io_stat(read(d / "io.stat")) if (d / "io.stat").exists() else {},
        )


def parse_io_stat(text: str) -> dict[str, IoStat]:
    """io.stat ('8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0') -> IoStat."""
    out = {}
    for line in text.splitlines():
        device, *pairs = line.split()
        values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        count = {key: int(values.get(key, 0)) for key in ("rbytes", "wbytes", "rios", "wios")}
        out[device] = IoStat(count["rbytes"], count["wbytes"], count["rios"], count["wios"])
    return out


def _prefixes(name: str) -> list[str]:
    """'a/b/c' -> ['a', 'a/b', 'a/b/c']: every level to create below labkit."""
    parts = name.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _mkdir(d: Path, must_be_new: bool) -> None:
    try:
        os.mkdir(d)
    except FileExistsError:
        if must_be_new:
            raise
    except OSError as err:
        raise CgroupError(err.errno or errno.EIO, str(d), "mkdir") from None


def _enable(parent: Path, wanted: list[str]) -> None:
    """Write '+ctl' for each wanted controller the parent does not yet hand down."""
    have = read(parent / "cgroup.subtree_control").split()
    offered = read(parent / "cgroup.controllers").split()
    missing = [c for c in wanted if c not in have and c in offered]
    if missing:
        # one write per controller, so an error names the one the kernel refused
        for c in missing:
            try:
                write(parent / "cgroup.subtree_control", f"+{c}")
            except CgroupError as err:
                # rootless, in a delegated subtree: the kernel may keep a controller to root
                # (cpuset here); a limit that needs it fails by name when it is written
                if os.geteuid() == 0 or err.errno != errno.EPERM:
                    raise
