"""Does KVM really run a guest on this host? One probe, one verdict.

``/dev/kvm`` can exist and answer its ioctls (Documentation/virt/kvm/api.rst) and still fail
to run a guest: nested virtualisation often does. Seen on a host that is itself a VM: qemu
with ``-cpu host`` aborts while it sets up the vCPU ("failed to set MSR 0x10a"), and with
qemu's default CPU model a real-mode guest runs but a Linux kernel hangs. A qemu that is
merely started (``-S``, stopped before its first instruction) proves nothing.

So labkit runs a guest. :func:`probe_bios` writes a 64 KiB firmware image whose code
switches the vCPU the way a kernel does, from 16-bit real mode to 32-bit protected mode to
64-bit long mode with paging, and then writes a byte to qemu's ``isa-debug-exit`` port:
qemu exits with status ``(byte << 1) | 1``. That status comes back only if the vCPU ran
the guest's code. On the way it writes R, P, L to qemu's debug console, so a guest that
gets stuck says how far it got. :func:`probe` runs it with the accelerator, CPU model and
machine type the launcher uses (``tcg`` too: a test proves the probe executes code).

:func:`kvm_verdict` is the one answer ``labkit doctor``, the launcher (``machine.py``) and
notebook 01 use. It is kept in the state root, keyed on the host kernel release and the
qemu binary, so a host pays for one probe (a tenth of a second) until either changes.

x86_64 only: on aarch64 labkit has no probe guest, and the verdict says that the ioctls
answer, marked not proven.

Layer: lab. Used by ``labkit.lab.vm.machine``, ``labkit.lab.doctor`` and notebook 01.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import LabkitError
from labkit.lab.vm import host

KVM_DEVICE = Path("/dev/kvm")
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00); the stable API answers 12
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01); fails where KVM is switched off
KVM_API_VERSION = 12

PROBE_SECONDS = 5.0  # the probe guest exits within 0.1 s; past this it is stuck
EXIT_PORT = 0xF4  # qemu's isa-debug-exit: writing v here ends qemu with status (v << 1) | 1
DEBUG_PORT = 0xE9  # qemu's debugcon: bytes written here come out on qemu's stdout
EXIT_VALUE = 0x2A
EXIT_STATUS = (EXIT_VALUE << 1) | 1  # 85: the one status that says the guest ran to its end
STAGES = {"R": "16-bit real mode", "P": "32-bit protected mode", "L": "64-bit long mode"}


@dataclass(frozen=True)
class KvmVerdict:
    """Whether the small VM can use KVM here, and why, in one line."""

    works: bool
    reason: str
    proven: bool = True  # False where no guest was run (aarch64: only the ioctls were asked)


def kvm_status(device: Path = KVM_DEVICE) -> tuple[bool, str]:
    """(worth probing, why): opens /dev/kvm and asks it for its API version and a VM.

    The cheap first step of :func:`probe`; True does not mean that a guest can run.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {device}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return False, f"{device} speaks KVM API {version}, not {KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
        return True, f"{device} answers KVM_GET_API_VERSION and KVM_CREATE_VM"
    except OSError as e:
        return False, f"{device} refuses KVM ioctls: {e.strerror}"
    finally:
        os.close(fd)


# -- the probe guest ------------------------------------------------------------------------
# The last 64 KiB of the firmware also appear at 0xF0000, just below 1 MiB. The CPU starts at
# F000:FFF0 (the reset vector), 16 bytes before the end. Offsets in the image:
BIOS_SIZE = 0x10000
BIOS_BASE = 0xF0000
GDT, GDTR, REAL, PROTECTED, LONG, RESET = 0x000, 0x020, 0x100, 0x200, 0x300, 0xFFF0
PAGE_TABLES = 0x1000  # in guest RAM: PML4 at 0x1000, PDPT at 0x2000, page directory at 0x3000


