"""Test helpers for containers: a busybox OCI bundle, and a check that nothing is left."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
LABKIT = [sys.executable, "-m", "labkit"]


def busybox_rootfs(root: Path) -> Path:
    """A minimal root filesystem: static busybox and a link per applet."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    for d in ("proc", "sys", "dev", "etc", "tmp", "mnt"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    return root


def bundle(dir_: Path, args: list[str], **changes) -> Path:
    """An OCI bundle in ``dir_`` from labkit's `runtime spec` with ``args``, no terminal."""
    from labkit.runtime.spec import Spec

    if not (dir_ / "rootfs").exists():
        busybox_rootfs(dir_ / "rootfs")
    spec = Spec.runc(args=tuple(args), terminal=False, env=("PATH=/bin",), **changes)
    spec.save(dir_)
    return dir_


def edit_config(dir_: Path, change) -> None:
    path = dir_ / "config.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


# Under software emulation (the cgroup v2 guest) everything runs several times slower:
# the guest's test run sets this factor, which stretches every labkit() timeout.
SLOWDOWN = float(os.environ.get("LABKIT_TEST_SLOWDOWN", "1"))


def labkit(*args: str, timeout: float = 60, command: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    """``labkit ARGS`` with this checkout's Python client (or ``command``: the compiled one)."""
    if "input" not in kw:  # not the terminal pytest may run in: labkitd serves only non-terminal stdin
        kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*(command or LABKIT), *args], capture_output=True, text=True, timeout=timeout * SLOWDOWN,
                          check=False, **kw)  # fmt: skip


def leftovers() -> list[str]:
    """Containers' traces: state dirs, container dirs, cgroups, shims."""
    from labkit import paths
    from labkit.kernel import cgroups

    found = []
    for d in (paths.run_root() / "containers", paths.containers_dir()):
        if d.is_dir():
            found += [str(p) for p in d.iterdir()]
    if paths.endpoints_dir().is_dir():  # network leases and their /etc files
        found += [str(p) for p in paths.endpoints_dir().iterdir() if p.name != "lock"]
    # shims of this session only: another test run on the machine has its own LABKIT_ROOT
    ours = f"LABKIT_ROOT={os.environ.get('LABKIT_ROOT', '')}".encode()
    # only the ids these tests make (other suites may run containers/ groups of their own),
    # and not the group of a container that another state root's run holds
    found += [f"cgroup {n}" for n in cgroups.list_all()
              if re.fullmatch(r"containers/([0-9a-f]{64}|rt\d+)", n) and not _held_by_others(n, ours)]  # fmt: skip
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if "(labkit-shim)" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
                    if ours in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                        found.append(f"shim {pid}")
            except OSError:
                pass
    return found


def served_by_labkitd() -> int:
    """How many commands labkitd of this state root has served (lines in its log)."""
    from labkit.engine import daemon

    try:
        return daemon.log_path().read_text().count("labkitd: worker ")
    except FileNotFoundError:
        return 0


def until(cond, timeout: float = 10.0, step: float = 0.01) -> None:
    """Poll ``cond()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout * SLOWDOWN
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def _held_by_others(name: str, ours: bytes) -> bool:
    """The group's processes belong to another state root: one of them, or its parent
    (a container's command has the image's environment, its shim the caller's), started
    with another LABKIT_ROOT, and none with ours."""
    from labkit.errors import LabkitError
    from labkit.kernel import cgroups

    try:
        pids = cgroups.open(name).procs()
    except LabkitError:
        return False
    roots = set()
    for pid in pids:
        try:
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        for who in (pid, parent):
            try:
                env = Path(f"/proc/{who}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            roots.update(e for e in env if e.startswith(b"LABKIT_ROOT="))
    return bool(roots) and ours not in roots
