"""Base images made offline: the first layer of every image, as a tar.

A container's root filesystem is only a directory tree with a shell in it. This
module makes the two trees the course starts from, without a registry:

- **busybox**: one statically linked binary (Debian's busybox-static, /bin/busybox)
  plus a hard link per applet (``busybox --list-full`` names them: bin/ls,
  usr/bin/wget, ...), a few files in /etc and the empty directories a runtime
  mounts over (/proc, /sys, /dev, /tmp ...). A static binary needs no /lib, so the
  whole image is about 2 MB and is written in well under a second. Building it twice
  gives the same tar, byte for byte (every entry gets /bin/busybox's mtime).
- **debian**: ``debootstrap --variant=minbase bookworm`` (debootstrap(8)): Debian's
  own way to install a minimal system into a directory by unpacking .debs. It needs
  the Debian mirror and takes about half a minute, so the result is cached as a tar
  in ``cache_dir()`` (/var/cache/labkit), which outlives any ``LABKIT_ROOT``.

Both return a tar (the format of an OCI layer, see ``layers``); ``images`` unpacks
it into the image store.

Layer: engine. Used by images.build_base.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from labkit import paths
from labkit.errors import LabkitError, Unsupported, require_root
from labkit.kernel import safe
from labkit.runtime.spec import DEFAULT_PATH

Progress = Callable[[str], None]

BUSYBOX = Path("/bin/busybox")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT = 1200  # seconds; it takes about 30 here, a slow mirror may take minutes
PATH_ENV = f"PATH={DEFAULT_PATH}"

# The files every small Linux userland expects in /etc.
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnobody:x:65534:\n",
    "etc/hostname": "labkit\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",  # the runtime bind-mounts its own when the container has a network
}
# Empty directories: mount points for the runtime, and homes. (path, mode)
EMPTY_DIRS = [
    ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("root", 0o700),
    ("home", 0o755), ("var", 0o755), ("run", 0o755), ("mnt", 0o755), ("etc", 0o755),
]  # fmt: skip


def cache_dir() -> Path:
    """Where base-image tarballs are kept (see labkit.paths.cache_root)."""
    return paths.cache_root()


# --- busybox -------------------------------------------------------------------


def is_static(binary: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header, i.e. no dynamic loader:
    it runs in an empty root with no /lib (elf(5))."""
    with open(binary, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64 only (amd64, arm64)
            return False
        order = "little" if head[5] == 1 else "big"
        phoff = int.from_bytes(head[0x20:0x28], order)
        phentsize = int.from_bytes(head[0x36:0x38], order)
        phnum = int.from_bytes(head[0x38:0x3A], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (int.from_bytes(table[i : i + 4], order) for i in range(0, len(table), phentsize))
    return 3 not in types  # PT_INTERP == 3


def busybox_version(binary: Path = BUSYBOX) -> str:
    """'BusyBox v1.35.0 (Debian ...)': the first line busybox prints about itself."""
    out = subprocess.run([binary], capture_output=True, text=True, timeout=10, check=False).stdout
    return out.splitlines()[0].removesuffix(" multi-call binary.") if out else "BusyBox"


def busybox_tar(binary: Path = BUSYBOX) -> bytes:
    """The busybox root filesystem as an uncompressed tar, built in memory."""
    if not binary.exists():
        raise Unsupported(
            f"{binary} is missing; install Debian's busybox-static (apt-get install busybox-static)"
        )
    if not is_static(binary):
        raise Unsupported(
            f"{binary} is dynamically linked; a container root has no /lib: install busybox-static"
        )
    listing = subprocess.run([binary, "--list-full"], capture_output=True, text=True, timeout=10, check=True)
    applets = sorted({line.strip().lstrip("/") for line in listing.stdout.split()} - {"bin/busybox", ""})
    mtime = int(binary.stat().st_mtime)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, mtime, link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        dirs = {name for name, _ in EMPTY_DIRS}
        dirs |= {str(Path(a).parent) for a in applets if "/" in a} | {"bin"}
        dirs |= {str(p) for d in list(dirs) for p in Path(d).parents if str(p) != "."}
        modes = dict(EMPTY_DIRS)
        for d in sorted(dirs):
            add(d, tarfile.DIRTYPE, modes.get(d, 0o755))
        add("bin/busybox", tarfile.REGTYPE, 0o755, binary.read_bytes())
        for applet in applets:
            # One inode, many names: busybox looks at argv[0] to pick the applet.
            add(applet, tarfile.LNKTYPE, 0o755, link="bin/busybox")
        for name, text in ETC_FILES.items():
            add(name, tarfile.REGTYPE, 0o644, text.encode())
    return buf.getvalue()


# --- debian ---------------------------------------------------------------------

# debootstrap's "I: ..." lines, mapped to the stage they start. Retrieving and
# Validating also happen for the package index, so they count as downloads only
# after dependencies were resolved.
DEBIAN_STAGES = [
    "fetching the package index",
    "resolving dependencies",
    "downloading packages",
    "extracting packages",
    "installing packages",
    "configuring packages",
    "packing the cache tarball",
]


def _stage_of(line: str, current: int) -> int:
    words = line.removeprefix("I: ").split()
    first = words[0] if words else ""
    if first == "Resolving":
        return 1
    if first in ("Retrieving", "Validating") and current >= 1:
        return 2
    if first == "Extracting":
        return 3
    if first in ("Installing", "Unpacking"):
        return 4
    if first == "Configuring":
        return 5
    return current


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """One builder at a time: a second caller waits, then finds the cache filled."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def debian_tar(progress: Progress | None = None, suite: str = DEBIAN_SUITE) -> Path:
    """The cached tarball of a minbase Debian ``suite``, made by debootstrap if absent.

    ``progress`` receives one "[i/n] stage" line each time the build moves on (and
    debootstrap's warnings). Set ``LABKIT_DEBIAN_MIRROR`` to use another mirror.
    """
    say = progress or (lambda line: None)
    cached = cache_dir() / f"debian-{suite}-minbase.tar"
    if cached.exists():
        return cached
    require_root("debootstrap installs packages as root into a new directory")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(debootstrap):
        raise Unsupported("debootstrap is not installed (apt-get install debootstrap)")
    with _locked(cache_dir() / ".lock"):
        if cached.exists():  # another process built it while we waited
            return cached
        scratch = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir()))
        try:
            tree = scratch / "rootfs"
            _debootstrap(debootstrap, suite, tree, say)
            _trim(tree)
            say(f"[{len(DEBIAN_STAGES)}/{len(DEBIAN_STAGES)}] {DEBIAN_STAGES[-1]}")
            partial = cached.with_suffix(".partial")
            # GNU tar is several times faster than tarfile on 7,000 files; the
            # archive order does not matter to the store.
            subprocess.run(
                ["tar", "--create", "--file", partial, "--numeric-owner", "--one-file-system", "-C", tree, "."],
                check=True, timeout=600,
            )  # fmt: skip
            os.replace(partial, cached)
        finally:
            _unmount_below(scratch)
            safe.remove_tree(scratch, within=cache_dir())
    return cached


def _debootstrap(debootstrap: str, suite: str, tree: Path, say: Progress) -> None:
    mirror = os.environ.get("LABKIT_DEBIAN_MIRROR", DEBIAN_MIRROR)
    cmd = [debootstrap, "--variant=minbase", suite, str(tree), mirror]
    n, stage, started, tail = len(DEBIAN_STAGES), -1, time.monotonic(), []
    timed_out = threading.Event()
    # its own session, so a timeout can kill debootstrap together with the dpkg and wget it runs
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        def stop() -> None:  # a watchdog: a hung download prints nothing for the loop below to see
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(DEBOOTSTRAP_TIMEOUT, stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                tail = (tail + [line])[-5:]
                new = max(stage, _stage_of(line, max(stage, 0)))  # debootstrap revisits "Unpacking" at the end
                if new != stage:
                    stage = new
                    say(f"[{stage + 1}/{n}] {DEBIAN_STAGES[stage]} ({time.monotonic() - started:.0f}s)")
                if line.startswith(("W:", "E:")):
                    say(f"      debootstrap {line}")
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        raise LabkitError(f"debootstrap {suite} took more than {DEBOOTSTRAP_TIMEOUT}s; stopped it",
                          hint="a slow or unreachable mirror: LABKIT_DEBIAN_MIRROR picks another one")
    if proc.returncode != 0:
        raise LabkitError(
            f"debootstrap {suite} failed with exit code {proc.returncode}: {tail[-1] if tail else ''}",
            hint=f"is {mirror} reachable? LABKIT_DEBIAN_MIRROR picks another mirror",
        )


def _trim(tree: Path) -> None:
    """Make the debootstrapped tree an image: drop what belongs to the host or to
    this build (downloaded .debs, package lists, device nodes, the host's resolver)."""
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "dev"):
        folder = tree / rel
        for entry in os.listdir(folder) if folder.is_dir() else []:
            if entry not in ("partial", "lock"):
                safe.remove_tree(folder / entry, within=tree)
    for name, text in ETC_FILES.items():
        if name not in ("etc/passwd", "etc/group"):  # Debian's own have all system users
            (tree / name).unlink(missing_ok=True)  # may be a symlink: replace, never follow
            (tree / name).write_text(text)


def _unmount_below(scratch: Path) -> None:
    """debootstrap mounts /proc and /sys in its target and leaves them if it fails."""
    from labkit.kernel import mounts

    mounts.unmount_below(scratch)