def _u16(n: int) -> bytes:
    return struct.pack("<H", n)


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def probe_bios(exit_value: int = EXIT_VALUE) -> bytes:
    """The probe guest: a firmware image whose code ends by making qemu exit with a status.

    Machine code, each line with its instruction in Intel syntax.
    """
    gdt = struct.pack("<4Q",
                      0,                    # the null descriptor
                      0x00CF9B000000FFFF,   # 0x08: 32-bit code, base 0, 4 GiB
                      0x00CF93000000FFFF,   # 0x10: data, base 0, 4 GiB
                      0x00AF9B000000FFFF)   # 0x18: 64-bit code
    # the descriptors have their 'accessed' bit set already: the CPU need not write to ROM
    gdtr = _u16(len(gdt) - 1) + _u32(BIOS_BASE + GDT)
    real = b"".join([
        b"\xb0R\xe6" + bytes([DEBUG_PORT]),         # mov al, 'R'; out DEBUG_PORT, al
        b"\x8c\xc8\x8e\xd8",                        # mov ax, cs; mov ds, ax (ds = F000)
        b"\x66\x0f\x01\x16" + _u16(GDTR),           # lgdt [GDTR]: where the descriptors are
        b"\x0f\x20\xc0\x0c\x01\x0f\x22\xc0",        # mov eax, cr0; or al, 1; mov cr0, eax (PE)
        b"\x66\xea" + _u32(BIOS_BASE + PROTECTED) + _u16(0x08),  # jmp 0x08:PROTECTED
    ])
    protected = b"".join([
        b"\xb8" + _u32(0x10),                       # mov eax, 0x10 (the data descriptor)
        b"\x8e\xd8\x8e\xc0\x8e\xd0",                # mov ds, eax; mov es, eax; mov ss, eax
        b"\xb0P\xe6" + bytes([DEBUG_PORT]),         # mov al, 'P'; out DEBUG_PORT, al
        b"\xbf" + _u32(PAGE_TABLES),                # mov edi, PAGE_TABLES
        b"\x31\xc0\xb9" + _u32(3 * 4096 // 4),      # xor eax, eax; mov ecx, 3 pages in dwords
        b"\xf3\xab",                                # rep stosd: zero the three tables
        b"\xc7\x05" + _u32(0x1000) + _u32(0x2003),  # PML4[0] = PDPT | present | writable
        b"\xc7\x05" + _u32(0x2000) + _u32(0x3003),  # PDPT[0] = page directory | ...
        b"\xc7\x05" + _u32(0x3000) + _u32(0x83),    # PD[0] = the first 2 MiB | present | writable | large
        b"\xb8" + _u32(PAGE_TABLES) + b"\x0f\x22\xd8",  # mov eax, PAGE_TABLES; mov cr3, eax
        b"\x0f\x20\xe0\x0c\x20\x0f\x22\xe0",        # mov eax, cr4; or al, 0x20; mov cr4, eax (PAE)
        b"\xb9" + _u32(0xC0000080),                 # mov ecx, IA32_EFER
        b"\x0f\x32\x80\xcc\x01\x0f\x30",            # rdmsr; or ah, 1; wrmsr (EFER.LME)
        b"\x0f\x20\xc0\x0d" + _u32(0x80000000) + b"\x0f\x22\xc0",  # cr0 |= PG: long mode is on
        b"\xea" + _u32(BIOS_BASE + LONG) + _u16(0x18),  # jmp 0x18:LONG (64-bit code)
    ])
    long = b"".join([
        b"\xb0L\xe6" + bytes([DEBUG_PORT]),         # mov al, 'L'; out DEBUG_PORT, al
        b"\xb0" + bytes([exit_value]) + b"\xe6" + bytes([EXIT_PORT]),  # mov al, value; out EXIT_PORT, al
        b"\xf4",                                    # hlt (qemu has exited by now)
    ])
    reset = b"\xea" + _u16(REAL) + _u16(0xF000)     # jmp F000:REAL, from the reset vector
    image = bytearray(b"\xf4" * BIOS_SIZE)          # hlt everywhere else
    for offset, piece in [(GDT, gdt), (GDTR, gdtr), (REAL, real), (PROTECTED, protected),
                          (LONG, long), (RESET, reset)]:
        image[offset : offset + len(piece)] = piece
    return bytes(image)


def _how_far(output: bytes) -> str:
    reached = [STAGES[c] for c in output.decode(errors="replace") if c in STAGES]
    return f"reached {reached[-1]}" if reached else "ran none of the probe's code"


def probe(accel: str = "kvm", timeout: float = PROBE_SECONDS, bios: bytes | None = None) -> KvmVerdict:
    """Run the probe guest under ``accel`` ('kvm' or 'tcg'); works only if it ran to its end.

    Uses the launcher's ``-machine`` and ``-cpu`` for that accelerator: a different CPU model
    gives a different answer. ``bios`` replaces the guest (the tests give it a broken one).
    """
    if platform.machine() != "x86_64":  # no probe guest for this architecture: the ioctls only
        ok, why = kvm_status() if accel == "kvm" else (False, "")
        if ok:
            why += f"; not proven: labkit has no probe guest for {platform.machine()}"
        return KvmVerdict(ok, why or f"labkit has no probe guest for {platform.machine()}", proven=False)
    if accel == "kvm":
        ok, why = kvm_status()
        if not ok:
            return KvmVerdict(False, why)
    try:
        qemu, arch = host.qemu_binary(), host.host_arch()
    except LabkitError as e:
        return KvmVerdict(False, str(e))
    cpu = arch.cpu(accel)
    with tempfile.TemporaryDirectory(prefix="labkit-kvm-probe-") as tmp:
        image = Path(tmp) / "probe.bin"
        image.write_bytes(probe_bios() if bios is None else bios)
        argv = [qemu, "-name", f"{paths.VM_NAME_PREFIX}-{os.getpid()}-probe",
                "-machine", arch.machine, "-accel", accel, "-cpu", cpu, "-m", "16",
                "-bios", str(image), "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=0x04",
                "-debugcon", "stdio", "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "none", "-monitor", "none"]
        started = time.monotonic()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:  # run() has killed qemu; e.stdout is what it wrote
            return KvmVerdict(False, f"a guest under qemu -accel {accel} -cpu {cpu} {_how_far(e.stdout or b'')}"
                              f" and then did not finish within {timeout:g} s")
    seconds = time.monotonic() - started
    if r.returncode == EXIT_STATUS:
        return KvmVerdict(True, f"a guest ran under qemu -accel {accel} -cpu {cpu}: real, protected and "
                          f"long mode, then it made qemu exit ({seconds:.2f} s)")
    lines = r.stderr.decode(errors="replace").strip().splitlines()
    said = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
    rc = r.returncode
    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
    said = said.removeprefix(f"{os.path.basename(qemu)}: ").removeprefix("error: ")[:120]
    return KvmVerdict(False, f"qemu -accel {accel} -cpu {cpu} {how}; its guest {_how_far(r.stdout)}"
                      + (f" ({said})" if said else ""))


# -- the verdict, kept per host -------------------------------------------------------------

def _verdict_file() -> Path:
    return paths.lib_root() / "vm" / "kvm.json"


def _verdict_key() -> str:
    # a new host kernel or a new qemu may change whether KVM works
    qemu = host.qemu_binary()
    return f"{os.uname().release} {qemu} {os.stat(qemu).st_mtime_ns}"


def kvm_verdict(refresh: bool = False) -> KvmVerdict:
    """Can the small VM use KVM here? Probed once per host (kernel and qemu), then remembered."""
    try:
        key = _verdict_key()
    except LabkitError as e:  # no qemu: nothing to remember either
        return KvmVerdict(False, str(e))
    if not refresh:
        try:
            saved = json.loads(_verdict_file().read_text())
            if saved.pop("key") == key:
                return KvmVerdict(**saved)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or from another host or labkit: probe
    verdict = probe("kvm")
    remember(verdict, key)
    return verdict


def remember(verdict: KvmVerdict, key: str | None = None) -> None:
    """Keep ``verdict`` for this host (the launcher calls it when a KVM boot fails after all)."""
    try:
        _verdict_file().parent.mkdir(parents=True, exist_ok=True)
        tmp = _verdict_file().with_name(f".kvm.json.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key or _verdict_key(), **asdict(verdict)}) + "\n")
        os.replace(tmp, _verdict_file())  # a concurrent reader sees the old file or the new one
    except (OSError, LabkitError):
        pass  # not writable, or no qemu: the next call probes again
