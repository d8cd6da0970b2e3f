"""labkit and runc side by side on the same OCI bundle: what a process sees inside.

The bundle comes from `labkit runtime spec` (runc spec's defaults: 3 capabilities,
read-only root, no_new_privileges), so both runtimes get the same capabilities. The one
documented difference: on cgroup v1 runc also bind-mounts hierarchies labkit does not
manage (name=systemd) under /sys/fs/cgroup; those lines are left out of the comparison.
And labkit remounts the tmpfs at /sys/fs/cgroup read-only, as the spec's "ro" option asks;
runc 1.1.5 leaves that tmpfs writable (only the hierarchies in it are read-only).
The probe reads the limits from v1's files or v2's, whichever the container sees.
"""

from __future__ import annotations

import subprocess

import pytest
from bundles import LABKIT, bundle, edit_config, labkit, leftovers
from conftest import need_tool

from labkit.kernel.cgroups import detect

PROBE = r"""
echo "hostname=$(hostname)"
echo "pid=$$"
echo "procs=$(ls /proc | grep -c '^[0-9]')"
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status
grep NoNewPrivs /proc/self/status
echo "kcore=$(cat /proc/kcore 2>/dev/null | wc -c)"
echo x 2>/dev/null > /proc/sys/kernel/hostname || echo "proc_sys=ro"
hostname other 2>/dev/null || echo "sethostname=EPERM"
mount -t tmpfs t /mnt 2>/dev/null || echo "mount=EPERM"
touch /rootfile 2>/dev/null || echo "root=ro"
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v2: one tree, other file names
    echo "memory=$(cat /sys/fs/cgroup/memory.max)"
    echo "pids=$(cat /sys/fs/cgroup/pids.max)"
    echo "quota=$(cut -d' ' -f1 /sys/fs/cgroup/cpu.max)"
else
    echo "memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
    echo "pids=$(cat /sys/fs/cgroup/pids/pids.max)"
    echo "quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
fi
ls /dev | tr '\n' ' '; echo
mount | grep -v ' /sys/fs/cgroup/systemd ' | awk '{print $3, $5, $6}' | sed 's/,size=[0-9]*k//' | sort
"""


@pytest.fixture
def probe_bundle(tmp_dir):
    b = bundle(tmp_dir, ["sh", "-c", PROBE])

    def limits(doc):
        doc["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 20},
                                     "cpu": {"quota": 50000, "period": 100000}}  # fmt: skip

    edit_config(b, limits)
    yield b
    assert leftovers() == []


def test_same_view_inside_labkit_and_runc(probe_bundle):
    runc = need_tool("runc")
    ours = labkit("runtime", "run", "--bundle", str(probe_bundle), "vsrunc-lk")
    theirs = subprocess.run([runc, "run", "--bundle", str(probe_bundle), "vsrunc-rc"], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert theirs.returncode == 0, theirs.stderr
    assert ours.returncode == 0, ours.stderr
    a, b = ours.stdout.splitlines(), theirs.stdout.splitlines()
    if detect.version() == 1:  # a tmpfs of hierarchies, read-only in labkit only (see above)
        cgroup_tmpfs = "/sys/fs/cgroup tmpfs (ro,"
        assert any(line.startswith(cgroup_tmpfs) for line in a)
        b = [line.replace("/sys/fs/cgroup tmpfs (rw,", cgroup_tmpfs) for line in b]
    # how many processes `ls /proc` catches alive depends on timing (3 or 4): compared below
    assert [x for x in a if not x.startswith("procs=")] == [x for x in b if not x.startswith("procs=")]
    # and the values are the isolated ones, not merely equal
    for lines in (a, b):
        procs = next(line for line in lines if line.startswith("procs="))
        assert int(procs[6:]) <= 4  # sh, the $(...) subshell, ls, grep: none of the host's
    for line in ("hostname=runc", "pid=1", "CapBnd:\t0000000020000420", "NoNewPrivs:\t1", "kcore=0",
                 "proc_sys=ro", "sethostname=EPERM", "mount=EPERM", "root=ro", f"memory={64 << 20}", "pids=20",
                 "quota=50000"):  # fmt: skip
        assert line in a


def test_state_and_lifecycle_commands_match_runc_shape(probe_bundle):
    def sleeper(doc):
        doc["process"]["args"] = ["sleep", "30"]

    edit_config(probe_bundle, sleeper)
    # like runc create, the container keeps the caller's stdout: give it one nobody waits on
    r = subprocess.run([*LABKIT, "runtime", "create", "--bundle", str(probe_bundle), "vsrunc-st"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
    assert r.returncode == 0
    import json

    state = json.loads(labkit("runtime", "state", "vsrunc-st").stdout)
    assert state["status"] == "created" and state["id"] == "vsrunc-st" and state["pid"] > 0
    assert labkit("runtime", "start", "vsrunc-st").returncode == 0
    assert json.loads(labkit("runtime", "state", "vsrunc-st").stdout)["status"] == "running"
    r = labkit("runtime", "delete", "vsrunc-st")
    assert r.returncode != 0 and "cannot delete container vsrunc-st: it is running" in r.stderr
    assert labkit("runtime", "kill", "vsrunc-st", "KILL").returncode == 0
    for _ in range(200):
        if json.loads(labkit("runtime", "state", "vsrunc-st").stdout)["status"] == "stopped":
            break
    assert labkit("runtime", "delete", "vsrunc-st").returncode == 0


def test_runc_s_phases_are_found_in_its_strace(tmp_dir):
    """labkit.lab.timeline reads the phases of a start from strace -f -ttt of the real runc
    (notebook 12's timeline): each phase once, those inside the container in their order."""
    from labkit.lab import timeline

    runc, strace = need_tool("runc"), need_tool("strace")
    b = bundle(tmp_dir, ["true"])
    edit_config(b, lambda doc: doc["linux"].update(seccomp={
        "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO"}]}))
    out = tmp_dir / "runc.strace"
    r = subprocess.run([strace, "-f", "--seccomp-bpf", "-ttt", "-o", str(out),
                        "-e", "trace=execve,mkdir,mkdirat,unshare,mount,pivot_root,prctl,seccomp",
                        runc, "run", "--bundle", str(b), "vsrunc-tl"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    events, start, end = timeline.runc_events(out.read_text())
    phases = [phase for phase, _ in sorted(events, key=lambda e: e[1])]
    assert sorted(phases) == sorted(["namespaces", "namespaces", "cgroup", "mounts", "pivot_root", "capabilities",
                                     "seccomp", "exec", "teardown"]), phases
    # runc spec's bundle has no_new_privileges: the filter comes after the capabilities, last
    inside = ["mounts", "pivot_root", "capabilities", "seccomp", "exec", "teardown"]
    assert [p for p in phases if p in inside] == inside
    pieces = timeline.segments(events, start, end)
    assert pieces[0].phase == "client" and abs(sum(s.ms for s in pieces) - (end - start) / 1e6) < 1e-6
