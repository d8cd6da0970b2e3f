#!/usr/bin/env python3
"""Build the course's Vagrant base box here, from Debian's packages only.

The course VM is `vagrant up` on a box. The usual one (bento/ubuntu-24.04) is a download
from Vagrant's cloud; this script makes a stand-in from Debian's archive instead, so the
Vagrantfile can be booted where that download is impossible (CI, this course's own tests).

A Vagrant base box is little more than a disk with an agreement on it (Vagrant's "base
box" documentation lists it):
- a user `vagrant` that may sudo without a password,
- sshd, and Vagrant's well-known "insecure" public key in ~vagrant/.ssh/authorized_keys
  (Vagrant logs in with it once, then swaps in a key of its own),
- a network interface that asks DHCP for an address.

The steps, each a function below:
1. debootstrap Debian 13 ("trixie") into a folder, with a kernel, systemd, sudo, sshd.
2. configure it: the vagrant user and its key, fstab, DHCP, apt's sources.
3. `mkfs.ext4 -d FOLDER` turns the folder into a filesystem image without mounting
   anything (no loop device, no mount: nothing to leave behind), and `qemu-img convert`
   makes it a qcow2, the format libvirt's boxes use.
4. package it: box.img, metadata.json and a Vagrantfile in one tar, the .box file.

`--ready` makes a second box, labkit/debian-13-ready: the same, and then provision.sh run
once inside it at build time (a chroot, at the host's speed), so that the system packages and
the venv are there when the VM boots. Under software emulation a first provisioning crawls
(dpkg had unpacked 17 of some 300 packages after 4 minutes); with this box `vagrant up`
runs provision.sh in minutes, as its second run, and the parts that need a booted system
(--service: the systemd units, the token, the services) run for real in the VM.

Where the host reaches the package registries through a proxy that signs with a CA of its
own (/usr/local/share/ca-certificates), the box gets those certificates and a pip.conf that
points pip at the system bundle, as a new machine on this network would need.

The disk has no partition table and no boot loader. The kernel and initramfs are copied out
of the image's own /boot and handed to the hypervisor (qemu's -kernel/-initrd, libvirt's
<kernel>/<initrd>): the box's Vagrantfile tells vagrant-libvirt where they are.

Everything is kept in the cache, in a folder named by the hash of the recipe (RECIPE and
the files written in step 2): the same recipe is built once.

    sudo python3 scripts/build_box.py            # build (or find) the box, print its folder
    sudo python3 scripts/build_box.py --add      # ... and `vagrant box add` it as labkit/debian-13
    sudo python3 scripts/build_box.py --ready    # the box with provision.sh run in it

Only the standard library: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("LABKIT_BOX_CACHE", "/var/cache/labkit/box"))
BOX_NAME = "labkit/debian-13"
READY_BOX_NAME = "labkit/debian-13-ready"
REPO = Path(__file__).resolve().parent.parent
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# what provision.sh reads: a change to any of them is another ready box
PROVISION_INPUTS = ("vagrant/provision.sh", "requirements.txt", "pyproject.toml")
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_S = 30 * 60
DISK_GIB = 20  # the guest's disk as it sees it; qcow2 stores only what is written
# Vagrant's insecure public key ships inside Debian's vagrant package.
VAGRANT_KEYS = Path("/usr/share/rubygems-integration/all/gems")
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"

# What the box is made of. Changing anything here gives a new hash, hence a new build.
RECIPE = {
    "suite": "trixie",
    "variant": "minbase",
    # minbase has apt and the essential packages; a bootable machine needs these too
    # (systemd-sysv: systemd as /sbin/init; udev: device nodes; dbus: logind, hostnamectl;
    # systemd-resolved: DNS for the DHCP lease; rsync: vagrant-libvirt's synced folder)
    "packages": ["linux-image-amd64", "initramfs-tools", "zstd", "systemd-sysv", "udev", "dbus",
                 "systemd-resolved", "kmod", "iproute2", "netbase", "ca-certificates",
                 "sudo", "openssh-server", "rsync", "python3", "procps"],
    "disk_gib": DISK_GIB,
    "cmdline": KERNEL_CMDLINE,
}


def say(msg: str) -> None:
    print(f"==> build-box: {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"build-box: {msg}", file=sys.stderr)
    sys.exit(1)


def insecure_key() -> str:
    """Vagrant's insecure public key, from the installed vagrant gem."""
    keys = sorted(VAGRANT_KEYS.glob("vagrant-[0-9]*/keys/vagrant.pub"))
    if not keys:
        fail(f"no Vagrant insecure key under {VAGRANT_KEYS}/vagrant-*/keys/ (hint: apt-get install vagrant)")
    return keys[-1].read_text().strip() + "\n"


