"""labkit's small VM: boots the host's kernel under qemu, runs commands, leaves no qemu behind.

Whether KVM runs a guest is tested against the real qemu: the probe guest under TCG must run
to its end, and the verdict for KVM must agree with what a real KVM boot of the VM does.

Software emulation (TCG) is fine: each boot takes a few seconds. The guests here have only
busybox; tests/test_cgroups_v2.py boots one with the host's root.
"""

from __future__ import annotations

import lzma
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, need_tool

from labkit import paths
from labkit.errors import InvalidValue, Unsupported
from labkit.lab.vm import VM, VMError, kvm, stray_vms
from labkit.lab.vm.host import find_kernel, resolve_modules
from labkit.lab.vm.initramfs import Cpio

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_kernel():
    from labkit.lab.vm.host import host_arch

    need_tool(host_arch().qemu)
    try:
        find_kernel()
    except LookupError as e:
        pytest.skip(str(e))


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # dead, waiting for its parent to reap it
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_run_passes_output_exit_code_and_figures():
    with VM(memory="256M", cgroup="v2") as vm:
        pid = vm.pid
        assert vm.accel == ("kvm" if kvm.kvm_verdict().works else "tcg")  # the verdict doctor shows
        assert 0 < vm.guest_boot_seconds < vm.boot_seconds < 120
        assert vm.memory_bytes() > 16 << 20  # the guest's kernel alone is bigger than that

        r = vm.run("echo out; echo err >&2; exit 3")
        assert (r.returncode, r.output) == (3, "out\nerr\n")
        r = vm.run(["printf", "%s", "no newline at the end"])
        assert (r.returncode, r.output) == (0, "no newline at the end")
        r = vm.run("echo $LABKIT_ROOT $GREETING; pwd", env={"GREETING": "it's me"}, cwd="/proc")
        assert r.output == "/run/labkit it's me\n/proc\n"

        # the guest really is another kernel: its own PID 1 and only cgroup2 at /sys/fs/cgroup
        r = vm.run("readlink /proc/1/exe; grep ' /sys/fs/cgroup ' /proc/mounts; cat /proc/cgroups")
        assert r.output.splitlines()[0] == "/.labkit/busybox"
        assert " cgroup2 " in r.output.splitlines()[1]
        controllers = set(vm.run("cat /sys/fs/cgroup/cgroup.subtree_control").output.split())
        assert {"cpu", "memory", "pids", "io", "cpuset"} <= controllers

        # a command that outlives its timeout: a clear error, and the VM is stopped
        with pytest.raises(VMError, match="did not finish 'sleep 30' within 2 s"):
            vm.run("sleep 30", timeout=2)
        assert vm.pid is None
    assert _gone(pid)
    assert pid not in stray_vms()
    assert not list((paths.run_root() / "vm").glob("labkit-vm-*"))


def test_cgroup_v1_guest_mounts_one_hierarchy_per_controller():
    with VM(memory="256M", cgroup="v1") as vm:
        mounts = vm.run("cat /proc/mounts").output
    v1 = {f[1]: f[3].split(",") for f in map(str.split, mounts.splitlines()) if f[2] == "cgroup"}
    for controller in ["memory", "pids", "cpu", "blkio", "cpuset", "freezer"]:
        assert controller in v1[f"/sys/fs/cgroup/{controller}"], mounts


def test_qemu_dies_with_a_killed_launcher():
    # a launcher that boots a VM and waits forever; we SIGKILL it while its guest boots
    code = "from labkit.lab.vm import VM; VM(memory='256M').start(); import time; time.sleep(300)"
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline, qemu = time.monotonic() + 30, None
        while qemu is None and time.monotonic() < deadline:
            qemu = next((p for p in _children(launcher.pid) if _comm(p).startswith("labkit-vm")), None)
            time.sleep(0.1)
        assert qemu is not None, "the launcher never started qemu"
        assert qemu not in stray_vms(), "a VM with a live launcher is not a stray"
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    assert _gone(qemu), f"qemu {qemu} outlived its launcher"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()  # qemu's -name ...,process= sets it
    except FileNotFoundError:
        return ""


