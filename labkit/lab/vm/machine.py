"""Start labkit's small VM with qemu, run commands in it, and always stop it.

The VM is a qemu process (qemu-system-x86_64(1)) that boots the host's kernel with
labkit's busybox initramfs. The host talks to the guest's agent over a virtio-serial port
(``-device virtserialport``) wired to a Unix socket that labkit listens on; the guest's
console goes to a log file, shown when a boot fails. No network device: ``-nic none``.

A qemu process must never outlive labkit: it gets PR_SET_PDEATHSIG (prctl(2)), so the kernel
kills it when its parent dies, even by SIGKILL; ``shutdown()`` runs on ``with``-exit, on
errors and at interpreter exit; and its ``-name`` starts with ``labkit-vm`` so ``labkit
cleanup`` can find a stray one (``labkit.lab.vm.strays``).

Layer: lab. Used by ``labkit vm`` (labkit.cli.vm), notebook 01 and the cgroup v2 tests.
"""

from __future__ import annotations

import atexit
import base64
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from labkit import paths
from labkit.errors import InvalidValue, LabkitError, StateError, Unsupported, require_root
from labkit.kernel import syscalls
from labkit.lab.vm import guest, host, kvm
from labkit.lab.vm.initramfs import initramfs

KVM_TRIAL_SECONDS = 10.0  # a KVM guest is ready in ~1 s; past this, KVM is broken here after all
ACCEL_ENV = "LABKIT_VM_ACCEL"  # set to kvm or tcg to skip the automatic choice
_live: weakref.WeakSet[VM] = weakref.WeakSet()


@dataclass(frozen=True)
class VMResult:
    """What ``VM.run`` returns: like subprocess.run(..., stderr=STDOUT)."""

    returncode: int
    output: str  # stdout and stderr together, as the guest wrote them
    seconds: float  # wall time on the host, sending the command to its exit code


class VMError(LabkitError):
    """The VM failed to boot, died, or a command outlived its timeout.

    ``console`` holds the tail of the guest's console, where the reason usually is.
    """

    def __init__(self, message: str, console: str = "") -> None:
        tail = "\n".join(console.strip().splitlines()[-15:])
        super().__init__(message + (f"; guest console ends with:\n{tail}" if tail else ""))
        self.console = console


