"""Find and kill labkit VMs whose launcher is gone, for ``labkit cleanup``.

A VM's qemu is named ``labkit-vm-<launcher pid>-<random>`` (qemu's ``-name``, also its
process name). PR_SET_PDEATHSIG normally kills qemu with its launcher; a VM whose parent is
no longer that launcher slipped through (e.g. the launcher's thread ended) and is a stray.
A VM whose launcher is alive is in use and is left alone.

Layer: lab. Used by ``labkit cleanup`` and the tests; reads /proc only (proc(5)).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from labkit import paths


def _pids_of(pid: int) -> list[int]:
    """A process's pid in each PID namespace it is in, outermost first (NSpid in
    /proc/PID/status, see proc(5)); [] when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def stray_vms() -> list[int]:
    """PIDs of labkit's qemu processes whose parent is not the launcher their name gives.

    The name holds the launcher's pid as the launcher saw it. A launcher in a PID namespace
    of its own (a container, `make test-fresh`) has another pid out here: so the parent's
    pids in every namespace are compared, not the one this process sees."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        for arg in argv[1:]:
            m = re.match(rf"{paths.VM_NAME_PREFIX}-(\d+)-".encode(), arg)
            if m and b"-name" in argv:
                if int(m[1]) not in _pids_of(parent):
                    found.append(int(entry.name))
                break
    return sorted(found)


def kill_stray_vms() -> list[int]:
    """SIGKILL every stray labkit VM; returns their PIDs."""
    pids = stray_vms()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
