"""The course's base box, built here from Debian's packages (scripts/build_box.py), and
booted with qemu directly (scripts/boot_box.py): systemd as PID 1, cgroup v2, Vagrant's
insecure key; and, where libvirt cannot run, the stand-in for `vagrant up`: the checkout
over 9p and provision.sh as Vagrant runs it.

Booting a guest under software emulation takes minutes, so these run only under
`make test-vm` (LABKIT_TEST_VM=1); the normal suite skips them. Each test leaves nothing
behind: no qemu process, no overlay disk, no mount, no loop device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import need_tool

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import boot_box  # noqa: E402
import build_box  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("LABKIT_TEST_VM") != "1",
                                reason="boots a VM under software emulation (minutes): make test-vm")


def qemus_of_ours() -> list[int]:
    """PIDs of qemu processes started by boot_box (their -name)."""
    out = subprocess.run(["pgrep", "-f", f"-name {boot_box.NAME_PREFIX}-"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def assert_nothing_left() -> None:
    assert qemus_of_ours() == []
    assert list(Path("/var/tmp").glob(f"{boot_box.NAME_PREFIX}-*")) == []
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if "labkit-box" in line] == []
    loops = subprocess.run(["losetup", "-nO", "BACK-FILE"], capture_output=True, text=True).stdout
    assert "labkit" not in loops


@pytest.fixture(scope="module")
def box() -> Path:
    need_tool("debootstrap")
    need_tool("qemu-img")
    need_tool("qemu-system-x86_64")
    return build_box.build()


def test_box_is_a_libvirt_box_cached_by_its_recipe(box):
    meta = json.loads((box / "metadata.json").read_text())
    assert meta == {"provider": "libvirt", "format": "qcow2", "virtual_size": build_box.DISK_GIB}
    with tarfile.open(box / "labkit.box") as tar:
        assert sorted(tar.getnames()) == ["Vagrantfile", "box.img", "initrd.img", "metadata.json", "vmlinuz"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(box / "box.img")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == build_box.DISK_GIB << 30
    # the same recipe: the same folder, found at once
    started = time.monotonic()
    assert build_box.build() == box
    assert time.monotonic() - started < 2
    # the folder's name is the recipe's hash: another package list is another box
    files = build_box.config_files(build_box.insecure_key())
    saved = list(build_box.RECIPE["packages"])
    try:
        build_box.RECIPE["packages"].append("vim")
        assert build_box.recipe_hash(files) not in box.name
    finally:
        build_box.RECIPE["packages"][:] = saved
    assert build_box.recipe_hash(files) in box.name


def test_box_boots_with_systemd_and_vagrants_insecure_key(box):
    with boot_box.BoxVM(box, cpus=2, memory_mib=2048) as vm:
        print(f"\nbox booted to ssh in {vm.boot_seconds:.1f} s (qemu TCG, 2 vCPUs)")
        facts = vm.ssh("cat /proc/1/comm; stat -fc %T /sys/fs/cgroup; python3 -c 'import sys; "
                       "print(sys.version_info[:2])'; sudo -n id -u; . /etc/os-release; echo $VERSION_ID"
                       ).stdout.split()
        assert facts == ["systemd", "cgroup2fs", "(3,", "13)", "0", "13"], facts
        state = vm.ssh("systemctl is-system-running --wait", check=False).stdout.strip()
        assert state == "running", vm.ssh("systemctl --failed", check=False).stdout
        # only the insecure key logs in: no password, no other key
        other = vm.dir / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        argv = vm.ssh_argv("true")
        argv[argv.index(str(vm.dir / "key"))] = str(other)
        assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 255
    assert_nothing_left()


@pytest.mark.skipif(os.path.exists("/usr/sbin/libvirtd") and os.environ.get("LABKIT_TEST_VM_DIRECT") != "1",
                    reason="libvirt runs here: test_vm_vagrant.py does this through Vagrant "
                           "(LABKIT_TEST_VM_DIRECT=1 runs this fallback too)")
def test_checkout_over_9p_and_provision_sh_runs_as_vagrant_runs_it():
    """The qemu-direct stand-in for `vagrant up` where libvirt cannot run: the ready box,
    /vagrant over 9p, provision.sh --service uploaded and run with sudo as Vagrant runs it."""
    box = build_box.build(ready=True)
    with boot_box.BoxVM(box, cpus=2, memory_mib=4096, share=True, forward=(8888,)) as vm:
        assert vm.ssh("test -f /vagrant/pyproject.toml && findmnt -no FSTYPE /vagrant").stdout.strip() == "9p"
        started = time.monotonic()
        out = vm.provision("--service").stdout
        print(f"\nprovision.sh --service in the box: {time.monotonic() - started:.0f} s")
        assert "untried" not in out  # Debian 13 is supported
        for unit in ("labkitd", "labkit-lab"):
            assert vm.ssh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active", \
                vm.ssh(f"sudo journalctl -u {unit} --no-pager | tail -30", check=False).stdout
    assert_nothing_left()
