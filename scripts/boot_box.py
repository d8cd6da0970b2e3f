#!/usr/bin/env python3
"""Boot the course's base box with qemu directly, the way Vagrant would use it.

`vagrant up` hands a box to a hypervisor, logs in over ssh with Vagrant's insecure key,
shares the checkout at /vagrant and runs vagrant/provision.sh. This module does the same
with qemu and ssh alone, without Vagrant or libvirt in between: the box's own test, and a
fallback where libvirt cannot run.

- The box's disk stays untouched: the VM writes to a qcow2 overlay in a temporary folder
  (qemu-img's backing file), which goes when the VM stops.
- The kernel and initramfs come from the box (see build_box.py), booted with qemu's
  -kernel/-initrd and the box's command line. Software emulation (TCG) unless told
  otherwise: KVM cannot boot a guest on every host (labkit.lab.vm.kvm explains why).
- qemu's user-mode network: the guest reaches out through NAT, and the host reaches the
  guest's ssh and JupyterLab only through ports forwarded on 127.0.0.1.
- The checkout reaches the guest over 9p (virtio), mounted at /vagrant. What is shared is a
  copy (what git tracks), so a guest writing there never touches the host's checkout.
- qemu dies with its launcher (PR_SET_PDEATHSIG), and `stop()` powers the guest off, then
  kills qemu if it has not gone within a bounded time.

    with BoxVM(folder) as vm:          # boots; waits for ssh
        vm.ssh("systemctl is-system-running")

Only the standard library, like build_box.py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VAGRANT_KEYS = Path("/usr/share/rubygems-integration/all/gems")
NAME_PREFIX = "labkit-box"  # qemu's -name; not labkit-vm, whose strays `labkit cleanup` kills
BOOT_TIMEOUT_S = 300.0  # under software emulation the box boots in about a minute
STOP_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1


class BoxVMError(RuntimeError):
    """The VM did not boot or did not answer; the message ends with the console's tail."""


