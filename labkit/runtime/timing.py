"""Where the time of one container start goes: opt-in marks, ``LABKIT_TIMING=FILE``.

With the environment variable LABKIT_TIMING naming a file, each step of a start
appends one line to it as it *begins*: the phase, CLOCK_MONOTONIC in nanoseconds, and
the pid of the process that got there (init writes 1: it is PID 1 of its namespace).

    image 18446744073 4210          labkitd's worker: the image's config and layers, the spec
    cgroup 18447121980 4210         container.create makes the cgroup
    shim 18447345012 4210           it forks the shim (a detached container)
    namespaces 18449876101 4213     the shim forks init into a new PID namespace
    namespaces 18450021311 1        init: unshare(2) ... one line per step, up to
    exec 18461000000 1              the execve(2) of the command
    teardown 18463020002 4213       the shim has reaped init

A phase lasts until the next line. CLOCK_MONOTONIC is one clock for every process on
the machine (a container with a time namespace of its own shifts init's marks by its
offset), so lines from labkitd, the shim and init, and a notebook's own clock, line up.
Each line is one write(2) with O_APPEND, so processes writing at once never mix their
lines. Without LABKIT_TIMING a mark costs one dictionary lookup.

A process keeps the file open from its first mark on, and its forks inherit the
descriptor: so init, whose parent marked just before the fork, still writes after
pivot_root, when the host's path is out of its reach. The descriptor is close-on-exec:
the command never sees it. A mark that cannot be written is dropped: timing never stops
a container from starting.

Layer: runtime. Marks are set by container.py, shim.py, init.py and the CLI's run
flags (the image); labkit.lab.timeline reads them.
"""

from __future__ import annotations

import os
import time

ENV = "LABKIT_TIMING"
_open: tuple[str, int] | None = None  # the file this process has open: (path, fd)


def mark(phase: str) -> None:
    """Note that ``phase`` begins now (nothing at all without LABKIT_TIMING)."""
    path = os.environ.get(ENV)
    if not path:
        return
    global _open
    try:
        if _open is None or _open[0] != path:
            _open = (path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
        os.write(_open[1], f"{phase} {time.monotonic_ns()} {os.getpid()}\n".encode())
    except OSError:  # a full disk, a path that is gone, a seccomp filter that refuses write(2)
        pass


def read(path: str | os.PathLike, since: int = 0) -> list[tuple[str, int, int]]:
    """The marks in ``path`` from byte ``since`` on: (phase, monotonic ns, pid), in time order.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w") as f:
    ...     _ = f.write("mounts 20 1\\ncgroup 10 7\\n"); f.flush()
    ...     read(f.name)
    [('cgroup', 10, 7), ('mounts', 20, 1)]
    """
    with open(path, "rb") as f:
        f.seek(since)
        lines = f.read().decode().splitlines()
    marks = []
    for line in lines:
        phase, ns, pid = line.split()
        marks.append((phase, int(ns), int(pid)))
    return sorted(marks, key=lambda m: m[1])
