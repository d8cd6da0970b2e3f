"""cgroup v1: one tree per controller, one directory per tree for each group.

On v1 every controller (or a few mounted together, like "cpu,cpuacct") is its own
hierarchy under /sys/fs/cgroup/<controller>. A "cgroup" in Docker's sense is therefore
one directory with the same name in each hierarchy, and a process must be written
into each one. labkit's group "demo" on this machine is, for example,

    /sys/fs/cgroup/memory/process_api/<id>/labkit/demo   (memory.limit_in_bytes, ...)
    /sys/fs/cgroup/pids/labkit/demo                      (pids.max, ...)
    ...

because the caller itself sits in /process_api/<id> of the memory tree and in / of
the others (see detect.py).

Files: memory.limit_in_bytes, memory.memsw.limit_in_bytes, cpu.cfs_quota_us,
cpu.cfs_period_us, cpu.shares, cpuset.cpus, pids.max, blkio.throttle.*_device,
freezer.state; accounting in cpuacct.usage*, cpu.stat, memory.*, pids.*, blkio.*.
Kernel docs: Documentation/admin-guide/cgroup-v1/ (memory.rst, cpusets.rst,
blkio-controller.rst, freezer-subsystem.rst, pids.rst), sched-bwc.rst.
Layer: kernel. Made by cgroups/__init__.py's create() and open().
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from labkit import paths, poll
from labkit.errors import AlreadyExists, CgroupError, StateError

from . import detect
from .base import Cgroup, CgroupStats, IoStat, read, read_keyed, undo_mkdirs, write
from .limits import CPU_PERIOD_US, UNLIMITED, Limits

# v1 reports "no memory limit" as the largest page-aligned counter value; anything this
# big is treated as unlimited (None in stats).
_V1_UNLIMITED_FLOOR = 1 << 62


class V1Cgroup(Cgroup):
    """A group spread over the v1 hierarchies; ``paths`` has one entry per controller."""

    version = 1

    @classmethod
    def locate(cls, name: str) -> dict[str, Path]:
        """Where the group named ``name`` lives (or would live) in each hierarchy."""
        return {c: base / paths.CGROUP_PARENT / name for c, base in detect.v1_bases().items()}

    @classmethod
    def make(cls, name: str, limits: Limits) -> V1Cgroup:
        """mkdir the group in every hierarchy, copy cpuset's CPUs down, write the limits.

        If anything fails, what was made is removed again before the error propagates.
        """
        group = cls(name, cls.locate(name))
        made: list[Path] = []
        try:
            for controller, leaf in sorted(group.paths.items()):
                if leaf in made:
                    continue  # co-mounted controllers ("cpu,cpuacct") share a directory
                _mkdir(leaf, cpuset=(controller == "cpuset"), must_be_new=True)
                made.append(leaf)
            group.apply(limits)
        except FileExistsError:
            undo_mkdirs(made)
            raise AlreadyExists(f"cgroup {name} already exists at {group.path}: open() or remove() it") \
                from None
        except BaseException:
            undo_mkdirs(made)
            raise
        return group

    def join(self) -> None:
        """Move the calling process into the group, without the grace-period wait of ``add()``.

        A process with one thread moves itself by writing "0" to each hierarchy's
        ``tasks`` file: moving just the calling thread needs no kernel-wide lock (see
        cgroup_procs_write_start() in kernel/cgroup/cgroup.c), and with one thread the
        whole process has moved. With more threads only the caller would move, so then
        this falls back to ``add(0)``.
        """
        if len(os.listdir("/proc/self/task")) != 1:
            self.add(0)
            return
        for d in self.dirs():
            write(d / "tasks", 0)

    def apply(self, limits: Limits) -> None:
        p = self.paths
        if limits.memory is not None:
            self._set_memory(limits.memory, limits.memory_swap)
        elif limits.memory_swap is not None:
            write(p["memory"] / "memory.memsw.limit_in_bytes", limits.memory_swap)
        if limits.cpu_quota_us is not None:
            write(p["cpu"] / "cpu.cfs_period_us", CPU_PERIOD_US)
            write(p["cpu"] / "cpu.cfs_quota_us", limits.cpu_quota_us)
        if limits.shares() is not None:
            write(p["cpu"] / "cpu.shares", limits.shares())  # type: ignore[arg-type]
        if limits.pids is not None:
            write(p["pids"] / "pids.max", "max" if limits.pids == UNLIMITED else limits.pids)
        if limits.cpuset_cpus is not None:
            write(p["cpuset"] / "cpuset.cpus", limits.cpuset_cpus)
        for kind, file in (("io_read_bps", "read_bps_device"), ("io_write_bps", "write_bps_device"),
                           ("io_read_iops", "read_iops_device"), ("io_write_iops", "write_iops_device")):
            for rule in getattr(limits, kind):
                write(p["blkio"] / f"blkio.throttle.{file}", f"{rule.device} {rule.rate}")

    def _set_memory(self, memory: int, swap: int | None) -> None:
        # The kernel insists limit_in_bytes <= memsw.limit_in_bytes at every moment, so
        # the order matters: raising both means memsw first, lowering means limit first.
        d = self.paths["memory"]
        try:
            write(d / "memory.limit_in_bytes", memory)
        except CgroupError as err:
            if err.errno != errno.EINVAL or swap is None:
                raise
            write(d / "memory.memsw.limit_in_bytes", swap)
            write(d / "memory.limit_in_bytes", memory)
        if swap is not None:
            write(d / "memory.memsw.limit_in_bytes", swap)

    # -- freezer ------------------------------------------------------------------------
    def _wait_state(self, want: str, timeout: float) -> None:
        state_file = self.paths["freezer"] / "freezer.state"
        # FREEZING: some task has not reached the refrigerator yet (e.g. in a syscall)
        if not poll.until(lambda: read(state_file).strip() == want, timeout, first=self.POLL_S):
            state = read(state_file).strip()
            raise StateError(f"cgroup {self.name} is {state} after {timeout} s, not {want} ({state_file})")

    def freeze(self, timeout: float = 5.0) -> None:
        write(self.paths["freezer"] / "freezer.state", "FROZEN")
        self._wait_state("FROZEN", timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        write(self.paths["freezer"] / "freezer.state", "THAWED")
        self._wait_state("THAWED", timeout)

    @property
    def is_frozen(self) -> bool:
        return read(self.paths["freezer"] / "freezer.state").strip() == "FROZEN"

    def _kill_all(self) -> None:
        # Freeze, signal, thaw (what runc does on v1): a frozen fork loop cannot fork
        # between our reading cgroup.procs and its SIGKILL arriving.
        if "freezer" not in self.paths or not self.paths["freezer"].is_dir() or not self.procs(recursive=True):
            return  # (the freezer directory is gone when a quick remove got that far)
        with contextlib.suppress(StateError):  # a task stuck in the kernel: signal it anyway
            self.freeze(timeout=1.0)
        self.signal(9)
        self.thaw(timeout=1.0)

    # -- accounting ---------------------------------------------------------------------
    def oom_kills(self) -> int | None:
        return _keyed(self.paths, "memory", "memory.oom_control").get("oom_kill")

    def stats(self) -> CgroupStats:
        p = self.paths

        def number(controller: str, file: str) -> int | None:
            if controller not in p or not (p[controller] / file).exists():
                return None
            text = read(p[controller] / file).strip()
            return None if text == "max" else int(text)

        cpu = _keyed(p, "cpu", "cpu.stat")
        oom = _keyed(p, "memory", "memory.oom_control")
        pids_events = _keyed(p, "pids", "pids.events")
        limit = number("memory", "memory.limit_in_bytes")
        user, system = number("cpuacct", "cpuacct.usage_user"), number("cpuacct", "cpuacct.usage_sys")
        if user is None and "cpuacct" in p:  # kernels before 4.7: ticks in cpuacct.stat
            ticks = _keyed(p, "cpuacct", "cpuacct.stat")
            hz = os.sysconf("SC_CLK_TCK")
            user, system = (ticks[k] * 10**9 // hz if k in ticks else None for k in ("user", "system"))
        return CgroupStats(
            cpu_usage_ns=number("cpuacct", "cpuacct.usage"),
            cpu_user_ns=user,
            cpu_system_ns=system,
            nr_periods=cpu.get("nr_periods"),
            nr_throttled=cpu.get("nr_throttled"),
            throttled_ns=cpu.get("throttled_time"),
            memory_current=number("memory", "memory.usage_in_bytes"),
            memory_peak=number("memory", "memory.max_usage_in_bytes"),
            memory_limit=None if limit is None or limit >= _V1_UNLIMITED_FLOOR else limit,
            oom_kills=oom.get("oom_kill"),  # the line exists since Linux 4.13
            pids_current=number("pids", "pids.current"),
            pids_limit=number("pids", "pids.max"),
            pids_refused=pids_events.get("max"),
            io=_blkio(p.get("blkio")),
        )


def _keyed(p: dict[str, Path], controller: str, file: str) -> dict[str, int]:
    if controller not in p or not (p[controller] / file).exists():
        return {}
    return read_keyed(p[controller] / file)


def parse_blkio(service_bytes: str, serviced: str) -> dict[str, IoStat]:
    """blkio.throttle.io_service_bytes + io_serviced ('7:0 Read 4096' lines) -> IoStat."""
    table: dict[str, dict[str, int]] = {}
    for text, unit in ((service_bytes, "bytes"), (serviced, "ops")):
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in ("Read", "Write"):
                table.setdefault(parts[0], {})[f"{parts[1].lower()}_{unit}"] = int(parts[2])
    return {dev: IoStat(**counts) for dev, counts in table.items()}


def _blkio(d: Path | None) -> dict[str, IoStat]:
    if d is None:
        return {}
    # _recursive includes nested groups, the way v2's io.stat does
    suffix = "_recursive" if (d / "blkio.throttle.io_service_bytes_recursive").exists() else ""
    return parse_blkio(read(d / f"blkio.throttle.io_service_bytes{suffix}"),
                       read(d / f"blkio.throttle.io_serviced{suffix}"))


def _mkdir(d: Path, cpuset: bool, must_be_new: bool = False) -> None:
    """mkdir -p for cgroups; with must_be_new, an existing ``d`` raises FileExistsError.

    A new cpuset group starts with empty cpuset.cpus and cpuset.mems, and the kernel
    refuses to add a process to it (ENOSPC) until both are filled in, so each level gets
    its parent's values, as runc does. That is checked on every level that exists too,
    not only on one made here: a parent another process made a moment ago, or one whose
    maker was killed between mkdir and the write, may still be empty.
    """
    try:
        os.mkdir(d)
    except FileExistsError:
        if must_be_new:
            raise
    except FileNotFoundError:
        _mkdir(d.parent, cpuset)  # the labkit parent or a nesting level is missing
        _mkdir(d, cpuset, must_be_new)
        return
    except OSError as err:
        raise CgroupError(err.errno or errno.EIO, str(d), "mkdir") from None
    if cpuset:
        _fill_cpuset(d)


def _fill_cpuset(d: Path) -> None:
    """Give an empty cpuset.cpus / cpuset.mems its parent's value, the parent's first."""
    for file in ("cpuset.cpus", "cpuset.mems"):
        if not read(d / file).strip():
            if not read(d.parent / file).strip():
                _fill_cpuset(d.parent)  # the caller's own group is never empty: this ends
            write(d / file, read(d.parent / file).strip())
