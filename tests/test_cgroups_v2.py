"""labkit's cgroup code on cgroup v2, on a host that has v1: inside labkit's small VM
(and with it the runtime, the CLI and the networks, whose set-up touches the cgroup).

The guest boots the host's kernel with cgroup_no_v1=all, mounts only cgroup2 at
/sys/fs/cgroup with every controller enabled, and sees the host's / read-only over 9p (a
tmpfs takes its writes; LABKIT_ROOT and TMPDIR point at a tmpfs in /run). There it runs
tests/test_cgroups.py, the very module that runs on the host, with the host's venv Python.
The guest's pytest summary is shown here; its failure, or a run that skipped everything,
fails this test.
"""

from __future__ import annotations

import re
import sys
import textwrap
import time

import pytest
from conftest import REPO, need_tool

pytestmark = pytest.mark.vm

TARGET = REPO / "tests" / "test_cgroups.py"

# Checked in the guest before its test run, and the whole run if TARGET is missing:
# the guest must really be cgroup v2 only, with the controllers labkit limits.
PREFLIGHT = textwrap.dedent("""
    import ctypes, os, struct
    CGROUP2_SUPER_MAGIC = 0x63677270  # linux/magic.h
    buf = ctypes.create_string_buffer(256)
    assert ctypes.CDLL(None, use_errno=True).statfs(b"/sys/fs/cgroup", buf) == 0
    assert struct.unpack_from("l", buf)[0] == CGROUP2_SUPER_MAGIC, "/sys/fs/cgroup is not cgroup2"
    controllers = open("/sys/fs/cgroup/cgroup.controllers").read().split()
    missing = {"cpu", "memory", "pids", "io", "cpuset"} - set(controllers)
    assert not missing, f"cgroup2 lacks {missing}"
    assert not any(line.split()[2] == "cgroup" for line in open("/proc/mounts")), "a v1 hierarchy"
    assert os.path.exists("/dev/loop-control"), "no loop devices"
    print("preflight: cgroup2 only, controllers:", " ".join(controllers))
""")

STAND_IN = textwrap.dedent("""
    def test_guest_is_cgroup_v2_only():
        exec(open("/run/tmp/preflight.py").read())
""")


def summary(output: str) -> dict[str, int]:
    """pytest's last line, '12 passed, 2 skipped in 30.1s', as {'passed': 12, 'skipped': 2}."""
    for line in reversed(output.strip().splitlines()):
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if counts and " in " in line:
            return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in counts}
    return {}


def test_summary_reads_pytest_last_line():
    assert summary("x\n== 3 failed, 12 passed, 1 skipped, 2 errors in 30.10s ==\n") == {
        "failed": 3, "passed": 12, "skipped": 1, "error": 2}
    assert summary("Traceback ...\n") == {}


def test_cgroup_tests_pass_in_a_cgroup_v2_guest(capsys):
    if TARGET.exists():
        _run_in_v2_guest(str(TARGET.relative_to(REPO)), "", capsys)
    else:  # the cgroup test module is not there yet: check the guest itself
        _run_in_v2_guest("/run/tmp/test_standin.py", f"cat > /run/tmp/test_standin.py <<'EOF'\n{STAND_IN}EOF\n",
                         capsys)  # fmt: skip


# The runtime where cgroup v2 changes its path: the shim (or labkit itself) moves init
# into the group while init sets up; OOM kills are read from memory.events; limits and
# /sys/fs/cgroup inside the container are v2's. In-process only: through labkitd the same
# shim code moves init (the host runs both), and under emulation each run takes seconds.
RUNTIME = ("tests/test_runtime.py tests/test_cli.py -k "
           "'not vs_runc and not labkitd and (flag_is_seen or exit_code or oom or fork_loop or ctrl_c or interrupted "
           "or detached_lifecycle or default_is or test_runtime)'")  # fmt: skip


def test_runtime_tests_pass_in_a_cgroup_v2_guest(capsys):
    _run_in_v2_guest(RUNTIME, "", capsys)


