"""labkit's small VM: qemu, the host's kernel, a busybox initramfs, and maybe the host's /.

It serves two purposes. Notebook 01 measures it against a container (boot time, memory);
the tests boot it with only cgroup v2 mounted, to test labkit's v2 code on a v1 host.

    from labkit.lab.vm import VM
    with VM(memory="1G", cpus=2, share_host_root=True, cgroup="v2") as vm:
        r = vm.run("python3 -c 'print(1)'", timeout=60)   # VMResult(returncode, output, seconds)
        vm.boot_seconds, vm.guest_boot_seconds, vm.accel, vm.memory_bytes()

Modules: ``host`` (qemu, kernel image, modules), ``kvm`` (does a KVM guest run here?), ``guest`` (the guest's init and agent
scripts), ``initramfs`` (the cpio archive), ``machine`` (the qemu process and the channel),
``strays`` (VMs left without their launcher).

Layer: lab. Used by ``labkit vm`` (labkit.cli.vm), notebooks and tests.
"""

from labkit.lab.vm.machine import VM, BootFigures, VMError, VMResult, quick_boot
from labkit.lab.vm.strays import kill_stray_vms, stray_vms

__all__ = ["VM", "BootFigures", "VMError", "VMResult", "kill_stray_vms", "quick_boot", "stray_vms"]
