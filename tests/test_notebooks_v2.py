"""The cgroup notebooks (06 and 07) under nbval on cgroup v2, inside labkit's small VM.

The course VM has cgroup v2 and this host may have v1 only, so scripts/notebooks_in_vm.py
boots a v2-only guest that sees the host's / read-only, and runs nbval there with the
host's venv. Under software emulation the whole run takes 70 to 130 s on a 2-core host
(boot ~4 s, pytest and the first Jupyter kernel ~15 s, the cells ~50 s), so it runs with
the rest of the suite. Every code cell of both notebooks must pass: nbval's lax mode makes one test
item per code cell, and the count is compared with the notebooks themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, need_tool

from labkit import paths

SCRIPT = REPO / "scripts" / "notebooks_in_vm.py"
_spec = importlib.util.spec_from_file_location("notebooks_in_vm", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # it ended while we looked
        return ""


def code_cells(notebook: str) -> int:
    cells = json.loads((REPO / notebook).read_text())["cells"]
    return sum(1 for c in cells if c["cell_type"] == "code")


def test_summary_is_pytests_last_line():
    out = "x\n....\n== slowest durations ==\n2.1s call a::Cell 1\n== 2 failed, 39 passed in 55.27s ==\n"
    assert script.pytest_summary(out) == "2 failed, 39 passed in 55.27s"
    assert script.pytest_summary(out + "notebooks_in_vm: guest pytest exit 1: 2 failed, 39 passed in 55.27s\n") \
        == "2 failed, 39 passed in 55.27s"  # the script's own closing line is not pytest's
    assert script.pytest_summary("== no tests ran in 0.01s ==") == "no tests ran in 0.01s"
    assert script.pytest_summary("Traceback (most recent call last):\n  boom\n") == ""


def test_a_path_that_is_no_notebook_is_refused_before_any_boot(capsys):
    started = time.monotonic()
    assert script.main(["solutions/06-no-such.ipynb"]) == 2
    assert script.main(["README.md"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "'README.md' is not a notebook" in err[1] and ".ipynb" in err[1]
    assert time.monotonic() - started < 1, "it booted a VM for a bad argument"


@pytest.mark.vm
def test_cgroup_notebooks_pass_in_a_cgroup_v2_guest(capsys):
    from labkit.lab.vm.host import find_kernel, host_arch

    need_tool(host_arch().qemu)
    try:
        find_kernel()
    except LookupError as e:
        pytest.skip(str(e))

    # the script stops the VM itself at --timeout; past ours, SIGTERM lets it power the VM off
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--timeout", "800"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    seconds = time.monotonic() - started
    output = out + err
    vm_name = f"{paths.VM_NAME_PREFIX}-{proc.pid}-"  # the launcher's pid is in its VM's name
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and vm_name in _cmdline(pid)]
    assert left == [], f"the script's VM is still running: pids {left}"
    summary = script.pytest_summary(out)
    tail = "\n".join(output.strip().splitlines()[-40:])
    with capsys.disabled():
        print(f"\n[notebooks 06 and 07 in a cgroup v2 guest] {seconds:.1f} s: {summary or 'no summary'}")

    assert proc.returncode == 0, f"notebooks_in_vm.py exited with {proc.returncode}:\n{tail}"
    expected = sum(code_cells(nb) for nb in script.DEFAULT_NOTEBOOKS)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", summary.split(" in ")[0])}
    assert counts.get("passed") == expected and set(counts) <= {"passed", "warning", "warnings"}, \
        f"expected all {expected} code cells to pass, the guest says {summary!r}:\n{tail}"