def config_files(key: str) -> dict[str, tuple[int, str]]:
    """The files step 2 writes into the root: path -> (mode, content)."""
    suite = RECIPE["suite"]
    return {
        "etc/fstab": (0o644, "/dev/vda / ext4 errors=remount-ro 0 1\n"),
        "etc/hostname": (0o644, "labkit-box\n"),
        "etc/hosts": (0o644, "127.0.0.1 localhost\n127.0.1.1 labkit-box\n"),
        # the release, its updates and its security fixes, as an installed Debian has them
        "etc/apt/sources.list": (0o644, f"deb {MIRROR} {suite} main\n"
                                        f"deb {MIRROR} {suite}-updates main\n"
                                        f"deb http://deb.debian.org/debian-security {suite}-security main\n"),
        # net.ifnames=0 on the command line names the first NIC eth0, on any hypervisor
        "etc/systemd/network/20-eth0.network": (0o644, "[Match]\nName=eth0\n\n[Network]\nDHCP=yes\n"),
        "etc/sudoers.d/vagrant": (0o440, "vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n"),
        "home/vagrant/.ssh/authorized_keys": (0o600, key),
        # Vagrant asks sshd for no DNS lookup of its client: logins stay quick without DNS
        "etc/ssh/sshd_config.d/vagrant.conf": (0o644, "UseDNS no\n"),
    }


def recipe_hash(files: dict[str, tuple[int, str]], ready: bool = False) -> str:
    """The recipe: RECIPE, the files written, and the code of each step that makes the
    box (a changed step rebuilds it; a changed comment elsewhere in this file does not).
    A ready box adds the provisioning step and what provision.sh reads."""
    steps = [inspect.getsource(f) for f in (debootstrap, chroot, configure, network_trust, make_disk, package)]
    recipe = {"recipe": RECIPE, "files": files, "steps": steps, "box": BOX_VAGRANTFILE}
    if ready:
        recipe["provision"] = [inspect.getsource(provision_in_chroot)] + [
            (REPO / p).read_text() for p in PROVISION_INPUTS]
    text = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- 1. debootstrap ------------------------------------------------------------------


def debootstrap(root: Path) -> None:
    tool = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(tool):
        fail("debootstrap is not installed (hint: apt-get install debootstrap)")
    say(f"debootstrap {RECIPE['suite']} with {len(RECIPE['packages'])} extra packages (minutes)")
    subprocess.run([tool, f"--variant={RECIPE['variant']}", "--include=" + ",".join(RECIPE["packages"]),
                    RECIPE["suite"], str(root), MIRROR],
                   check=True, stdout=subprocess.DEVNULL, timeout=DEBOOTSTRAP_TIMEOUT_S)


# --- 2. configure --------------------------------------------------------------------


def chroot(root: Path, *argv: str) -> None:
    subprocess.run(["chroot", str(root), *argv], check=True, timeout=300,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})


