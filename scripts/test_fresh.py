#!/usr/bin/env python3
"""`make test-fresh`: the README's test command on a machine that has nothing yet.

A test can pass here only because something was installed by hand once; the next new
machine then fails. This script proves the set-up from nothing, the way a new machine
would see it:

1. A bare Debian root filesystem (debootstrap --variant=minbase: the required packages
   and apt, not even make) is made once and kept as a tar in the cache. Nothing is ever
   installed into the cached copy.
2. Each run unpacks it into a new folder and copies the checkout in (the files git
   tracks, plus the untracked ones it does not ignore, as they are in the working tree).
3. In new mount and PID namespaces it mounts /proc, /sys, /sys/fs/cgroup, /dev, /dev/pts,
   /dev/shm and /run the way a booted machine has them, makes it the root, and runs
   `bash scripts/test.sh` as root with a clean environment and CI=true. The host's /opt,
   /usr/local, venv, pip and apt state are not in there: the run installs every package
   itself, over the network, as a new machine would.
4. It leaves nothing behind. The mounts live only in the run's mount namespace. Every
   process dies with the PID namespace's first process. The run sits in a cgroup of its
   own below this process's cgroup (so labkit's cgroups from the run nest there and
   cannot meet another test run's); that cgroup is removed afterwards. So is the folder.

The network namespace is the host's: the run needs the package registries. Tests inside
therefore share links and network namespaces with anything else running on the machine.
The one thing of the host's that goes in is the network's trust: where HTTPS to the
registries passes a proxy that signs with a CA of its own, a new machine has that CA in
/usr/local/share/ca-certificates and variables that point programs at the system bundle.
Those certificates and those variables (TRUST_VARIABLES) are copied; once the run has
installed the ca-certificates package, update-ca-certificates adds them to the bundle.

    sudo python3 scripts/test_fresh.py                  # Debian 12 (bookworm)
    sudo python3 scripts/test_fresh.py --suite trixie   # Debian 13
    sudo python3 scripts/test_fresh.py -- -x -k cli     # arguments for pytest

Exit status: the test run's. Only the Python standard library is used, so it runs before
the venv exists.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LABKIT_FRESH_CACHE", "/var/cache/labkit/test-fresh"))
WORK = Path(os.environ.get("LABKIT_FRESH_WORK", "/var/tmp"))
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
SUITES = {"bookworm": "Debian 12", "trixie": "Debian 13"}
DEBOOTSTRAP_TIMEOUT_S = 30 * 60
RUN_TIMEOUT_S = 75 * 60  # provisioning from nothing (~5 min) plus the whole suite (~10 min), with room
CGROUP_ROOT = Path("/sys/fs/cgroup")
CHECKOUT = "/root/labkit"  # where the copy of the checkout goes inside the fresh root
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                   "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def say(msg: str) -> None:
    print(f"==> test-fresh: {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"test-fresh: {msg}", file=sys.stderr)
    sys.exit(1)


# --- 1. the bare root filesystem, cached ------------------------------------------------


def bare_rootfs(suite: str) -> Path:
    """The cached tar of a bare `suite` root filesystem; debootstrap makes it once."""
    tar = CACHE / f"debian-{suite}-minbase.tar"
    if tar.exists():
        return tar
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(debootstrap):
        fail("debootstrap is not installed (hint: apt-get install debootstrap, or sudo make setup)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="labkit-fresh-bootstrap-", dir=WORK) as tmp:
        target = Path(tmp, "root")
        say(f"debootstrap --variant=minbase {suite} (once; the result is cached in {tar})")
        subprocess.run([debootstrap, "--variant=minbase", suite, str(target), MIRROR],
                       check=True, stdout=subprocess.DEVNULL, timeout=DEBOOTSTRAP_TIMEOUT_S)
        # debootstrap leaves the downloaded .debs and the package lists: a new machine has
        # neither
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (target / d).glob("*"):
                if p.is_file():
                    p.unlink()
        partial = tar.with_name(f".{tar.name}.{os.getpid()}")
        subprocess.run(["tar", "-C", str(target), "--numeric-owner", "-cf", str(partial), "."], check=True)
        os.replace(partial, tar)  # a concurrent run sees the whole tar or none
    return tar


# --- 2. the run's folder: the root filesystem and the checkout --------------------------


def checkout_files() -> list[str]:
    """The checkout as a new clone has it, plus untracked files git does not ignore."""
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=False)
    if r.returncode != 0:
        fail(f"{REPO} is not a git checkout (git ls-files: {r.stderr.decode().strip()})")
    return [f for f in r.stdout.decode().split("\0") if f and (REPO / f).exists()]


def prepare(root: Path, tar: Path, suite: str) -> None:
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tar)], check=True)
    etc = root / "etc"
    # what a machine of this suite has: the release, its updates and security suites
    (etc / "apt" / "sources.list").write_text(
        f"deb {MIRROR} {suite} main\ndeb {MIRROR} {suite}-updates main\n"
        f"deb {SECURITY} {suite}-security main\n")
    shutil.copy2("/etc/resolv.conf", etc / "resolv.conf", follow_symlinks=True)
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    cas = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    if cas:
        (root / LOCAL_CAS.relative_to("/")).mkdir(parents=True, exist_ok=True)
        for ca in cas:
            shutil.copy2(ca, root / ca.relative_to("/"))
        say(f"the network's CA certificates: {', '.join(ca.name for ca in cas)}")
    files = checkout_files()
    dest = root / CHECKOUT.lstrip("/")
    dest.mkdir(parents=True)
    listing = "\0".join(files).encode()
    pack = subprocess.Popen(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    unpack = subprocess.Popen(["tar", "-C", str(dest), "-xf", "-"], stdin=pack.stdout)
    pack.stdout.close()
    pack.communicate(listing)
    if unpack.wait() != 0 or pack.returncode != 0:
        fail("copying the checkout into the fresh root failed")
    say(f"copied the checkout ({len(files)} files) to {CHECKOUT}")


# --- 4. a cgroup of the run's own, below this process's cgroups ------------------------


def own_cgroups() -> list[Path]:
    """This process's cgroup directory in every mounted hierarchy (v1 and v2)."""
    mine: dict[str, str] = {}  # controllers ('' for v2) -> path
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mine[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, superopts = fields[sep + 1], fields[sep + 3].split(",")
        mount_root, point = fields[3], fields[4]
        if fstype == "cgroup2":
            key = ""
        elif fstype == "cgroup":
            key = next((c for c in mine if c and set(c.split(",")) <= set(superopts)), None)
        else:
            continue
        if key is None or key not in mine or not point.startswith(str(CGROUP_ROOT)):
            continue
        rel = os.path.relpath(mine[key], mount_root) if mine[key].startswith(mount_root) else None
        if rel is not None:
            found.append(Path(point, rel).resolve())
    return sorted(set(found))


def join_child_cgroups(name: str) -> list[tuple[Path, Path]]:
    """Make `name` below each of this process's cgroups and move this process into it.

    The process stays inside the tree it was put in. cpuset (v1) takes a task only once
    its cpus and mems are set: they are copied from the parent."""
    pairs = []
    for parent in own_cgroups():
        child = parent / name
        try:
            child.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (child / f).exists() and not (child / f).read_text().strip():
                    (child / f).write_text((parent / f).read_text())
            (child / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as e:  # v2: a parent with controllers on and processes in it refuses
            say(f"staying in {parent}: {e.strerror}")
            if child.exists() and not (child / "cgroup.procs").read_text().strip():
                child.rmdir()
            continue
        pairs.append((parent, child))
    return pairs


def leave_child_cgroups(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Move back, then remove each child cgroup and whatever the run left below it;
    the names that could not be removed."""
    left = []
    for parent, child in pairs:
        (parent / "cgroup.procs").write_text(str(os.getpid()))
        below = sorted((p for p in child.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*below, child]:
            for _ in range(50):  # a dying process leaves its cgroup a moment after it exits
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                left.append(str(d))
    return left


# --- 3. the run --------------------------------------------------------------------------

# Runs as PID 1 of the new PID namespace, in the new mount namespace. The fresh root
# becomes a mount of its own and then the root, with pivot_root as a container runtime
# does it: a plain chroot would leave / a directory, not a mount, and every container
# started inside would fail in pivot_root(2) with EINVAL. The host's root is then
# detached, so nothing of it is reachable from inside.
MOUNTS = r"""
set -e
R="$1"; shift
mount --bind "$R" "$R"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs "$R/sys"
mount --rbind /sys/fs/cgroup "$R/sys/fs/cgroup"
mount -t devtmpfs -o nosuid,mode=755 devtmpfs "$R/dev"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
mount --bind "$R/dev/pts/ptmx" "$R/dev/ptmx"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs "$R/run"
mkdir -m 1777 "$R/run/lock"
mkdir "$R/.old-root"
cd "$R"
pivot_root . .old-root
umount -l /.old-root
rmdir /.old-root
exec /usr/bin/env -i "$@"
"""


def run(root: Path, pytest_args: list[str]) -> int:
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
           "LANG=C.UTF-8", "TERM=dumb", "CI=true"]
    env += [f"{name}={os.environ[name]}" for name in TRUST_VARIABLES if name in os.environ]
    # not `exec`: this bash stays PID 1 and, like init, reaps the orphans the tests leave
    inner = f"cd {CHECKOUT} && bash scripts/test.sh {' '.join(map(shlex.quote, pytest_args))}; exit $?"
    argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            "sh", "-c", MOUNTS, "test-fresh", str(root), *env, "bash", "-c", inner]
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S, check=False).returncode
    except subprocess.TimeoutExpired:
        say(f"the run took longer than {RUN_TIMEOUT_S // 60} minutes: stopped")
        return 124


def mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)]


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the README's test command in a bare Debian root filesystem.")
    ap.add_argument("--suite", default="bookworm", choices=sorted(SUITES), help="Debian release (default bookworm)")
    ap.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest")
    args = ap.parse_args()
    if os.geteuid() != 0:
        fail("needs root: it debootstraps, mounts and chroots (hint: sudo make test-fresh)")
    started = time.monotonic()
    tar = bare_rootfs(args.suite)
    WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="labkit-fresh-", dir=WORK))
    cgroups = []
    try:
        root = folder / "root"
        root.mkdir()
        prepare(root, tar, args.suite)
        cgroups = join_child_cgroups(folder.name)
        say(f"running `bash scripts/test.sh` as root on a bare {SUITES[args.suite]} in {root}")
        code = run(root, args.pytest_args)
    finally:
        left = leave_child_cgroups(cgroups)
        mounted = mounts_below(folder)
        if mounted:  # never delete through a mount
            left += [f"mount {m}" for m in mounted]
        else:
            shutil.rmtree(folder)
    minutes = (time.monotonic() - started) / 60
    say(f"exit status {code} after {minutes:.1f} min; "
        + ("nothing left behind" if not left else f"LEFT BEHIND: {', '.join(left)}"))
    return code if not left else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