def insecure_private_key() -> Path:
    keys = sorted(VAGRANT_KEYS.glob("vagrant-[0-9]*/keys/vagrant"))
    if not keys:
        raise BoxVMError(f"no Vagrant insecure key under {VAGRANT_KEYS}/vagrant-*/keys/ (apt-get install vagrant)")
    return keys[-1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_checkout(dest: Path, repo: Path = REPO) -> None:
    """What a clone would have (git's tracked files and the untracked ones it does not
    ignore), copied to `dest`: the guest's /vagrant."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = repo / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _die_with_parent() -> None:
    """In qemu's child before exec: SIGKILL when the launcher dies (prctl(2))."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class BoxVM:
    """One VM from the box's folder (build_box.py's output), as a context manager."""

    def __init__(self, folder: Path, *, cpus: int = 2, memory_mib: int = 4096, share: bool = False,
                 forward: tuple[int, ...] = (), accel: str = "tcg") -> None:
        self.folder = Path(folder)
        self.cpus, self.memory_mib, self.accel = cpus, memory_mib, accel
        self.share = share
        self.ssh_port = free_port()
        self.ports = {guest: free_port() for guest in forward}  # guest port -> host port
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.boot_seconds = 0.0

    def __enter__(self) -> BoxVM:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- start ----------------------------------------------------------------

    def _command_line(self, cmdline: str) -> list[str]:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in [(22, self.ssh_port), *self.ports.items()])
        argv = ["qemu-system-x86_64", "-name", f"{NAME_PREFIX}-{os.getpid()}",
                "-machine", f"q35,accel={self.accel}", "-cpu", "max",
                "-smp", str(self.cpus), "-m", str(self.memory_mib),
                "-kernel", str(self.folder / "vmlinuz"), "-initrd", str(self.folder / "initrd.img"),
                "-append", cmdline,
                "-drive", f"file={self.dir / 'disk.qcow2'},if=virtio,format=qcow2",
                "-netdev", f"user,id=net0{fwd}", "-device", "virtio-net-pci,netdev=net0",
                "-display", "none", "-monitor", "none", "-serial", f"file:{self.dir / 'console.log'}"]
        if self.share:
            # mount_tag "vagrant": the guest mounts it with `mount -t 9p vagrant /vagrant`
            argv += ["-virtfs", f"local,path={self.dir / 'vagrant'},mount_tag=vagrant,"
                                "security_model=passthrough,id=vagrant"]
        return argv

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-", dir="/var/tmp"))
        key = self.dir / "key"
        shutil.copy(insecure_private_key(), key)
        key.chmod(0o600)  # ssh refuses a private key others can read
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.folder / "box.img"),
                        "-F", "qcow2", str(self.dir / "disk.qcow2")], check=True, timeout=60)
        if self.share:
            copy_checkout(self.dir / "vagrant")
        cmdline = self._box_cmdline()
        started = time.monotonic()
        self.proc = subprocess.Popen(self._command_line(cmdline), stdin=subprocess.DEVNULL,
                                     stdout=open(self.dir / "qemu.log", "wb"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        while True:
            if self.proc.poll() is not None:
                raise BoxVMError(f"qemu exited with {self.proc.returncode}: "
                                 f"{(self.dir / 'qemu.log').read_text()[-500:]}")
            if time.monotonic() - started > timeout:
                raise BoxVMError(f"no ssh login within {timeout:.0f} s; console:\n{self.console()[-1500:]}")
            if self.ssh("true", timeout=15, check=False).returncode == 0:
                break
            time.sleep(2)
        self.boot_seconds = time.monotonic() - started
        if self.share:
            self.ssh("sudo mkdir -p /vagrant && sudo mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "
                     "vagrant /vagrant")

    def _box_cmdline(self) -> str:
        """The kernel command line the box's Vagrantfile gives libvirt."""
        for line in (self.folder / "Vagrantfile").read_text().splitlines():
            if "cmd_line" in line:
                return line.split("=", 1)[1].strip().strip('"')
        raise BoxVMError(f"{self.folder}/Vagrantfile has no cmd_line")

    # --- use ------------------------------------------------------------------

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", "-q", "-i", str(self.dir / "key"), "-p", str(self.ssh_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "vagrant@127.0.0.1", command]

    def ssh(self, command: str, *, timeout: float = 120, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `command` in the guest as vagrant (sudo for root); its output as text."""
        try:
            r = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout,
                               input=input, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            if check:
                raise BoxVMError(f"ssh {command!r}: no answer within {timeout:.0f} s") from None
            return subprocess.CompletedProcess(command, 255, "", "timeout")
        if check and r.returncode != 0:
            raise BoxVMError(f"ssh {command!r} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r

    def provision(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        """vagrant/provision.sh the way Vagrant's shell provisioner runs it: uploaded to
        /tmp/vagrant-shell, then run with sudo, its env set, the arguments after it."""
        script = (REPO / "vagrant" / "provision.sh").read_text()
        self.ssh("cat > /tmp/vagrant-shell && chmod +x /tmp/vagrant-shell", input=script)
        return self.ssh("sudo -E env LABKIT_REPO=/vagrant /tmp/vagrant-shell " + " ".join(args),
                        timeout=timeout)

    def console(self) -> str:
        try:
            return (self.dir / "console.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # --- stop -----------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Power the guest off; kill qemu if it is still there after `timeout`."""
        if self.proc is not None and self.proc.poll() is None:
            self.ssh("sudo systemctl poweroff", timeout=15, check=False)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


if __name__ == "__main__":  # boot, say how long it took, stop
    import sys

    with BoxVM(Path(sys.argv[1])) as vm:
        print(f"booted in {vm.boot_seconds:.1f} s:", vm.ssh("cat /proc/1/comm; uname -r").stdout.split())
