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


def stray_vms() -> list[int]:
    """PIDs of labkit's qemu processes whose parent is not the launcher their name gives."""
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
                if int(m[1]) != parent:
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
