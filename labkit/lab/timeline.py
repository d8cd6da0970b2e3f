"""One container start as a timeline: labkit's marks and runc's system calls, phase by phase.

The moments a start passes through come from three places:
- labkit's own marks (labkit.runtime.timing, switched on with LABKIT_TIMING=FILE);
- a socket proxy in front of labkitd (notebook 12): when the docker CLI's requests arrive;
- ``strace -f -ttt`` of ``runc run``: the system call that begins each phase (``runc_events``).

``segments()`` turns the moments of one run into back-to-back pieces (phase, start, end);
``gantt()`` draws several runs of several lanes: the median of each piece laid end to
end, and below it every phase's median with its range. matplotlib is imported inside
the functions, as in plots.py.

Layer: lab. Used by notebook 12.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.lab import plots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# phase -> (colour, what happens in it); in the order a start meets them
PHASES: dict[str, tuple[str, str]] = {
    "client": ("#9e9e9e", "the command that was typed starts and reads its arguments"),
    "api": ("#2f6fb0", "HTTP requests to the daemon and their answers"),
    "image": ("#8c6bb1", "the image's config and layers, the spec, the container's directories"),
    "cgroup": ("#6a9f58", "make the cgroup; put init into it"),
    "shim": ("#b5a642", "fork the shim, the container's monitor"),
    "namespaces": ("#e07a2f", "fork into a new PID namespace, unshare(2) the others"),
    "mounts": ("#8b5a2b", "make / private, the root filesystem, /proc, /dev, /sys ..."),
    "seccomp": ("#c0392b", "compile the filter (before pivot_root), load it (before execve)"),
    "pivot_root": ("#d98cb3", "pivot_root(2) into the new root, hide the host's files"),
    "created": ("#dddddd", "init waits at exec.fifo until someone says start"),
    "capabilities": ("#2a9d8f", "drop capabilities, switch user"),
    "exec": ("#222222", "execve(2) the command; it runs and exits"),
    "teardown": ("#f0e0c0", "record the exit, remove the cgroup and the container"),
}


@dataclass(frozen=True)
class Segment:
    """One piece of a run: ``phase`` from ``start_ms`` to ``end_ms`` after the run began."""

    phase: str
    start_ms: float
    end_ms: float

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


def segments(events: Iterable[tuple[str, int]], start_ns: int, end_ns: int) -> list[Segment]:
    """Back-to-back pieces of one run from the moments it passed through.

    Each event (phase, ns) begins its phase, which lasts until the next event; before
    the first one the phase is "client". Events outside start_ns..end_ns belong to
    another run and are dropped; pieces of one phase that follow each other are merged.

    >>> segments([("cgroup", 3_000_000), ("exec", 5_000_000)], 1_000_000, 6_000_000)
    [Segment(phase='client', start_ms=0.0, end_ms=2.0), Segment(phase='cgroup', start_ms=2.0, end_ms=4.0), \
Segment(phase='exec', start_ms=4.0, end_ms=5.0)]
    """
    moments = sorted((ns, phase) for phase, ns in events if start_ns <= ns <= end_ns)
    out: list[Segment] = []
    phase, begin = "client", start_ns
    for ns, nxt in moments + [(end_ns, "")]:
        if ns > begin:
            if out and out[-1].phase == phase:  # the same phase goes on
                out[-1] = Segment(phase, out[-1].start_ms, (ns - start_ns) / 1e6)
            else:
                out.append(Segment(phase, (begin - start_ns) / 1e6, (ns - start_ns) / 1e6))
            begin = ns
        phase = nxt
    return out


# -- runc, from strace ---------------------------------------------------------------------
_LINE = re.compile(r"^(\d+)\s+(\d+)\.(\d+)\s+(.*)$")


def runc_events(trace: str) -> tuple[list[tuple[str, int]], int, int]:
    """The phases of one ``strace -f -ttt -o FILE runc run ...``: (events, start_ns, end_ns).

    strace's clock is the wall clock, but only differences count here. Each phase begins
    with the first system call that does its work:

    - namespaces: runc execs ``runc init`` (whose C part, nsexec, will unshare), and
      again at its ``unshare(CLONE_NEW...)``;
    - cgroup: the first mkdir under /sys/fs/cgroup (runc's parent, while init starts);
    - mounts: the first mount(2) after the unshare;
    - pivot_root: pivot_root(2) (the masked and read-only paths follow it);
    - seccomp: the filter's load: prctl(PR_SET_SECCOMP), or seccomp(SECCOMP_SET_MODE_FILTER)
      with a filter (not the probes with NULL that Go's libseccomp binding makes first);
    - capabilities: the first prctl(PR_CAPBSET_DROP);
    - exec: the execve(2) of the container's command; teardown: that process's exit.

    >>> trace = '''7 100.000000 execve("/usr/sbin/runc", ["runc", "run"], 0x1 /* 3 vars */) = 0
    ... 7 100.010000 mkdirat(AT_FDCWD, "/sys/fs/cgroup/pids/c1", 0755) = 0
    ... 8 100.020000 unshare(CLONE_NEWNS|CLONE_NEWPID) = 0
    ... 9 100.030000 +++ exited with 0 +++
    ... 7 100.040000 +++ exited with 0 +++'''
    >>> runc_events(trace)
    ([('cgroup', 100010000000), ('namespaces', 100020000000)], 100000000000, 100040000000)
    """
    events: list[tuple[str, int]] = []
    found: set[str] = set()
    start = end = None
    command_pid = None

    def once(phase: str, ns: int, key: str | None = None) -> None:
        if (key or phase) not in found:
            found.add(key or phase)
            events.append((phase, ns))

    for line in trace.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, ns, call = int(m.group(1)), int(m.group(2)) * 10**9 + int(m.group(3).ljust(9, "0")[:9]), m.group(4)
        start = ns if start is None else start
        end = ns
        if call.startswith("<..."):  # the second half of a call strace printed in two lines
            continue
        if call.startswith("execve(") and '", "init"]' in call:  # [argv0, "init"]: runc execs itself
            once("namespaces", ns, "runc init")
        elif re.match(r'mkdir(at)?\((AT_FDCWD, )?"/sys/fs/cgroup/', call):
            once("cgroup", ns)
        elif call.startswith("unshare(") and "CLONE_NEW" in call:
            once("namespaces", ns, "unshare")
        elif call.startswith("mount(") and "unshare" in found:
            once("mounts", ns)
        elif call.startswith("pivot_root("):
            once("pivot_root", ns)
        elif call.startswith("prctl(PR_SET_SECCOMP") or call.startswith("seccomp(SECCOMP_SET_MODE_FILTER") \
                and "NULL)" not in call:
            once("seccomp", ns)
        elif call.startswith("prctl(PR_CAPBSET_DROP"):
            once("capabilities", ns)
        elif call.startswith("execve(") and "pivot_root" in found and command_pid is None:
            command_pid = pid
            once("exec", ns)
        elif call.startswith("+++ exited") and pid == command_pid:
            once("teardown", ns)
    if start is None:
        raise ValueError("no strace lines (strace -f -ttt -o FILE runc run ...)")
    return events, start, end


# -- the figure ----------------------------------------------------------------------------


def typical(runs: Sequence[Sequence[Segment]]) -> tuple[list[tuple[str, list[float]]], int]:
    """The runs that have the most common sequence of phases, as [(phase, [ms of each
    run])] piece by piece, and how many runs that is (others took another path, e.g. an
    error, and are left out)."""
    shapes = Counter(tuple(s.phase for s in run) for run in runs)
    if not shapes:
        return [], 0
    shape, n = shapes.most_common(1)[0]
    same = [run for run in runs if tuple(s.phase for s in run) == shape]
    return [(phase, [run[i].ms for run in same]) for i, phase in enumerate(shape)], n


def per_phase(runs: Sequence[Sequence[Segment]]) -> dict[str, list[float]]:
    """{phase: [ms in each run]}: a phase's pieces added up, run by run (0 if it had none)."""
    phases = [p for p in PHASES if any(s.phase == p for run in runs for s in run)]
    phases += sorted({s.phase for run in runs for s in run} - set(phases))
    return {p: [sum(s.ms for s in run if s.phase == p) for run in runs] for p in phases}


def _dark(colour: str) -> bool:
    """Is '#rrggbb' dark enough for white text on it?"""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 128


def _middle_half(values: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (both the value itself for a single run)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def gantt(lanes: Mapping[str, Sequence[Sequence[Segment]]], *, title: str, what: str,
          path: str | None = None) -> Figure:  # fmt: skip
    """Top: one bar per lane, its pieces laid end to end, each as long as its median over
    the runs; the lane's total (median, range, n) at its end. Bottom: each phase's time
    per run, added up over its pieces: the median as a dot, the range as a line (log scale).
    ``lanes`` maps a lane's label to its runs, each a list of Segments."""
    import matplotlib.patches as mpatches
    import matplotlib.ticker as ticker

    fig, axes = plots.figure(title, what, nrows=2, size=(11, 8.2), grid=True)
    top, bottom = axes[0][0], axes[1][0]
    names = list(lanes)
    shapes = {name: typical(lanes[name]) for name in names}
    totals = {name: [sum(s.ms for s in run) for run in lanes[name]] for name in names}
    longest = max([sum(statistics.median(v) for _, v in shapes[name][0]) for name in names]
                  + [_middle_half(t)[1] for t in totals.values() if t] + [1.0])  # fmt: skip
    for row, name in enumerate(names):
        y = len(names) - 1 - row
        (pieces, n), left = shapes[name], 0.0
        for phase, values in pieces:
            width = statistics.median(values)
            colour = PHASES.get(phase, ("#bbbbbb", ""))[0]
            top.barh(y, width, left=left, height=0.55, color=colour, edgecolor="white", linewidth=0.6)
            if width >= max(0.04 * longest, 4):  # room for its number
                top.text(left + width / 2, y, f"{width:.0f}", ha="center", va="center", fontsize=7,
                         color="white" if _dark(colour) else "black")  # fmt: skip
            left += width
        if totals[name]:
            low, high = _middle_half(totals[name])
            top.plot([low, high], [y - 0.38] * 2, color="#555555", lw=1.5, solid_capstyle="butt")
            t = totals[name]
            top.text(left, y + 0.34, f"total: median {statistics.median(t):.0f} ms, range {min(t):.0f}-{max(t):.0f} ms, "
                                     f"n={len(t)}" + (f" (the bar: the {n} runs that took the usual path)"
                                                      if n != len(t) else ""),
                     fontsize=7.5, ha="right", va="bottom")  # fmt: skip
    top.set_yticks(range(len(names)), list(reversed(names)))
    top.set_xlim(0, longest * 1.02)
    top.set_ylim(-0.7, len(names) - 0.3)
    top.set_xlabel("time since the command started (ms): each piece its median; grey line: the middle half of the totals")
    top.grid(axis="x", alpha=0.3)
    used = [p for p in PHASES if any(s.phase == p for runs in lanes.values() for run in runs for s in run)]
    top.legend(handles=[mpatches.Patch(color=PHASES[p][0], label=p) for p in used], ncol=min(len(used), 7),
               fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)  # fmt: skip

    table = {name: per_phase(runs) for name, runs in lanes.items()}
    order = [p for p in PHASES if any(p in t for t in table.values())]
    step = 0.8 / max(len(names), 1)
    markers = ["o", "s", "D", "^"]
    for k, name in enumerate(names):
        for i, phase in enumerate(order):
            values = [v for v in table[name].get(phase, []) if v > 0]
            if not values:
                continue
            y = len(order) - 1 - i + 0.4 - (k + 0.5) * step
            bottom.plot([min(values), max(values)], [y, y], color="#777777", lw=1.2)
            bottom.plot(statistics.median(values), y, markers[k % len(markers)], color=PHASES[phase][0],
                        markeredgecolor="black", markersize=6)  # fmt: skip
    bottom.set_xscale("log")
    bottom.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    bottom.set_yticks([len(order) - 1 - i for i in range(len(order))], order)
    bottom.set_xlabel("time in the phase per run, its pieces added up (ms, log scale): dot = median, line = range")
    bottom.grid(axis="x", alpha=0.3, which="both")
    handles = [bottom.plot([], [], markers[k % len(markers)], color="white", markeredgecolor="black",
                           label=name)[0] for k, name in enumerate(names)]  # fmt: skip
    bottom.legend(handles=handles, fontsize=7.5, loc="lower right")
    return plots.done(fig, path)