def test_cli_prints_output_and_exits_with_the_code():
    labkit = [sys.executable, "-m", "labkit", "vm", "run", "--memory", "256M", "--"]
    r = subprocess.run([*labkit, "echo hello from the guest; exit 7"], capture_output=True, text=True,
                       timeout=180, check=False)
    assert r.returncode == 7, r.stderr
    assert r.stdout == "hello from the guest\n"
    assert "VM booted in" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--memory", "12XB"], "invalid VM memory '12XB': expected a size in MiB or GiB"),
    (["--memory", "64M"], "invalid VM memory '64M': expected at least 128M"),
    (["--cgroup", "v3"], "invalid VM cgroup mode 'v3': expected v1 or v2"),
    (["--accel", "fast"], "invalid VM accelerator 'fast': expected auto, kvm or tcg"),
])
def test_cli_rejects_bad_values_before_starting_anything(args, message):
    before = stray_vms()
    r = subprocess.run([sys.executable, "-m", "labkit", "vm", "run", *args, "--", "true"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"labkit: {message}"), r.stderr
    assert stray_vms() == before


def test_bad_values_in_the_api():
    for kwargs in [{"memory": "lots"}, {"cpus": 0}, {"cgroup": "v3"}, {"accel": "fast"}]:
        with pytest.raises(InvalidValue):
            VM(**kwargs)


def test_modules_resolve_dependencies_first(tmp_dir: Path):
    # pure parsing: a made-up modules.dep, in the format depmod(8) writes
    (tmp_dir / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n")
    (tmp_dir / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    order = resolve_modules(tmp_dir, ["9p", "9pnet_virtio", "virtio"], ["loop"])
    assert order == ["kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko", "kernel/fs/9p/9p.ko.xz",
                     "kernel/net/9p/9pnet_virtio.ko"]
    with pytest.raises(Unsupported, match="no_such_driver is neither in"):
        resolve_modules(tmp_dir, ["no_such_driver"])


def test_compressed_module_is_decompressed(tmp_dir: Path):
    from labkit.lab.vm.host import module_bytes

    (tmp_dir / "m.ko.xz").write_bytes(lzma.compress(b"\x7fELF module"))
    assert module_bytes(tmp_dir / "m.ko.xz") == b"\x7fELF module"


def test_cpio_entries_are_aligned_newc():
    cpio = Cpio()
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    data = cpio.finish()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert b"init\0" in data and data.rstrip(b"\0").endswith(b"TRAILER!!!")
    # the archive's own reader agrees: busybox cpio lists both names
    bb = need_tool("busybox")
    listing = subprocess.run([bb, "cpio", "-t"], input=data, capture_output=True, check=True).stdout
    assert listing.split() == [b"init"]


def test_compressed_kernel_is_unpacked_for_a_pvh_boot(tmp_dir: Path):
    import gzip

    from labkit.lab.vm.host import Kernel, pvh_kernel

    # a made-up bzImage: setup code, then the gzip stream of an "ELF", then trailing bytes
    (tmp_dir / "vmlinuz-9.9").write_bytes(b"MZ setup code" + gzip.compress(b"\x7fELF kernel") + b"tail")
    (tmp_dir / "config-9.9").write_text("CONFIG_PVH=y\n")
    kernel = Kernel(tmp_dir / "vmlinuz-9.9", "9.9", None)
    unpacked = pvh_kernel(kernel, tmp_dir / "cache")
    assert unpacked is not None and unpacked.read_bytes() == b"\x7fELF kernel"
    (tmp_dir / "config-9.9").write_text("# CONFIG_PVH is not set\n")
    assert pvh_kernel(kernel, tmp_dir / "cache2") is None


def test_a_vm_whose_launcher_is_gone_is_a_stray():
    from labkit.lab.vm import kill_stray_vms, strays

    # a stand-in for an orphaned qemu: its -name claims a launcher that is not its parent,
    # in no PID namespace (under make test-fresh this pytest is PID 1 of its own)
    launcher = next(n for n in range(1, 100) if n not in strays._pids_of(os.getpid()))
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-name", f"{paths.VM_NAME_PREFIX}-{launcher}-abcdef"])
    try:
        # Popen returns once the child's exec has closed its descriptors, which the kernel
        # does before the new program's argv is in place: wait until /proc shows it
        deadline = time.monotonic() + 10
        while b"-name" not in Path(f"/proc/{fake.pid}/cmdline").read_bytes().split(b"\0"):
            assert time.monotonic() < deadline, "the stand-in never showed its -name"
            time.sleep(0.01)
        assert fake.pid in stray_vms()
        assert fake.pid in kill_stray_vms()
        assert fake.wait(timeout=10) == -signal.SIGKILL
    finally:
        fake.kill()
        fake.wait()


def test_a_vm_launched_in_another_pid_namespace_is_not_a_stray():
    """A launcher in a PID namespace of its own (a container, make test-fresh) names its VM
    with the pid it sees, which is not the one seen out here. While it lives, its VM is no
    stray: cleanup on the host once killed such a VM mid-test."""
    # in a new PID namespace: a shell (pid 1 there) starts a stand-in qemu named after it
    script = (f"{sys.executable} -c 'import time; time.sleep(60)' -name {paths.VM_NAME_PREFIX}-1-abcdef & "
              "wait")
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c", script])
    try:
        def stand_in() -> int | None:
            for p in psutil.process_iter(["cmdline"]):
                if f"{paths.VM_NAME_PREFIX}-1-abcdef" in (p.info["cmdline"] or []):
                    return p.pid
            return None

        deadline = time.monotonic() + 10
        while stand_in() is None:
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.05)
        assert stand_in() not in stray_vms()
    finally:
        outer.kill()
        outer.wait()


# -- does KVM run a guest here? ------------------------------------------------------------

def _x86_64_only():
    if platform.machine() != "x86_64":
        pytest.skip("labkit's probe guest is x86 code")


def test_the_probe_guest_runs_to_its_end_under_tcg():
    _x86_64_only()
    verdict = kvm.probe("tcg")
    assert verdict.works and verdict.proven, verdict.reason
    assert "long mode" in verdict.reason


def test_the_probe_fails_a_guest_that_does_not_finish_and_says_how_far_it_got():
    _x86_64_only()
    # exits with another value: the guest ran, but not the probe's last instruction
    verdict = kvm.probe("tcg", bios=kvm.probe_bios(exit_value=0x10))
    assert not verdict.works
    assert "exited with 33" in verdict.reason and "reached 64-bit long mode" in verdict.reason
    # halts at once: qemu never exits, the probe gives up after its timeout
    started = time.monotonic()
    verdict = kvm.probe("tcg", timeout=2, bios=b"\xf4" * 0x10000)
    assert time.monotonic() - started < 6
    assert not verdict.works
    assert "ran none of the probe's code" in verdict.reason and "within 2 s" in verdict.reason


def test_the_kvm_verdict_agrees_with_a_real_kvm_boot():
    from labkit.lab import doctor

    verdict = kvm.probe("kvm")
    assert kvm.kvm_verdict(refresh=True).works == verdict.works  # the reason holds a time: may differ
    assert doctor.check_kvm().status == ("pass" if verdict.works else "warn")
    if not verdict.works and not kvm.kvm_status()[0]:
        pytest.skip(f"no /dev/kvm to boot with: {verdict.reason}")
    # make the launcher try KVM whatever the probe said, then see what a real boot does
    kvm.remember(kvm.KvmVerdict(True, "the test says: try KVM"))
    try:
        with VM(memory="256M", accel="auto") as vm:
            booted_with = vm.accel
            assert vm.run("true").returncode == 0
        after = kvm.kvm_verdict()
    finally:
        kvm.kvm_verdict(refresh=True)
    if not verdict.works:  # the KVM boot failed, as the probe said: the launcher keeps that
        assert booted_with == "tcg", verdict.reason
    if booted_with == "tcg":
        # KVM did not boot this kernel. Where the probe said it would, the probe was fooled:
        # nested KVM can run the probe's few instructions, in every CPU mode, and still
        # fail a Linux guest. Either way the launcher fell back and remembers why, so that
        # doctor and the next VM say so.
        assert not after.works and "did not boot under KVM" in after.reason, after.reason
        if verdict.works:
            print(f"\nthe probe guest ran under KVM, a Linux guest did not: {after.reason}")


def test_explicit_kvm_fails_within_seconds_with_one_line_where_kvm_cannot_run_a_guest():
    verdict = kvm.kvm_verdict()
    if verdict.works:
        pytest.skip(f"KVM runs a guest here: {verdict.reason}")
    before = stray_vms()
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "labkit", "vm", "run", "--accel", "kvm", "--", "uname", "-r"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert time.monotonic() - started < 10, "explicit --accel kvm took its time instead of failing"
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("labkit: KVM cannot run a guest here: ") and "--accel tcg" in lines[0]
    assert stray_vms() == before
    with pytest.raises(Unsupported, match="KVM cannot run a guest here"):
        VM(accel="kvm").start()
