"""Figures for the notebooks: each titled, axes labelled with units, and a footer.

The footer says what was measured and where, e.g. "namespace inodes read from
/proc/PID/ns | Linux 6.18, 2 CPUs (AMD EPYC), x86_64, cgroup hybrid, host: a VM (kvm)",
so a figure saved from one machine
is never mistaken for another's. Every helper returns a matplotlib Figure that is
already closed for pyplot: put it last in a cell and Jupyter draws it once.

matplotlib is imported inside the functions: ``import labkit`` stays cheap.
Long measurements elsewhere honour ``quick()`` (LABKIT_QUICK=1: fewer repetitions).

Layer: lab. Used by the notebooks and bench/.
"""

from __future__ import annotations

import functools
import os
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# One palette for the whole course, so "shared with the host" looks the same everywhere.
SHARED = "#c9d6e3"  # a light blue-grey: the same as the reference
OWN = "#e07a2f"  # orange: separate, the container's own
NEUTRAL = "#f2f2f2"
ACCENT = "#2f6fb0"
WHITEOUT = "#333333"


def quick() -> bool:
    """True when LABKIT_QUICK=1: take fewer samples (CI, nbval runs)."""
    return os.environ.get("LABKIT_QUICK", "") not in ("", "0")


def cgroup_mode() -> str:
    """"v1", "hybrid" or "v2", from the cgroups module when it is there."""
    try:
        from labkit.kernel import cgroups

        return cgroups.mode()
    except (ImportError, AttributeError):
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").exists():
            return "v2"
        return "hybrid" if (root / "unified").is_dir() else "v1"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("AMD EPYC"), or the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.partition(":")[2].strip() or os.uname().machine
    except OSError:
        pass
    return os.uname().machine


def virtualization() -> str:
    """Is this host itself a VM? "kvm", "none", ... from systemd-detect-virt when it is
    there; else the DMI vendor in /sys/class/dmi/id/sys_vendor and the CPU's
    ``hypervisor`` flag (set by every hypervisor that tells its guests)."""
    import shutil
    import subprocess

    tool = shutil.which("systemd-detect-virt")
    if tool:
        try:
            out = subprocess.run([tool, "--vm"], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
            if out:
                return "not a VM" if out == "none" else f"a VM ({out})"
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        vendor = Path("/sys/class/dmi/id/sys_vendor").read_text().strip()
    except OSError:
        vendor = ""
    try:
        flagged = any(line.startswith("flags") and " hypervisor" in line for line in open("/proc/cpuinfo"))
    except OSError:
        flagged = False
    if flagged:
        return f"a VM ({vendor})" if vendor else "a VM (hypervisor CPU flag)"
    return "not a VM"


@functools.cache
def machine() -> str:
    """'Linux 6.18, 2 CPUs (AMD EPYC), x86_64, cgroup hybrid, host: a VM (kvm)': what a
    reader needs to compare numbers. The cgroup mode is spelled as ``labkit doctor`` does."""
    u = os.uname()
    release = ".".join(u.release.split(".")[:2])
    return (f"{u.sysname} {release}, {os.cpu_count()} CPUs ({cpu_model()}), {u.machine}, "
            f"cgroup {cgroup_mode()}, host: {virtualization()}")


def _pyplot() -> Any:
    import matplotlib

    if "MPLBACKEND" not in os.environ and not os.environ.get("DISPLAY"):
        # Outside Jupyter (tests, scripts) draw into memory; Jupyter sets its own backend.
        try:
            from IPython import get_ipython

            in_kernel = get_ipython() is not None
        except ImportError:
            in_kernel = False
        if not in_kernel:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(
    title: str, what: str, *, nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (8, 4.5), grid: bool = False
) -> tuple[Figure, Any]:
    """A new figure with a title and the footer "what | machine"; returns (fig, axes).

    axes is one Axes for a 1x1 figure, else (or with ``grid=True``) a 2-D array of them."""
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    # the footer wrapped to the figure's width (~18 characters an inch at 7.5 pt); the
    # machine stays whole, on the last line
    width = int(size[0] * 18)
    lines = textwrap.wrap(what, width=width) or [""]
    if len(lines[-1]) + 3 + len(machine()) <= width:
        lines[-1] += f" | {machine()}"
    else:
        lines.append(machine())
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7.5, color="#555555", ha="left", va="bottom")
    fig.footer_height = (0.02 + 0.14 * len(lines)) / size[1]  # of the figure's height: 7.5 pt lines
    axes = axes[0][0] if nrows == ncols == 1 and not grid else axes
    return fig, axes