def parse_memory(value: str | int) -> int:
    """'512M', '2g', '1024m' or a number of MiB -> MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([mMgG]?)(?:i?[bB])?\s*", str(value))
    if not m:
        raise InvalidValue("VM memory", value, "a size in MiB or GiB, e.g. 512M or 2G")
    mib = int(m[1]) * (1024 if m[2].lower() == "g" else 1)
    if mib < 128:
        raise InvalidValue("VM memory", value, "at least 128M (the kernel and busybox need it)")
    return mib


class VM:
    """A small qemu VM running the host's kernel; ``with VM() as vm: vm.run("true")``.

    memory: '512M'-style size. cpus: virtual CPUs. share_host_root: the host's / read-only
    over 9p under a tmpfs overlay, so host programs (python, the venv, labkit) run inside.
    cgroup: 'v2' (only the unified hierarchy, every controller) or 'v1'. accel: 'auto'
    (KVM if ``kvm.kvm_verdict()`` says a guest runs, else TCG), 'kvm' (Unsupported at once
    where the verdict says no) or 'tcg'.
    """

    def __init__(self, memory: str | int = "512M", cpus: int = 1, *, share_host_root: bool = False,
                 cgroup: str = "v2", accel: str = "auto", boot_timeout: float = 120.0) -> None:
        self.memory_mib = parse_memory(memory)
        if not isinstance(cpus, int) or not 1 <= cpus <= 64:
            raise InvalidValue("VM cpu count", cpus, "a whole number from 1 to 64")
        if cgroup not in ("v1", "v2"):
            raise InvalidValue("VM cgroup mode", cgroup, "v1 or v2")
        accel = os.environ.get(ACCEL_ENV, accel) if accel == "auto" else accel
        if accel not in ("auto", "kvm", "tcg"):
            raise InvalidValue("VM accelerator", accel, "auto, kvm or tcg")
        if share_host_root:
            # the guest's root user reads every host file through qemu: qemu must be root too
            require_root("sharing the host's / with the VM over 9p")
        self.cpus, self.cgroup, self.share_host_root = cpus, cgroup, share_host_root
        self.wanted_accel, self.boot_timeout = accel, boot_timeout
        # the launcher's PID in the name tells a stray (its launcher gone) from a VM in use
        self.name = f"{paths.VM_NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.accel = ""  # 'kvm' or 'tcg' once booted
        self.boot_seconds = 0.0  # wall time from starting qemu to the agent's ready line
        self.guest_boot_seconds = 0.0  # the guest's own uptime at that moment
        self.proc: subprocess.Popen | None = None
        self._kernel_file: Path | None = None  # what qemu boots: an unpacked vmlinux or the bzImage
        self.dir: Path | None = None
        self._conn: socket.socket | None = None
        self._buffer = b""

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> Self:
        """Boot and wait until the guest's agent says it is ready."""
        if self.proc is not None:
            raise StateError(f"VM {self.name} is already started")
        kernel = host.find_kernel()
        qemu = host.qemu_binary()
        choice = self.wanted_accel
        if choice != "tcg":  # one verdict for doctor, notebooks and here: did a KVM guest run?
            verdict = kvm.kvm_verdict()
            if choice == "kvm" and not verdict.works:
                raise Unsupported(f"KVM cannot run a guest here: {verdict.reason}",
                                  hint="use --accel tcg (software emulation) or --accel auto")
            choice = "kvm" if verdict.works else "tcg"
        image = initramfs(kernel)
        try:
            self._kernel_file = host.pvh_kernel(kernel, image.parent) or kernel.image
        except OSError:  # no room or no write access for the unpacked copy: boot the bzImage
            self._kernel_file = kernel.image
        _live.add(self)
        try:
            try:
                self._boot(qemu, image, choice, KVM_TRIAL_SECONDS if self.wanted_accel == "auto"
                           and choice == "kvm" else self.boot_timeout)
            except VMError as e:
                if self.wanted_accel != "auto" or choice != "kvm":
                    raise
                # the probe guest ran, but this kernel does not boot under KVM: say so from now on
                kvm.remember(kvm.KvmVerdict(False, f"a probe guest ran, but the VM did not boot "
                                                   f"under KVM: {str(e).splitlines()[0][:160]}"))
                if self.proc is not None:
                    self.proc.kill()
                self._stop_process()
                choice = "tcg"
                self._boot(qemu, image, choice, self.boot_timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _command_line(self, qemu: str, image: Path, accel: str, socket_path: str) -> list[str]:
        arch = host.host_arch()
        append = [f"console={arch.console}", "quiet", "panic=-1", f"labkit_cgroup={self.cgroup}"]
        if self.cgroup == "v2":
            append.append("cgroup_no_v1=all")
        if self.share_host_root:
            append.append("labkit_hostroot=1")
        cmd = [qemu, "-name", f"{self.name},process={self.name}", "-machine", arch.machine,
               "-accel", accel, "-cpu", arch.cpu(accel),
               "-m", f"{self.memory_mib}M", "-smp", str(self.cpus),
               "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none", "-no-reboot",
               "-kernel", str(self._kernel_file), "-initrd", str(image), "-append", " ".join(append),
               "-serial", f"file:{self.dir / 'console.log'}",
               "-chardev", f"socket,id=ctl,path={socket_path}",
               "-device", "virtio-serial-pci", "-device", f"virtserialport,chardev=ctl,name={guest.PORT_NAME}",
               "-device", "virtio-rng-pci"]
        if self.share_host_root:
            cmd += ["-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                    "-device", f"virtio-9p-pci,fsdev=hostroot,mount_tag={guest.HOST_ROOT_TAG}"]
        return cmd

    def _boot(self, qemu: str, image: Path, accel: str, timeout: float) -> None:
        self.dir = paths.run_root() / "vm" / self.name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except PermissionError:  # not root: /run/labkit is not ours, a private folder is
            self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        socket_path = str(self.dir / "ctl.sock")
        if len(socket_path) > 100:  # sun_path holds 108 bytes
            socket_path = tempfile.mktemp(prefix=f"{self.name}-", suffix=".sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(socket_path)
            listener.listen(1)
            parent = os.getpid()
            started = time.monotonic()
            with open(self.dir / "qemu.log", "wb") as log:
                self.proc = subprocess.Popen(
                    self._command_line(qemu, image, accel, socket_path),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    # runs between fork and exec: one prctl, no locks taken, so safe with threads
                    preexec_fn=lambda: _die_with_parent(parent))  # noqa: PLW1509
            # qemu connects to us while it starts; then the guest boots
            listener.settimeout(0.2)
            while self._conn is None:
                self._check_alive(started, timeout, "connect its control channel")
                try:
                    self._conn, _ = listener.accept()
                except TimeoutError:
                    pass
        finally:
            listener.close()
            Path(socket_path).unlink(missing_ok=True)  # connected: the name is no longer needed
        self._conn.settimeout(0.2)
        line = self._read_until(guest.READY, b"\n", started, timeout, "boot")
        self.boot_seconds = time.monotonic() - started
        self.guest_boot_seconds = float(line or 0)
        self.accel = accel

    def _check_alive(self, started: float, timeout: float, what: str) -> None:
        if self.proc.poll() is not None:
            log = (self.dir / "qemu.log").read_text(errors="replace").strip()
            rc = self.proc.returncode
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
            raise VMError(f"qemu {how} before the VM could {what}"
                          + (f": {log.splitlines()[-1]}" if log else ""), self.console())
        if time.monotonic() - started > timeout:
            raise VMError(f"the VM did not {what} within {timeout:.0f} s", self.console())

    def _read_until(self, start: bytes, end: bytes, started: float, timeout: float, what: str,
                    on_output: Callable[[bytes], None] | None = None) -> bytes:
        """Read until ``start`` ... ``end``; bytes before ``start`` go to ``on_output``.

        Returns what lies between the two markers. Bytes that might be the beginning of
        ``start`` are held back, so a marker split over two reads is still found.
        """
        while True:
            i = self._buffer.find(start)
            if i >= 0:
                j = self._buffer.find(end, i + len(start))
                if j >= 0:
                    if on_output and i:
                        on_output(self._buffer[:i])
                    value = self._buffer[i + len(start) : j]
                    self._buffer = self._buffer[j + len(end) :]
                    return value
            elif on_output and len(self._buffer) > len(start):
                on_output(self._buffer[: -len(start)])
                self._buffer = self._buffer[-len(start) :]
            self._check_alive(started, timeout, what)
            try:
                chunk = self._conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                try:  # usually qemu is exiting: its own message says more than ours
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                self._check_alive(started, timeout, what)
                raise VMError(f"the VM closed its control channel during: {what}", self.console())
            self._buffer += chunk

    def run(self, command: str | Sequence[str], *, timeout: float = 60.0, cwd: str | None = None,
            env: Mapping[str, str] | None = None,
            on_output: Callable[[bytes], None] | None = None) -> VMResult:
        """Run ``command`` with /bin/sh in the guest; its exit code and output come back.

        A list is quoted with shlex.join. ``on_output`` receives the output as it arrives.
        The guest sets TMPDIR=/run/tmp and LABKIT_ROOT=/run/labkit (a tmpfs) unless ``env``
        says otherwise. Raises VMError (and stops the VM) if the command outlives ``timeout``.
        """
        if self._conn is None:
            raise StateError(f"VM {self.name} is not running; start it first (with VM(...) as vm)")
        text = command if isinstance(command, str) else shlex.join(command)
        lines = []
        if cwd:
            lines.append(f"cd {shlex.quote(cwd)} || exit 127")
        env = dict(env or {})
        for key, value in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise InvalidValue("environment variable name", key, "letters, digits and _")
            lines.append(f"export {key}={shlex.quote(value)}")
        script = "\n".join([*lines, text, ""]).encode()
        request_id = secrets.token_hex(8)
        started = time.monotonic()
        self._conn.sendall(f"{request_id} {base64.b64encode(script).decode()}\n".encode())
        output = bytearray()

        def collect(chunk: bytes) -> None:
            output.extend(chunk)
            if on_output:
                on_output(chunk)

        marker = guest.DONE + request_id.encode() + b" "
        try:
            code = self._read_until(marker, b"\n", started, timeout, f"finish {text[:60]!r}", collect)
        except VMError:
            self.shutdown()  # the agent is stuck in the old command: this VM is spent
            raise
        return VMResult(int(code), output.decode(errors="replace"), time.monotonic() - started)

    def memory_bytes(self) -> int:
        """Resident memory of the qemu process (VmRSS in /proc/PID/status)."""
        if self.proc is None or self.proc.poll() is not None:
            raise StateError(f"VM {self.name} is not running")
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def console(self) -> str:
        """The guest's console (kernel messages, init's errors) so far."""
        try:
            return (self.dir / "console.log").read_text(errors="replace") if self.dir else ""
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _stop_process(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the agent reads EOF, syncs and powers off
            self._conn = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._buffer = b""

    def shutdown(self) -> None:
        """Stop the VM (power off, or kill after 3 s) and remove its files. Idempotent."""
        try:
            self._stop_process()
        finally:
            if self.proc is not None:  # interrupted while waiting: make sure
                self.proc.kill()
                self.proc = None
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
            _live.discard(self)


@dataclass(frozen=True)
class BootFigures:
    """What notebook 01 plots for a VM: how long to boot, how much memory it holds."""

    boot_seconds: float  # host wall time, qemu start -> guest ready
    guest_boot_seconds: float  # guest uptime at ready
    run_seconds: float  # running `true` in the booted guest
    memory_bytes: int  # qemu's resident memory after the boot
    accel: str  # kvm or tcg


def quick_boot(memory: str = "256M", accel: str = "auto") -> BootFigures:
    """Boot a busybox-only VM, run `true`, measure, power off."""
    with VM(memory=memory, cpus=1, accel=accel) as vm:
        result = vm.run("true", timeout=30)
        return BootFigures(vm.boot_seconds, vm.guest_boot_seconds, result.seconds,
                           vm.memory_bytes(), vm.accel)


def _die_with_parent(parent: int) -> None:
    """In the qemu child, before exec: get SIGKILL when the parent dies.

    The kernel sends it when the *thread* that forked exits, so start a VM from a thread
    that lives as long as the VM (the main thread, in the CLI and the tests).
    """
    syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would kill us
        os._exit(1)


@atexit.register
def _shutdown_all() -> None:
    for vm in list(_live):
        vm.shutdown()
