"""Build the small VM's initramfs: busybox, two scripts and a few kernel modules.

An initramfs is a cpio archive ("newc" format) that the kernel unpacks into a tmpfs and
uses as its first root (Documentation/filesystems/ramfs-rootfs-initramfs.rst and
Documentation/driver-api/early-userspace/buffer-format.rst). labkit writes the archive
itself, in Python, so no cpio tool and no root are needed to build it:

    /init                 guest.INIT: PID 1
    /.labkit/busybox      the static busybox of the host (Debian: busybox-static)
    /.labkit/agent        guest.AGENT: mounts cgroups, serves commands
    /bin/<applet>         symlinks to busybox, one per applet (sh, mount, insmod, ...)
    /dev/console          the node the kernel opens as init's stdin, stdout and stderr
    /lib/modules/*.ko     drivers, decompressed; /lib/modules/order lists the load order

The result is cached in ``<lib root>/vm/`` under a hash of everything that went in, so a
second boot reuses it and a kernel or busybox update makes a new one.

Layer: lab. Used by ``labkit.lab.vm.machine``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from labkit import paths
from labkit.errors import NotFound
from labkit.lab.vm import guest
from labkit.lab.vm.host import Kernel, module_bytes, resolve_modules

FORMAT = 1  # bump when the archive's layout changes, so old caches are not reused

# Drivers the guest cannot work without: the PCI transport for virtio, and the
# virtio-serial port that carries commands to the guest.
REQUIRED_MODULES = ["virtio_pci", "virtio_console"]
# Drivers for optional features: the host's root over 9p, overlayfs for the writable
# root and for containers, loop devices for the io tests, and the rng (entropy at boot);
# then containers' networks: veth pairs, the bridge, and nftables with what labkit's table
# uses (nat chains, masquerade, dnat, fib daddr type local). modules.dep adds conntrack
# and libcrc32c; that one asks the crypto API for a "crc32c", which nothing could load
# this early (no modprobe in here), so crc32c_generic comes first.
OPTIONAL_MODULES = ["9p", "9pnet_virtio", "overlay", "loop", "virtio_rng", "veth", "bridge", "crc32c_generic",
                    "nf_tables", "nft_chain_nat", "nft_nat", "nft_masq", "nft_fib_ipv4"]

BUSYBOX_CANDIDATES = ["/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"]


def find_busybox() -> Path:
    """A statically linked busybox: the guest has no C library to load a dynamic one from."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and _is_static(path):
            return path
    raise NotFound("no static busybox found in " + ", ".join(BUSYBOX_CANDIDATES),
                   hint="apt-get install busybox-static (vagrant/provision.sh does)")


def _is_static(path: Path) -> bool:
    # a dynamic ELF carries a PT_INTERP header naming its loader (/lib64/ld-linux-...)
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF" and b"ld-linux" not in f.read(1 << 16)


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(set(out.stdout.split()))


class Cpio:
    """A writer of the cpio "newc" format: a 110-byte ASCII header per file, 4-byte aligned."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        raw_name = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0]
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.parts += [header, raw_name, b"\0" * (-(len(header) + len(raw_name)) % 4)]
        self.parts += [data, b"\0" * (-len(data) % 4)]

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def build(kernel: Kernel, busybox: Path) -> bytes:
    """The archive's bytes for this kernel and busybox."""
    cpio = Cpio()
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "lib", "lib/modules", ".labkit"]:
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("init", guest.INIT.encode(), 0o755)
    cpio.file(".labkit/busybox", busybox.read_bytes(), 0o755)
    cpio.file(".labkit/agent", guest.AGENT.encode(), 0o755)
    cpio.symlink("bin/busybox", "/.labkit/busybox")
    for applet in _applets(busybox):
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "/.labkit/busybox")
    order = []
    if kernel.modules is not None:
        for rel in resolve_modules(kernel.modules, REQUIRED_MODULES, OPTIONAL_MODULES):
            name = rel.rsplit("/", 1)[-1].split(".ko", 1)[0] + ".ko"
            cpio.file(f"lib/modules/{name}", module_bytes(kernel.modules / rel))
            order.append(name)
    cpio.file("lib/modules/order", "".join(f"{n}\n" for n in order).encode())
    return cpio.finish()


def _inputs_hash(kernel: Kernel, busybox: Path) -> str:
    """A hash of what goes in: scripts, busybox, the modules folder (cheap: sizes and times)."""
    h = hashlib.sha256(f"{FORMAT}\n{guest.INIT}\n{guest.AGENT}\n{REQUIRED_MODULES}{OPTIONAL_MODULES}\n".encode())
    for path in [busybox, kernel.modules / "modules.dep" if kernel.modules else None]:
        if path is not None:
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(kernel.version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return paths.lib_root() / "vm"


def initramfs(kernel: Kernel, busybox: Path | None = None, cache: Path | None = None) -> Path:
    """The path of an initramfs for ``kernel``: from the cache, or built and cached now."""
    busybox = busybox or find_busybox()
    cache = cache or cache_dir()
    name = f"initramfs-{kernel.version}-{_inputs_hash(kernel, busybox)}.cpio"
    for target in [cache / name, Path.home() / ".cache" / "labkit" / "vm" / name]:
        if os.access(target, os.R_OK):
            return target
    target = cache / name
    data = build(kernel, busybox)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except PermissionError:  # a user without write access to the state root: their own cache
        cache = Path.home() / ".cache" / "labkit" / "vm"
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / target.name
    # write, then rename: a concurrent boot never sees half an archive
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; qemu run by any user may read it
    os.replace(tmp, target)
    for old in cache.glob(f"initramfs-{kernel.version}-*.cpio"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def remove_cache() -> None:
    """Forget every cached initramfs (the next boot builds a fresh one)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)