def done(fig: Figure, path: str | os.PathLike | None = None) -> Figure:
    """Lay the figure out above its footer, save it if asked, and close it for pyplot
    (no double draw)."""
    fig.tight_layout(rect=(0, getattr(fig, "footer_height", 0.04), 1, 0.95))
    if path is not None:
        fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return fig


# --- 00: the lab's map ------------------------------------------------------------------

LAYERS = [  # (name, what it mirrors, modules, notebooks that open it)
    ("labkit CLI", "docker CLI", "labkit run / ps / exec / stats", "12"),
    ("labkit.engine", "dockerd + containerd", "images, build, store", "10, 12"),
    ("labkit.runtime", "runc", "spec (config.json), init, container", "12, 13"),
    ("labkit.kernel", "the kernel's features", "namespaces, cgroups, overlay, network, security  (your exercises)", "02-09"),
    ("Linux kernel", "shared by every container", "system calls, /proc, /sys/fs/cgroup", "01, 11"),
]


def lab_map(path: str | os.PathLike | None = None) -> Figure:
    """labkit's layers next to Docker's, with the notebooks that open each one."""
    from matplotlib.patches import FancyBboxPatch

    fig, ax = figure("The lab's map: labkit's layers mirror Docker's", "the layers of labkit's source tree",
                     size=(9, 5))
    n = len(LAYERS)
    for i, (name, mirrors, mods, nbs) in enumerate(LAYERS):
        y = n - 1 - i
        colour = OWN if name == "labkit.kernel" else (NEUTRAL if name == "Linux kernel" else SHARED)
        ax.add_patch(FancyBboxPatch((0.05, y + 0.1), 6.2, 0.8, boxstyle="round,pad=0.02", fc=colour, ec="#666666"))
        ax.text(0.25, y + 0.62, name, fontsize=11, fontweight="bold", va="center")
        ax.text(0.25, y + 0.32, mods, fontsize=8.5, va="center", color="#333333")
        ax.text(6.5, y + 0.5, mirrors, fontsize=9.5, va="center", style="italic")
        ax.text(9.4, y + 0.5, nbs, fontsize=10, va="center", ha="center", color=ACCENT, fontweight="bold")
        if i:
            ax.annotate("", xy=(3.1, y + 0.9), xytext=(3.1, y + 1.1), arrowprops={"arrowstyle": "->", "color": "#666666"})
    ax.text(6.5, n + 0.1, "mirrors in Docker", fontsize=9, color="#555555")
    ax.text(9.4, n + 0.1, "notebooks", fontsize=9, color="#555555", ha="center")
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.1, n + 0.5)
    ax.set_xlabel("each layer only calls the layers below it (arrows: calls)")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    return done(fig, path)


# --- 02: which namespaces processes share -----------------------------------------------


def namespace_matrix(
    processes: Mapping[str, Mapping[Any, int]], reference: str | None = None, path: str | os.PathLike | None = None
) -> Figure:
    """A heat map: one row per process, one column per namespace kind.

    ``processes`` maps a label to ``namespaces_of(pid)``; a cell is orange where the
    process has a namespace of its own (its inode differs from ``reference``'s row,
    by default the first), grey-blue where it shares the reference's.
    """
    from matplotlib.colors import ListedColormap

    labels = list(processes)
    reference = reference or labels[0]
    ref = processes[reference]
    kinds = [k for k in ref]
    names = [getattr(k, "value", str(k)) for k in kinds]
    grid = [[0 if processes[p].get(k) == ref[k] else 1 for k in kinds] for p in labels]
    fig, ax = figure("Which namespaces do these processes share?", "inode numbers of /proc/PID/ns/*",
                     size=(9, 1.6 + 0.7 * len(labels)))
    ax.imshow(grid, cmap=ListedColormap([SHARED, OWN]), vmin=0, vmax=1, aspect="auto")
    for r, p in enumerate(labels):
        for c, k in enumerate(kinds):
            ino = processes[p].get(k)
            ax.text(c, r, f"{ino}" if ino else "-", ha="center", va="center", fontsize=7.5)
    ax.set_xticks(range(len(kinds)), names)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel(f"namespace kind (cell text: inode number; orange = not shared with '{reference}')")
    ax.set_ylabel("process")
    return done(fig, path)


