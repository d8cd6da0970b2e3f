"""``labkit doctor``: does this machine have what the course needs?

One line per check, PASS / WARN / FAIL, each with a hint on how to fix it. The exit code
is non-zero when something *required* fails; a WARN only limits some lessons (no runc:
no side-by-side comparison; no working /dev/kvm: the small VM runs under software
emulation, slower but fine).

It is the first cell of the first notebook, so it must never raise: every probe catches
its own errors and turns them into a FAIL line.

Layer: lab. Reads from the kernel layer; starts nothing that outlives a check.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

from labkit.errors import LabkitError


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass" | "warn" | "fail"
    detail: str
    hint: str = ""
    required: bool = True


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None
    )


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", "pass", "running as root")
    return Check("root", "fail", f"running as uid {os.geteuid()}", "namespaces, mounts and cgroups need root: use sudo")


def check_kernel() -> Check:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check("kernel", "warn", f"Linux {release} (version not understood)", required=False)
    if (major, minor) >= (5, 14):
        return Check("kernel", "pass", f"Linux {release}")
    return Check("kernel", "warn", f"Linux {release}",
                 "5.14 or newer has every feature the course shows (cgroup.kill, time namespace)", required=False)


def check_python() -> Check:
    v = sys.version_info
    detail = f"Python {v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v >= (3, 11):
        return Check("python", "pass", detail)
    return Check("python", "fail", detail, "labkit needs Python 3.11 or newer")


def check_cgroups() -> Check:
    from labkit.kernel import cgroups

    mode = cgroups.mode()
    have = cgroups.available_controllers()
    # cgroup v2 freezes without a controller (cgroup.freeze); v1 needs the freezer hierarchy
    want = {"cpu", "memory", "pids", "cpuset"} | ({"io"} if mode == "v2" else {"blkio", "freezer"})
    missing = sorted(want - have)
    detail = f"{mode}; controllers: {' '.join(sorted(have)) or 'none'}"
    if missing:
        return Check("cgroups", "fail", detail, f"missing {' '.join(missing)}: the cgroup lessons need them")
    return Check("cgroups", "pass", detail)


def check_overlayfs() -> Check:
    with open("/proc/filesystems") as f:
        if "overlay" in f.read():
            return Check("overlayfs", "pass", "overlay filesystem available")
    mod = f"/lib/modules/{platform.release()}"
    if os.path.isdir(mod) and any("overlay.ko" in n for _, _, ns in os.walk(mod + "/kernel/fs/overlayfs") for n in ns):
        return Check("overlayfs", "pass", "overlay module present (loads on first mount)")
    return Check("overlayfs", "fail", "no overlay filesystem", "load it: modprobe overlay")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def check_userns() -> Check:
    max_ns = _read_int("/proc/sys/user/max_user_namespaces")
    if max_ns == 0:
        return Check("user namespaces", "fail", "user.max_user_namespaces = 0",
                     "sysctl -w user.max_user_namespaces=15000", required=False)
    restrict = _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if restrict == 1:
        return Check("user namespaces", "warn", "AppArmor restricts unprivileged user namespaces",
                     "root is not affected; for rootless demos: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
                     required=False)
    return Check("user namespaces", "pass", f"enabled (max {max_ns})")


def check_namespaces() -> Check:
    if os.geteuid() != 0:
        return Check("namespaces", "warn", "not tried (needs root)", "run as root", required=False)
    from labkit.kernel import namespaces

    r = namespaces.run(["true"], new={"uts", "ipc", "pid", "mnt", "net"}, timeout=10)
    if r.returncode == 0:
        return Check("namespaces", "pass", "a process started in new uts ipc pid mnt net namespaces")
    return Check("namespaces", "fail", f"test process exited {r.returncode}: {r.stderr.strip()[:80]}")


def check_module(name: str, why: str) -> Callable[[], Check]:
    def probe() -> Check:
        spec = importlib.util.find_spec(name)
        if spec is None:
            return Check(name, "fail", "not installed", f"{why}; install: sudo make setup")
        return Check(name, "pass", f"installed ({os.path.dirname(spec.origin or '')})")

    return probe


def check_tool(name: str, why: str, required: bool) -> Callable[[], Check]:
    def probe() -> Check:
        path = _which(name)
        if path:
            return Check(name, "pass", path, required=required)
        return Check(name, "fail" if required else "warn", "not found",
                     f"{why}; install it with: sudo make setup", required=required)

    return probe


def check_qemu() -> Check:
    from labkit.lab.vm.host import qemu_binary

    try:
        return Check("qemu", "pass", qemu_binary(), required=False)
    except LabkitError as e:
        return Check("qemu", "warn", str(e), "the VM lessons need it: sudo make setup", required=False)


def check_kvm() -> Check:
    from labkit.lab.vm.kvm import kvm_verdict

    verdict = kvm_verdict()  # the one the VM launcher uses: a guest ran, or why not
    if verdict.works:
        return Check("kvm", "pass", verdict.reason, required=False)
    return Check("kvm", "warn", f"cannot run a guest: {verdict.reason}",
                 "the small VM uses software emulation (TCG): slower, still works", required=False)


CHECKS: list[Callable[[], Check]] = [
    check_root,
    check_kernel,
    check_python,
    check_cgroups,
    check_overlayfs,
    check_userns,
    check_namespaces,
    check_module("pyroute2", "network lessons use it"),
    check_tool("busybox", "the base image is made from busybox-static", True),
    check_tool("runc", "the real runtime labkit is compared with", False),
    check_qemu,
    check_kvm,
]


def run_checks() -> list[Check]:
    results = []
    for probe in CHECKS:
        try:
            results.append(probe())
        except Exception as e:  # noqa: BLE001 - a broken probe is a FAIL line, not a crash
            name = probe.__name__.removeprefix("check_").replace("_", " ")
            results.append(Check(name, "fail", f"{type(e).__name__}: {e}"))
    return results


def format_report(results: list[Check], color: bool = False) -> str:
    paint = {"pass": "\033[32m", "warn": "\033[33m", "fail": "\033[31m"} if color else {}
    width = max(len(c.name) for c in results)
    lines = []
    for c in results:
        tag = c.status.upper()
        tag = f"{paint[c.status]}{tag}\033[0m" if paint else tag
        line = f"{tag:<4}  {c.name:<{width}}  {c.detail}"
        if c.hint and c.status != "pass":
            line += f"  -> {c.hint}"
        lines.append(line)
    failed = [c for c in results if c.status == "fail" and c.required]
    lines.append("")
    lines.append("ready: everything required is here" if not failed
                 else f"not ready: {len(failed)} required check(s) failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    results = run_checks()
    print(format_report(results, color=sys.stdout.isatty()))
    return 1 if any(c.status == "fail" and c.required for c in results) else 0
