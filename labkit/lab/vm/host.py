"""What the host lends the small VM: qemu, a kernel image and its modules.

A VM needs a kernel to boot. labkit does not ship one: it boots the host's own
``/boot/vmlinuz-*`` (the newest that has its modules in ``/lib/modules/<version>``), so the
guest runs the very kernel the containers run on, and the comparison VM vs container is fair.

The kernel loads drivers (virtio, 9p, overlay, loop) from modules; ``modules.dep`` (see
depmod(8) and modules.dep(5)) lists, for each module, every module it needs. This file
resolves a wish list into load order and reads each file, decompressing ``.ko.xz``,
``.ko.zst`` and ``.ko.gz`` on the host so the guest's busybox ``insmod`` needs no decompressor.

Whether KVM really runs a guest here is a question of its own: ``kvm.py``.

Layer: lab. Used by ``labkit.lab.vm.initramfs``, ``labkit.lab.vm.kvm`` and ``labkit.lab.vm.machine``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import platform
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import NeedsRoot, NotFound, Unsupported

BOOT = Path("/boot")
MODULES = Path("/lib/modules")


@dataclass(frozen=True)
class Arch:
    """How qemu runs a guest of the host's architecture."""

    qemu: str  # the emulator binary
    machine: str  # -machine
    console: str  # the guest's serial console device, for console=
    cpu_tcg: str  # -cpu under software emulation

    def cpu(self, accel: str) -> str:
        """-cpu for ``accel``: under KVM the guest sees the host's own CPU model."""
        return "host" if accel == "kvm" else self.cpu_tcg


ARCHES = {
    "x86_64": Arch("qemu-system-x86_64", "pc", "ttyS0", "max"),
    "aarch64": Arch("qemu-system-aarch64", "virt", "ttyAMA0", "max"),
}


def host_arch() -> Arch:
    machine = platform.machine()
    if machine not in ARCHES:
        raise Unsupported(f"labkit's VM supports x86_64 and aarch64 hosts, not {machine}")
    return ARCHES[machine]


def qemu_binary() -> str:
    arch = host_arch()
    path = shutil.which(arch.qemu)
    if not path:
        raise NotFound(
            f"{arch.qemu} is not installed",
            hint="install qemu-system-x86 (or qemu-system-arm): vagrant/provision.sh does",
        )
    return path


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image of the host and the folder of its modules."""

    image: Path
    version: str  # the part after 'vmlinuz-': also the name of its /lib/modules folder
    modules: Path | None  # None when the version has no module folder (all built in)


def _version_key(version: str) -> tuple:
    # "6.1.0-56-amd64" > "6.1.0-9-amd64": compare runs of digits as numbers
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-+~]", version))


def find_kernel(boot: Path = BOOT, modules: Path = MODULES) -> Kernel:
    """The newest ``vmlinuz-*`` in ``boot``, preferring one whose modules are installed."""
    images = [p for p in boot.glob("vmlinuz-*") if p.is_file()]
    if not images:
        raise NotFound(
            f"no kernel image (vmlinuz-*) in {boot}",
            hint="install one, e.g. apt-get install linux-image-amd64 (vagrant/provision.sh does)",
        )
    found = [Kernel(p, p.name[len("vmlinuz-") :], None) for p in images]
    found = [Kernel(k.image, k.version, modules / k.version if (modules / k.version).is_dir() else None)
             for k in found]
    found.sort(key=lambda k: (k.modules is not None, _version_key(k.version)))
    kernel = found[-1]
    if not os.access(kernel.image, os.R_OK):
        # Ubuntu installs vmlinuz readable by root only (mode 0600)
        raise NeedsRoot(f"reading the kernel image {kernel.image}")
    return kernel


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor().decompress(data)  # stops at the end of the first stream


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)  # 16+: expect a gzip header


# Where a bzImage's compressed kernel starts: the magic bytes of each format
_COMPRESSED = [(b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)]


def pvh_kernel(kernel: Kernel, cache: Path) -> Path | None:
    """The kernel as a plain ELF ``vmlinux`` that qemu can start at its PVH entry, or None.

    A bzImage unpacks itself before it boots; emulated, that costs seconds on every boot
    (Debian compresses with xz). A kernel built with CONFIG_PVH=y carries an ELF note with a
    32-bit entry point (Documentation/arch/x86/boot.rst, "PVH"), so qemu can load the
    unpacked kernel directly. labkit unpacks it once, on the host, and caches it.
    """
    config = kernel.image.parent / f"config-{kernel.version}"
    if platform.machine() != "x86_64" or not config.exists() or "CONFIG_PVH=y\n" not in config.read_text():
        return None
    st = kernel.image.stat()
    target = cache / f"vmlinux-{kernel.version}-{st.st_size}-{st.st_mtime_ns}"
    if target.exists():
        return target
    data = kernel.image.read_bytes()
    for magic, decompress in _COMPRESSED:
        start = data.find(magic)
        if start < 0:
            continue
        try:
            elf = decompress(data[start:])
        except (lzma.LZMAError, zlib.error):
            continue
        if elf.startswith(b"\x7fELF"):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            tmp.write_bytes(elf)
            os.replace(tmp, target)  # a concurrent boot sees the whole file or none
            for old in cache.glob(f"vmlinux-{kernel.version}-*"):
                if old != target:
                    old.unlink(missing_ok=True)
            return target
    return None


def _module_name(path: str) -> str:
    """'kernel/net/9p/9pnet_virtio.ko.xz' -> '9pnet_virtio' (modprobe treats - and _ alike)."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as {name: (relative path, [relative paths of every dependency])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    with open(moddir / "modules.dep") as f:
        for line in f:
            path, _, deps = line.partition(":")
            table[_module_name(path)] = (path.strip(), deps.split())
    return table


def builtin_modules(moddir: Path) -> set[str]:
    """Names compiled into the kernel image itself (modules.builtin): nothing to load."""
    try:
        with open(moddir / "modules.builtin") as f:
            return {_module_name(line.strip()) for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def resolve_modules(moddir: Path, wanted: list[str], optional: list[str] = ()) -> list[str]:
    """Relative paths of ``wanted`` + ``optional`` and all they depend on, dependencies first.

    A wanted module that is neither a module nor built in raises Unsupported; an optional
    one that is missing is left out (the guest then lacks that feature).
    """
    table = read_modules_dep(moddir)
    builtin = builtin_modules(moddir)
    by_path = {path: deps for path, deps in table.values()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in by_path.get(path, []):
            visit(dep)  # a module's own dependencies go in before it
        order.append(path)

    for name in [*wanted, *optional]:
        key = name.replace("-", "_")
        if key in table:
            visit(table[key][0])
        elif key not in builtin and name in wanted:
            raise Unsupported(f"kernel module {name} is neither in {moddir}/modules.dep nor built in")
    return order


def module_bytes(path: Path) -> bytes:
    """A module file's ELF contents, decompressed if it is stored compressed."""
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        try:
            from compression import zstd  # Python 3.14+

            return zstd.decompress(raw)
        except ImportError:
            pass
        tool = shutil.which("zstd")
        if not tool:
            raise Unsupported(f"{path} is zstd-compressed and the zstd tool is missing",
                              hint="apt-get install zstd")
        return subprocess.run([tool, "-dc", str(path)], check=True, capture_output=True).stdout
    return raw
