"""``labkit top NAME``: a container's processes, each as the host and the container see it.

Every process of the container is in its cgroup, so ``cgroup.procs`` lists them (in host
pids); a rootless container has none, and its processes are those in its PID namespace. For each, /proc/PID/status read from the host gives the host's view: ``Uid`` is
the host uid, and ``NSpid`` the pid in each PID namespace down to the container's. The
container's uid is the host uid read back through the container's uid map: with
``--userns=auto`` root inside (0) is, say, 1000000 outside; without a user namespace
both columns are the same, and root in the container *is* the host's root.

    $ labkit top web
    UID       PID    PPID   CUID   CPID   CMD
    1000000   81234  81230  0      1      sleep 300

Layer: the CLI. Reads labkit.runtime (the container's state and spec) and labkit.kernel.proc.
"""

from __future__ import annotations

import argparse
import os
import pwd

from labkit.cli.containers import resolve
from labkit.errors import LabkitError, StateError
from labkit.kernel import cgroups, proc
from labkit.runtime import container
from labkit.runtime.status import Status


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("container")


def run(command: str, args: argparse.Namespace) -> int:
    state = container.load(resolve(args.container))
    if state.status not in (Status.RUNNING, Status.PAUSED):
        raise StateError(f"container {state.name} is {state.status.value}: top shows a running one's processes")
    spec = container.spec_of(state.id)
    rows = [("UID", "PID", "PPID", "CUID", "CPID", "CMD")]
    for pid in sorted(_pids(state)):
        try:
            st = proc.status(pid)
            uid, ppid = int(st["Uid"][1]), st["PPid"][0]  # the effective uid
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip() or f"[{proc.name(pid)}]"
        except (OSError, KeyError, IndexError):
            continue  # it ended while we looked
        rows.append((_user(uid), str(pid), ppid, _inside(uid, spec.uid_map), st.get("NSpid", ["?"])[-1], cmd))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("   ".join(f"{c:<{w}}" for c, w in zip(r[:5], widths)) + "   " + r[5])
    return 0


def _pids(state) -> set[int]:
    """The host pids in the container's cgroup; without one (rootless), every process
    in init's PID namespace (the same /proc/PID/ns/pid inode)."""
    try:
        found = set(cgroups.open(state.cgroup).procs(recursive=True))
        if found:
            return found
    except (LabkitError, OSError):
        pass
    try:
        ns = os.stat(f"/proc/{state.pid}/ns/pid").st_ino
    except OSError:
        return {state.pid}
    found = set()
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}/ns/pid").st_ino == ns:
                found.add(int(name))
        except OSError:
            continue  # gone, or not ours to look at
    return found or {state.pid}


def _inside(uid: int, uid_map) -> str:
    """The uid the container sees for host ``uid`` (no map: the same)."""
    if not uid_map:
        return str(uid)
    for inside, host, size in uid_map:
        if host <= uid < host + size:
            return str(uid - host + inside)
    return "65534"  # not mapped: the kernel's overflow uid, "nobody"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