# --- 03: a process tree from two sides ---------------------------------------------------


def _tree_rows(procs: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Depth-first (depth, pid, name) rows of a forest given as (pid, ppid, name)."""
    pids = {p for p, _, _ in procs}
    children: dict[int, list[tuple[int, str]]] = {}
    roots = []
    for pid, ppid, name in sorted(procs):
        if ppid in pids:
            children.setdefault(ppid, []).append((pid, name))
        else:
            roots.append((pid, name))
    rows: list[tuple[int, int, str]] = []

    def walk(pid: int, name: str, depth: int) -> None:
        rows.append((depth, pid, name))
        for c, n in children.get(pid, []):
            walk(c, n, depth + 1)

    for pid, name in roots:
        walk(pid, name, 0)
    return rows


def process_trees(
    views: Mapping[str, Sequence[tuple[int, int, str]]],
    highlight: Mapping[str, set[int]] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """One panel per view ("from the host", "from inside"): each a tree of (pid, ppid, name).

    ``highlight`` names, per view, the pids drawn in orange (default: pid 1)."""
    rows = {label: _tree_rows(procs) for label, procs in views.items()}
    height = max(len(r) for r in rows.values())
    fig, axes = figure("The same processes, seen from two PID namespaces", "pids from /proc/PID/status (NSpid)",
                       ncols=len(views), size=(4.5 * len(views), 1.5 + 0.5 * height), grid=True)
    for ax, (label, tree) in zip(axes[0], rows.items()):
        marked = (highlight or {}).get(label, {1})
        for i, (depth, pid, name) in enumerate(tree):
            y = height - i
            ax.text(depth * 0.6 + 0.1, y, f"{pid}  {name}", va="center", fontsize=10, family="monospace",
                    bbox={"fc": OWN if pid in marked else SHARED, "ec": "#777777", "boxstyle": "round,pad=0.25"})
            if depth:  # an elbow from the parent's column down to this row
                parent_y = next(height - j for j in range(i - 1, -1, -1) if tree[j][0] == depth - 1)
                x = (depth - 1) * 0.6 + 0.25
                ax.plot([x, x, depth * 0.6 + 0.08], [parent_y - 0.25, y, y], color="#777777", lw=1)
        ax.set_title(label)
        ax.set_xlim(0, 4.2)
        ax.set_ylim(0.3, height + 0.7)
        ax.set_xlabel("depth in the tree (parent -> child)")
        ax.set_xticks([])
        ax.set_yticks([])
    return done(fig, path)


# --- 04: two mount tables side by side ----------------------------------------------------


def mount_tables(tables: Mapping[str, Sequence[Any]], limit: int = 24, path: str | os.PathLike | None = None) -> Figure:
    """Mount tables (lists of labkit.kernel.mounts.Mount) as columns of mount points.

    A mount is grey-blue when another table holds the very same mount (same mount
    point, device and root inside that device), orange when it is this table's own.
    """
    def key(m):
        return (m.mountpoint, m.major_minor, m.root)

    keys = {label: {key(m) for m in ms} for label, ms in tables.items()}
    height = min(limit, max(len(ms) for ms in tables.values())) + 1
    fig, axes = figure("Mount tables compared", "lines of /proc/PID/mountinfo",
                       ncols=len(tables), size=(4.6 * len(tables), 1.2 + 0.32 * height), grid=True)
    for ax, (label, ms) in zip(axes[0], tables.items()):
        others = set().union(*(v for k, v in keys.items() if k != label))
        for i, m in enumerate(sorted(ms, key=lambda m: m.mountpoint)[:limit]):
            colour = SHARED if key(m) in others else OWN
            ax.text(0.02, height - i, f"{m.mountpoint}  ({m.fstype})", va="center", fontsize=8.5,
                    family="monospace", bbox={"fc": colour, "ec": "none", "boxstyle": "square,pad=0.15"})
        if len(ms) > limit:
            ax.text(0.02, height - limit, f"... and {len(ms) - limit} more", va="center", fontsize=8.5)
        ax.set_title(f"{label}: {len(ms)} mounts", fontsize=10)
        ax.set_ylim(0.3, height + 0.7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("mount point (type); orange = no other table has it", fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])
    return done(fig, path)


# --- 05: the layers of an overlay mount --------------------------------------------------


def overlay_layers(
    layers: Sequence[tuple[str, str | os.PathLike]], merged: str | os.PathLike, path: str | os.PathLike | None = None
) -> Figure:
    """A grid: one row per layer (bottom lower layer at the bottom, merged on top),
    one column per file name. ``layers`` lists (label, directory), lowest first, the
    upper layer last. Whiteouts show as black cells; the merged row is coloured by the
    layer each file comes from."""
    from labkit.kernel.overlay import is_opaque, is_whiteout

    def entries(d: Path) -> dict[str, str]:
        found = {}
        for p in sorted(d.rglob("*")):
            rel = str(p.relative_to(d))
            if is_whiteout(p):
                found[rel] = "whiteout"
            elif p.is_dir() and not p.is_symlink():
                found[rel + "/"] = "opaque" if is_opaque(p) else "dir"
            else:
                found[rel] = "file"
        return found

    rows = [(label, entries(Path(d))) for label, d in layers]
    top = entries(Path(merged))
    names = sorted(set(top).union(*(r for _, r in rows)) - {n for n in top if n.endswith("/")} |
                   {n for _, r in rows for n, k in r.items() if k == "opaque"})[:14]
    colours = [SHARED, "#9fc5a8", "#f3c677", OWN]
    fig, ax = figure("The layers of a real overlay mount", "directory listings of each layer and of the mount",
                     size=(1.8 + 0.85 * len(names), 1.6 + 0.8 * (len(rows) + 1)))
    source: dict[str, int] = {}
    for r, (_label, found) in enumerate(rows):
        for c, name in enumerate(names):
            kind = found.get(name)
            if kind is None:
                continue
            fc = WHITEOUT if kind == "whiteout" else colours[r % len(colours)]
            ax.add_patch(_cell(c, r, fc))
            ax.text(c, r, {"whiteout": "whiteout", "opaque": "opaque"}.get(kind, name.rstrip("/")),
                    ha="center", va="center", fontsize=7, color="white" if kind == "whiteout" else "black")
            if kind != "whiteout":
                source[name] = r
            else:
                source.pop(name, None)
    m = len(rows)
    for c, name in enumerate(names):
        if name in top or name.rstrip("/") + "/" in top:
            r = source.get(name, m - 1)
            ax.add_patch(_cell(c, m, colours[r % len(colours)]))
            ax.text(c, m, name.rstrip("/"), ha="center", va="center", fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(-0.6, m + 0.6)
    ax.set_yticks(range(m + 1), [label for label, _ in rows] + ["merged (what the container sees)"])
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("path in the layer (a merged cell has the colour of the layer it comes from)")
    ax.set_ylabel("layer (reads look from the top down)")
    return done(fig, path)


def _cell(x: float, y: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.45, y - 0.4), 0.9, 0.8, fc=colour, ec="#666666")


# --- time series (06, 07, the widget) -------------------------------------------------------


def timeseries(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str, ylabel: str, what: str,
    limit: float | None = None, limit_label: str = "limit", path: str | os.PathLike | None = None,
    spread: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Figure:
    """Lines over time: ``series`` maps a label to (seconds, values). ``spread`` maps a
    label to (lows, highs) at the same times, drawn as a shaded band around its line
    (e.g. the min and max over repeated runs, when the line is their median)."""
    fig, ax = figure(title, what)
    for label, (xs, ys) in series.items():
        (line,) = ax.plot(xs, ys, label=label, lw=1.6)
        if spread and label in spread:
            lows, highs = spread[label]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.18, lw=0)
    if limit is not None:
        ax.axhline(limit, color="#b00020", ls="--", lw=1, label=limit_label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)  # an amount: its axis starts at zero, so heights compare
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return done(fig, path)


# --- bars side by side (01: VM vs container vs process; 07: billing) ----------------------


def bar_panels(
    panels: Mapping[str, Mapping[str, float]], *, title: str, what: str, log: bool = False,
    references: Mapping[str, Sequence[tuple[float, str]]] | None = None, xlabel: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """One panel of bars per measure: ``panels`` maps a y-axis label with its unit
    ("start time (ms)") to {bar label: value}. Each bar carries its value as text.

    ``log`` puts every panel on a log scale, for values that differ by orders of
    magnitude. ``references`` adds dashed horizontal lines per panel, e.g. a published
    figure: {"start time (ms)": [(125, "Firecracker: <=125 ms")]}.
    """
    colours = [OWN, ACCENT, "#6a9f58", "#8c6bb1", SHARED]
    fig, axes = figure(title, what, ncols=len(panels), size=(4.6 * len(panels), 4.6), grid=True)
    for ax, (ylabel, bars) in zip(axes[0], panels.items()):
        labels, values = list(bars), [float(v) for v in bars.values()]
        drawn = ax.bar(labels, values, color=[colours[i % len(colours)] for i in range(len(labels))])
        for rect, value in zip(drawn, values):
            text = f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
            ax.annotate(text, (rect.get_x() + rect.get_width() / 2, value), ha="center", va="bottom",
                        fontsize=8.5, xytext=(0, 2), textcoords="offset points")
        for level, label in (references or {}).get(ylabel, ()):
            ax.axhline(level, color="#b00020", ls="--", lw=1)
            ax.annotate(label, (0.02, level), xycoords=("axes fraction", "data"), fontsize=7.5,
                        color="#b00020", va="bottom", xytext=(0, 2), textcoords="offset points")
        if log:
            ax.set_yscale("log")
            top = max([*values, *(lvl for lvl, _ in (references or {}).get(ylabel, ()))] or [1.0])
            low = min([v for v in values if v > 0] or [1.0])
            ax.set_ylim(bottom=low / 3, top=top * 4)  # every bar visible; room for the labels
        else:
            ax.set_ylim(top=max(values or [1.0]) * 1.15)
        ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
        ax.set_xlabel(xlabel or "what was measured")
        ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    return done(fig, path)


# --- every measurement, with its median (01: process vs container vs VM) --------------------


def spread_panels(
    panels: Mapping[str, Mapping[str, Sequence[float]]], *, title: str, what: str, log: bool = False,
    xlabel: str = "", width: float = 4.6, path: str | os.PathLike | None = None,
) -> Figure:
    """One panel per measure: ``panels`` maps a y label with its unit to {label: [values]};
    ``width`` is each panel's, in inches.

    Every value is drawn as a point (spread sideways a little so none hides another), the
    median as a short bar across them, labelled with its value and n. No bars: a bar's
    length means nothing on a log axis, and one number hides the spread."""
    colours = [OWN, ACCENT, "#6a9f58", "#8c6bb1", "#555555"]  # points: the pale SHARED would not show
    fig, axes = figure(title, what, ncols=len(panels), size=(width * len(panels), 4.6), grid=True)
    for ax, (ylabel, groups) in zip(axes[0], panels.items()):
        everything = []
        for i, values in enumerate(groups.values()):
            values = [float(v) for v in values]
            everything += values
            if not values:
                continue
            offsets = [((k * 0.618) % 1 - 0.5) * 0.3 for k in range(len(values))]  # a fixed, even spread
            ax.scatter([i + o for o in offsets], values, s=18, color=colours[i % len(colours)], alpha=0.75,
                       edgecolor="none", zorder=3)
            mid = statistics.median(values)
            ax.hlines(mid, i - 0.25, i + 0.25, color="#222222", lw=2, zorder=4)
            ax.annotate(f"{mid:.3g}  (n={len(values)})", (i + 0.27, mid), fontsize=8, va="center")
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_xlim(-0.6, len(groups) - 0.1)
        if log:
            ax.set_yscale("log")
            positive = [v for v in everything if v > 0] or [1.0]
            ax.set_ylim(min(positive) / 3, max(positive) * 3)
        else:
            ax.set_ylim(bottom=0, top=max(everything or [1.0]) * 1.15)
        ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
        ax.set_xlabel(xlabel or "what was measured")
        ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    return done(fig, path)
