"""A live monitor of one cgroup for notebooks and lectures: CPU %, memory, pids, and
sliders that change the group's limits while it runs.

    from labkit.lab.widgets import Monitor
    mon = Monitor(cg)          # cg from labkit.kernel.cgroups.create(...)
    mon.widget()               # progress bars update every interval; sliders call cg.set()

The numbers come from the kernel's counters (cpuacct/cpu.stat, memory usage, pids):
a CPU percentage is the growth of the CPU-time counter divided by the wall time
between two readings, as ``docker stats`` computes it (labkit.kernel.cgroups.watch).
Everything but ``widget()`` is plain Python, so tests drive it without a browser.
ipywidgets is imported inside ``widget()`` only.

Layer: lab. Used by notebooks 06 and 07 and by instructors in front of a class.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class Reading:
    """One update of the monitor, ready to show."""

    t: float  # seconds since the monitor started
    cpu_percent: float  # 100 = one CPU busy
    memory_bytes: int
    memory_limit: int | None  # None: no limit
    pids: int


def describe(r: Reading) -> dict[str, str]:
    """The label texts for one reading (what the widget shows next to each bar)."""
    limit = "no limit" if r.memory_limit is None else f"{r.memory_limit / MIB:.0f} MiB"
    return {
        "cpu": f"CPU {r.cpu_percent:5.1f} % (100 % = one CPU)",
        "memory": f"memory {r.memory_bytes / MIB:6.1f} MiB of {limit}",
        "pids": f"{r.pids} tasks",
    }


class Monitor:
    """Polls one cgroup; ``apply()`` changes its limits; ``widget()`` shows it live."""

    def __init__(self, cg: Any, interval: float = 0.5, history: int = 240) -> None:
        if interval <= 0:
            from labkit.errors import InvalidValue

            raise InvalidValue("monitor interval", interval, "a positive number of seconds, e.g. 0.5")
        self.cg = cg
        self.interval = interval
        self.history: deque[Reading] = deque(maxlen=history)
        self._start = time.monotonic()
        self._last: tuple[float, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> Reading:
        """Read the group's counters once; the first reading has 0 % CPU (no interval yet)."""
        from labkit.kernel.cgroups.watch import sample

        now, stats = time.monotonic(), self.cg.stats()
        if self._last is None:
            cpu = 0.0
        else:
            s = sample(self._last[1], stats, now - self._last[0], now - self._start)
            cpu = s.cpu_percent or 0.0
        self._last = (now, stats)
        reading = Reading(round(now - self._start, 3), cpu, stats.memory_current or 0, stats.memory_limit,
                          stats.pids_current or 0)
        self.history.append(reading)
        return reading

    def apply(self, cpus: float | None = None, memory_mib: int | None = None) -> None:
        """Change the limits live, Docker's way: ``cpus=0.5``, ``memory_mib=64``.

        cpus at (or above) the machine's CPU count means "no CPU limit"; the cgroups
        layer validates the values and names a bad one.
        """
        limits: dict[str, object] = {}
        if cpus is not None:
            limits["cpus"] = min(float(cpus), float(os.cpu_count() or 1))
        if memory_mib is not None:
            limits["memory"] = f"{int(memory_mib)}m"
        if limits:
            self.cg.set(**limits)

    def series(self) -> dict[str, tuple[list[float], list[float]]]:
        """The history as (seconds, values) lists: CPU % and memory in MiB."""
        ts = [r.t for r in self.history]
        return {"CPU %": (ts, [r.cpu_percent for r in self.history]),
                "memory MiB": (ts, [r.memory_bytes / MIB for r in self.history])}

    def plot(self) -> Any:
        """A figure of what the monitor saw so far."""
        from labkit.lab import plots

        ts, cpu = self.series()["CPU %"]
        return plots.timeseries({"CPU": (ts, cpu)}, title=f"CPU use of cgroup {self.cg.name}",
                                ylabel="CPU (% of one CPU)", what="cgroup CPU-time counter, sampled by Monitor")

    # --- the visible part ------------------------------------------------------------

    def widget(self, duration: float = 600.0) -> Any:
        """Progress bars and sliders, updated by a background thread for ``duration`` s
        at most (or until the group is empty or gone)."""
        import ipywidgets as w

        ncpu = os.cpu_count() or 1
        cpu_bar = w.FloatProgress(min=0, max=100.0 * ncpu, description="CPU")
        mem_bar = w.FloatProgress(min=0, max=1.0, description="memory")
        labels = {k: w.Label() for k in ("cpu", "memory", "pids")}
        cpus = w.FloatSlider(value=ncpu, min=0.05, max=ncpu, step=0.05, description="cpus",
                             continuous_update=False)
        memory = w.IntSlider(value=256, min=8, max=1024, step=8, description="memory MiB", continuous_update=False)
        status = w.Label()

        def on_change(change: dict) -> None:
            try:
                self.apply(cpus=cpus.value if change["owner"] is cpus else None,
                           memory_mib=memory.value if change["owner"] is memory else None)
                status.value = f"limits set: cpus={cpus.value}, memory={memory.value} MiB"
            except Exception as err:  # noqa: BLE001 - show it next to the slider
                status.value = f"not applied: {err}"

        cpus.observe(on_change, names="value")
        memory.observe(on_change, names="value")

        def loop() -> None:
            deadline = time.monotonic() + duration
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    r = self.poll()
                except Exception as err:  # noqa: BLE001 - the group went away
                    status.value = f"stopped: {err}"
                    return
                cpu_bar.value = min(r.cpu_percent, cpu_bar.max)
                limit = r.memory_limit or max(r.memory_bytes, 1) * 2
                mem_bar.value = min(r.memory_bytes / limit, 1.0)
                for key, text in describe(r).items():
                    labels[key].value = text
                if r.pids == 0:
                    status.value = "the group has no process left"
                    return
                self._stop.wait(self.interval)

        self.stop()
        self._stop.clear()
        self._thread = threading.Thread(target=loop, name=f"monitor-{self.cg.name}", daemon=True)
        self._thread.start()
        return w.VBox([w.HBox([cpu_bar, labels["cpu"]]), w.HBox([mem_bar, labels["memory"]]), labels["pids"],
                       cpus, memory, status])

    def stop(self) -> None:
        """Stop the background updates (the widget stays on screen)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
            self._thread = None
