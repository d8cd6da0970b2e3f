"""Watching a cgroup over time: the numbers behind ``docker stats`` and the course's plots.

The kernel only keeps counters (CPU nanoseconds used so far, bytes read so far) and
gauges (memory in use now). A rate such as "CPU %" is the difference of two counter
readings divided by the time between them, which is what ``docker stats`` computes
too. watch() yields one Sample per interval; record() collects them into a list that
a notebook can plot (matplotlib is imported there, never here) and a widget can poll.

Layer: kernel. Used by ``labkit stats``, the lab's widgets and the cgroup notebooks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from labkit.errors import CgroupError

from .base import Cgroup, CgroupStats


@dataclass(frozen=True)
class Sample:
    """What a group did during one interval, ending ``t`` seconds after watching began.

    cpu_percent: CPU time used / wall time, in percent of one CPU (200 = two CPUs busy).
    throttled_percent: share of the CPU quota periods in which the group was throttled.
    memory_bytes / memory_peak: memory in use at the end of the interval / highest so far.
    pids: tasks in the group. io_*_bps: bytes per second read / written, all devices.
    Fields the kernel does not provide here are None (see CgroupStats).
    """

    t: float
    cpu_percent: float | None
    throttled_percent: float | None
    memory_bytes: int | None
    memory_peak: int | None
    pids: int | None
    io_read_bps: float
    io_write_bps: float
    oom_kills: int | None


def sample(before: CgroupStats, after: CgroupStats, seconds: float, t: float) -> Sample:
    """One Sample from two stats() readings taken ``seconds`` apart."""
    seconds = max(seconds, 1e-9)

    def delta(field: str) -> int | None:
        a, b = getattr(before, field), getattr(after, field)
        return None if a is None or b is None else b - a

    cpu_ns, periods, throttled = delta("cpu_usage_ns"), delta("nr_periods"), delta("nr_throttled")
    read_bytes = _total(after, "read_bytes") - _total(before, "read_bytes")
    write_bytes = _total(after, "write_bytes") - _total(before, "write_bytes")
    return Sample(
        t=round(t, 6),
        cpu_percent=None if cpu_ns is None else 100.0 * cpu_ns / (seconds * 1e9),
        throttled_percent=None if not periods or throttled is None else 100.0 * throttled / periods,
        memory_bytes=after.memory_current,
        memory_peak=after.memory_peak,
        pids=after.pids_current,
        io_read_bps=max(read_bytes, 0) / seconds,
        io_write_bps=max(write_bytes, 0) / seconds,
        oom_kills=after.oom_kills,
    )


def _total(stats: CgroupStats, field: str) -> int:
    return sum(getattr(io, field) for io in stats.io.values())


def watch(cg: Cgroup, interval: float = 0.2, duration: float | None = None) -> Iterator[Sample]:
    """Yield a Sample every ``interval`` seconds.

    It stops after ``duration`` seconds, or, without a duration, once the group holds
    no process (or has been removed). Ticks are scheduled from the start time, so a
    slow consumer does not make the series drift.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, not {interval}")
    start = last_t = time.monotonic()
    try:
        last = cg.stats()
    except CgroupError:
        return
    tick = 0
    while duration is None or last_t - start < duration - 1e-3:
        tick += 1
        target = start + tick * interval
        if duration is not None:
            target = min(target, start + duration)
        time.sleep(max(0.0, target - time.monotonic()))
        try:
            now_stats = cg.stats()
        except CgroupError:  # the group was removed while we watched
            return
        now = time.monotonic()
        yield sample(last, now_stats, now - last_t, now - start)
        last, last_t = now_stats, now
        if duration is None and not _busy(cg):
            return


def _busy(cg: Cgroup) -> bool:
    try:
        return bool(cg.procs(recursive=True))
    except CgroupError:
        return False


def record(cg: Cgroup, seconds: float, interval: float = 0.2) -> list[Sample]:
    """Collect ``seconds`` worth of Samples (fewer if the group is removed meanwhile)."""
    return list(watch(cg, interval=interval, duration=seconds))