def configure(root: Path, files: dict[str, tuple[int, str]]) -> None:
    say("configuring: the vagrant user, its key, sudo, DHCP, fstab")
    chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--user-group", "vagrant")
    chroot(root, "sh", "-c", "echo vagrant:vagrant | chpasswd")  # Vagrant's convention
    for rel, (mode, content) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
    chroot(root, "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh")
    (root / "home/vagrant/.ssh").chmod(0o700)
    chroot(root, "systemctl", "enable", "systemd-networkd", "systemd-resolved", "ssh")
    # systemd-resolved answers DNS on 127.0.0.53; resolv.conf points programs there
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    # Each machine made from the box must get a machine-id of its own at first boot.
    (root / "etc/machine-id").write_text("")
    # The downloaded .debs are not needed in the box (apt fetches lists again anyway)
    for p in (root / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()


def network_trust(root: Path) -> None:
    """The host network's own CA certificates, if any, trusted in the box (apt, curl) and
    by pip, which otherwise trusts only its own bundle."""
    cas = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    if not cas:
        return
    say(f"the network's CA certificates: {', '.join(ca.name for ca in cas)}")
    dest = root / LOCAL_CAS.relative_to("/")
    dest.mkdir(parents=True, exist_ok=True)
    for ca in cas:
        shutil.copy(ca, dest / ca.name)
    chroot(root, "update-ca-certificates")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def provision_in_chroot(root: Path) -> None:
    """provision.sh, run once inside the box's root at build time (the --ready box).

    The checkout goes to /vagrant, where the VM will have it, so the venv's editable install
    and provision.sh's stamp name the same place. It runs in a mount namespace of its own
    (unshare(1)): /proc, /sys, /dev and a /run for DNS are mounted only there and vanish
    with it. provision.sh's policy-rc.d keeps every daemon from starting in the chroot."""
    from boot_box import copy_checkout  # the same copy the qemu-direct VM shares

    say("provision.sh in the box (the ready box: packages and venv at the host's speed)")
    checkout = root / "vagrant"
    checkout.mkdir(exist_ok=True)
    copy_checkout(checkout, REPO)
    resolv = Path("/etc/resolv.conf").read_text()
    inside = (f"set -e; r={root}; mount -t proc proc $r/proc; mount -t sysfs sys $r/sys; "
              f"mount --rbind /dev $r/dev; mount -t tmpfs run $r/run; "
              # the box's resolv.conf points at systemd-resolved's stub, under /run
              f"mkdir -p $r/run/systemd/resolve; cat > $r/run/systemd/resolve/stub-resolv.conf; "
              f"exec chroot $r /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "
              f"LABKIT_REPO=/vagrant bash /vagrant/vagrant/provision.sh")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", inside],
                   input=resolv, text=True, check=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
    # what provision.sh does on a booted system: dockerd never starts (labkitd is the engine)
    chroot(root, "systemctl", "mask", "docker.service", "docker.socket")
    # the VM gets its own checkout at /vagrant (a synced folder): the mount point stays, empty
    shutil.rmtree(checkout)
    checkout.mkdir()
    for p in (root / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()


# --- 3. the disk image ---------------------------------------------------------------


def kernel_files(root: Path) -> tuple[Path, Path]:
    """The image's own kernel and initramfs (the newest, if there are more)."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        fail(f"no kernel in {root}/boot: linux-image-amd64 did not install")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    return kernels[-1], root / "boot" / f"initrd.img-{version}"


def make_disk(root: Path, out: Path) -> None:
    """`root` as a partitionless ext4 filesystem, written without mounting, as qcow2."""
    raw = out.with_suffix(".raw")
    say(f"mkfs.ext4 -d (a {DISK_GIB} GiB sparse file), then qemu-img convert to qcow2")
    with open(raw, "wb") as f:
        f.truncate(DISK_GIB << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw)], check=True, timeout=600)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True, timeout=600)
    raw.unlink()


# --- 4. the .box --------------------------------------------------------------------

# vagrant-libvirt reads this Vagrantfile from inside the box, where __dir__ is the box's
# folder: the kernel and initramfs travel with the box.
BOX_VAGRANTFILE = """\
# The labkit base box (scripts/build_box.py): a disk without boot loader, so libvirt
# boots the kernel and initramfs that came in this box, with this command line.
Vagrant.configure("2") do |config|
  config.vm.provider "libvirt" do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "{cmdline}"
    lv.disk_bus = "virtio"
  end
end
"""


def package(folder: Path) -> Path:
    """box.img, metadata.json, Vagrantfile, vmlinuz, initrd.img -> folder/labkit.box."""
    (folder / "metadata.json").write_text(json.dumps(
        {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}) + "\n")
    (folder / "Vagrantfile").write_text(BOX_VAGRANTFILE.replace("{cmdline}", KERNEL_CMDLINE))
    box = folder / "labkit.box"
    partial = folder / ".labkit.box.partial"
    with tarfile.open(partial, "w") as tar:  # uncompressed: the qcow2 is what is big
        for name in ("metadata.json", "Vagrantfile", "vmlinuz", "initrd.img", "box.img"):
            tar.add(folder / name, arcname=name)
    os.replace(partial, box)
    return box


def build(ready: bool = False) -> Path:
    """The box's cache folder, built once per recipe."""
    files = config_files(insecure_key())
    folder = CACHE / f"debian-13-{'ready-' if ready else ''}{recipe_hash(files, ready)}"
    if (folder / "labkit.box").exists():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two builds at once: the second waits, then finds it
        if (folder / "labkit.box").exists():
            return folder
        return _build(folder, files, ready)


def _build(folder: Path, files: dict[str, tuple[int, str]], ready: bool) -> Path:
    with tempfile.TemporaryDirectory(prefix="labkit-box-", dir=CACHE) as tmp:
        work = Path(tmp)
        root = work / "root"
        debootstrap(root)
        configure(root, files)
        network_trust(root)
        if ready:
            provision_in_chroot(root)
        kernel, initrd = kernel_files(root)
        shutil.copy(kernel, work / "vmlinuz")
        shutil.copy(initrd, work / "initrd.img")
        make_disk(root, work / "box.img")
        shutil.rmtree(root)
        package(work)
        work.chmod(0o755)
        os.replace(work, folder)  # all of it or nothing under the final name
        work.mkdir()  # TemporaryDirectory removes its own name at the end
    say(f"built {folder}")
    return folder


def add_to_vagrant(folder: Path, name: str) -> None:
    """`vagrant box add --name NAME`, unless this very build is there already."""
    home = Path(os.environ.get("VAGRANT_HOME", Path.home() / ".vagrant.d"))
    marker = home / "boxes" / name.replace("/", "-VAGRANTSLASH-") / "labkit-build"
    if marker.exists() and marker.read_text().strip() == folder.name:
        return
    say(f"vagrant box add --name {name} {folder / 'labkit.box'}")
    subprocess.run(["vagrant", "box", "add", "--force", "--name", name, str(folder / "labkit.box")],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    marker.write_text(folder.name + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--add", action="store_true", help="also `vagrant box add` it")
    parser.add_argument("--ready", action="store_true", help=f"the box with provision.sh run in it ({READY_BOX_NAME})")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        fail("needs root: debootstrap and chroot (hint: sudo)")
    folder = build(args.ready)
    if args.add:
        add_to_vagrant(folder, READY_BOX_NAME if args.ready else BOX_NAME)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