# Networks on the v2 guest's own kernel (Debian 12's 6.1, with veth, bridge and nf_tables
# loaded from the initramfs): the kernel layer by hand, and the engine's networks, where a
# container's cgroup and its network namespace are set up together.
# Only what the kernel does: the leases (twenty starts, a labkitd restart, SIGKILL at four
# moments), the parsing of bad input and the refusals of clashing subnets and ports are
# the engine's, the same on either kernel, and under software emulation they took minutes.
NETWORK = ("tests/test_network.py tests/test_networks.py -k 'not twenty_parallel and not labkitd_restart "
           "and not sigkill and not bad_input and not refuses and not port_taken and not ranges "
           "and not importing and not bridge_name and not two_removers and not lookup_and_delete'")  # fmt: skip


def test_network_tests_pass_in_a_cgroup_v2_guest(capsys):
    _run_in_v2_guest(NETWORK, "", capsys)


# Checkpoint and restore with CRIU on the guest's kernel, where Debian's criu 3.17 works
# (on a newer host kernel `criu check` fails and tests/test_checkpoint.py skips them): a
# counter that counts on after restore, and a web server on the bridge that serves again.
# Only the round trips, each of which must run here: a skip fails this test.
CHECKPOINT = "tests/test_checkpoint.py -k 'goes_on_counting or serves_again'"


def test_checkpoint_round_trips_pass_in_a_cgroup_v2_guest(capsys):
    need_tool("criu")  # the guest runs the host's, seen through the 9p share
    counts = _run_in_v2_guest(CHECKPOINT, "", capsys)
    assert counts.get("passed") == 2 and not counts.get("skipped"), f"not every round trip ran: {counts}"


# User namespaces on Debian 12's kernel 6.1 (whose tmpfs cannot be idmapped: the chowned
# copies), rootless labkit for a user the test makes there, and --cgroupns on cgroup v2,
# where a private cgroup namespace reads 0::/. In-process only: labkitd adds nothing here.
# (The kernel's part only: the flags' parsing and the two-container leases are the host's.)
USERNS = ("tests/test_userns.py tests/test_rootless.py -k 'not labkitd and (root_inside or whiteouts or "
          "cgroupns or root_in_the_container or detached or delegated)'")  # fmt: skip


def test_user_namespace_tests_pass_in_a_cgroup_v2_guest(capsys):
    _run_in_v2_guest(USERNS, "", capsys)


def _run_in_v2_guest(tests: str, write: str, capsys) -> dict[str, int]:
    from labkit.lab.vm import VM
    from labkit.lab.vm.host import find_kernel, host_arch

    need_tool(host_arch().qemu)
    try:
        find_kernel()
    except LookupError as e:
        pytest.skip(str(e))

    write = f"cat > /run/tmp/preflight.py <<'EOF'\n{PREFLIGHT}EOF\n" + write
    python = sys.executable  # the host's venv, seen through the 9p share
    # pytest's plugins (nbval and the Jupyter stack) cost ~20 s to import when emulated;
    # the cgroup tests need none of them
    script = (write + f"{python} /run/tmp/preflight.py || exit 99\n"
              f"exec {python} -m pytest -q -rfEs -p no:cacheprovider {tests}")

    started = time.monotonic()
    with VM(memory="2G", cpus=2, share_host_root=True, cgroup="v2") as vm:
        boot = vm.boot_seconds
        env = {"PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
               "LABKIT_TEST_SLOWDOWN": "1" if vm.accel == "kvm" else "4"}  # emulated: slower
        result = vm.run(script, cwd=str(REPO), env=env, timeout=900)
        accel = vm.accel
    total = time.monotonic() - started

    counts = summary(result.output)
    tail = "\n".join(result.output.strip().splitlines()[-40:])
    with capsys.disabled():
        print(f"\n[cgroup v2 guest, {accel}] boot {boot:.1f} s, run {result.seconds:.1f} s, "
              f"total {total:.1f} s: {tests}: {counts or 'no summary'}")
    assert result.returncode != 99, f"the guest is not cgroup v2 only:\n{tail}"
    assert result.returncode == 0, f"the guest's pytest failed (exit {result.returncode}):\n{tail}"
    assert counts.get("passed", 0) > 0, f"the guest ran no test (all skipped?):\n{tail}"
    return counts
