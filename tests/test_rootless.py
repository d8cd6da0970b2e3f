"""Rootless, as ``podman run`` without sudo: an ordinary user, made for these tests and
removed after them, runs labkit. Root in the container is that user on the host, ids 1..
come from the user's /etc/subuid range (newuidmap), the state lives in the user's own
directories, and what needs root (a bridge, limits on cgroup v1, --privileged) is one line."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from bundles import SLOWDOWN, leftovers

from labkit.kernel import mounts

REPO = Path(__file__).resolve().parent.parent
USER = "lkrootless"


@pytest.fixture(scope="module")
def user():
    """A new unprivileged user with a subordinate id range; removed afterwards, with
    its home, its /etc/subuid lines and any process it left."""
    if shutil.which("newuidmap") is None:
        pytest.fail("newuidmap is missing: vagrant/provision.sh installs Debian's uidmap")
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)  # a run that was killed
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
    entry = pwd.getpwnam(USER)
    for path in ("/etc/subuid", "/etc/subgid"):  # useradd adds one where SUB_UID_COUNT says so
        if not any(line.startswith(f"{USER}:") for line in Path(path).read_text().splitlines()):
            with open(path, "a") as f:
                f.write(f"{USER}:200000:65536\n")
    runtime_dir = Path(tempfile.mkdtemp(prefix="lkrootless-run-"))
    os.chown(runtime_dir, entry.pw_uid, entry.pw_gid)
    data_home = Path(entry.pw_dir) / ".local" / "share"
    if mounts.fstype_of(entry.pw_dir) == "overlay":
        # (labkit's small VM: / is an overlayfs, where no overlay can keep its upper dir)
        data_home = runtime_dir / "data"
    # the user must be able to import labkit: a checkout below a closed directory (/root,
    # a CI runner's temp dir) is copied somewhere it can read
    code = REPO
    if subprocess.run(["runuser", "-u", USER, "--", "test", "-r", str(REPO / "labkit" / "__init__.py")]).returncode:
        code = Path(tempfile.mkdtemp(prefix="lkrootless-code-"))
        shutil.copytree(REPO / "labkit", code / "labkit", ignore=shutil.ignore_patterns("__pycache__"))
        code.chmod(0o755)
    yield entry, runtime_dir, code, data_home
    subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
    time.sleep(0.2)
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    shutil.rmtree(runtime_dir, ignore_errors=True)
    if code != REPO:
        shutil.rmtree(code, ignore_errors=True)


def as_user(user, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    entry, runtime_dir, code, data_home = user
    env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "XDG_RUNTIME_DIR": str(runtime_dir),
           "PYTHONPATH": str(code), "LANG": "C.UTF-8"}  # fmt: skip
    if data_home != Path(entry.pw_dir) / ".local" / "share":
        env["XDG_DATA_HOME"] = str(data_home)
    python = os.environ.get("LABKIT_VENV", "/opt/labkit/venv") + "/bin/python"
    return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           python, "-m", "labkit", *args], capture_output=True, text=True,
                          timeout=timeout * SLOWDOWN, stdin=subprocess.DEVNULL, check=False)  # fmt: skip


def test_root_in_the_container_is_the_user_outside(user):
    entry = user[0]
    r = as_user(user, "run", "--rm", "busybox", "sh", "-c", "id; cat /proc/self/uid_map; echo hi > /etc/x && cat /etc/x")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("uid=0(root) gid=0(root)")
    assert lines[1].split() == ["0", str(entry.pw_uid), "1"]
    first = next(line.split(":")[1] for line in Path("/etc/subuid").read_text().splitlines() if line.startswith(USER + ":"))
    assert lines[2].split()[:2] == ["1", first]  # ids 1.. from the user's range, written by newuidmap
    assert lines[3] == "hi"


def test_a_detached_container_runs_as_the_user_and_keeps_its_state_in_the_users_dirs(user):
    entry, runtime_dir, _, data_home = user
    r = as_user(user, "run", "-d", "--name", "rl", "busybox", "sh", "-c", "sleep 60 & exec sleep 61")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        state = runtime_dir / "labkit" / "containers" / cid
        data = data_home / "labkit" / "containers" / cid
        assert (state / "state.json").is_file() and (data / "config.json").is_file()
        top = as_user(user, "top", "rl")
        assert top.returncode == 0, top.stderr
        rows = [line.split() for line in top.stdout.splitlines()[1:]]
        assert len(rows) == 2, top.stdout  # both processes, found by their PID namespace (no cgroup)
        uid, pid, _ppid, cuid, cpid, *cmd = rows[0]
        assert (uid, cuid, cpid, cmd) == (USER, "0", "1", ["sleep", "61"])
        assert os.stat(f"/proc/{pid}").st_uid == entry.pw_uid  # the host's view, from the kernel
        r = as_user(user, "exec", "rl", "sh", "-c", "id -u; touch /made-here")
        assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr
        assert (data / "upper" / "made-here").stat().st_uid == entry.pw_uid
    finally:
        r = as_user(user, "rm", "-f", "rl")
    assert r.returncode == 0, r.stderr
    assert not state.exists() and not data.exists()
    # no process left (a shim that has exited may wait a moment for the machine's init to reap it)
    ps = subprocess.run(["ps", "-u", USER, "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
    left = [line for line in ps.splitlines() if line.split()[1] != "Z"]
    assert left == [], left


@pytest.mark.parametrize(("flags", "message"), [
    (["-m", "64m"], "resource limits (-m, --cpus, --pids-limit ...) are not available rootless here"),
    (["--network", "bridge"], "a bridge and its NAT rules need root"),
    (["--privileged"], "a privileged container is root of the host"),
])  # fmt: skip
def test_what_needs_root_is_one_line_and_creates_nothing(user, flags, message):
    r = as_user(user, "run", "--rm", *flags, "busybox", "true")
    assert r.returncode != 0 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    containers = user[3] / "labkit" / "containers"
    assert not containers.exists() or list(containers.iterdir()) == []
    assert leftovers() == []


# Run `labkit ARGS` as the user inside a user namespace whose user.max_user_namespaces is
# 0: the sysctl is per user namespace, so the host's stays as it is. Inside, every id is
# mapped to itself, and the user is the user; only new user namespaces are refused.
USERNS_OFF = """
import os, pwd, sys
from labkit.kernel import syscalls
user, python, *args = sys.argv[1:]
pw = pwd.getpwnam(user)
ready_r, ready_w = os.pipe()
mapped_r, mapped_w = os.pipe()
pid = os.fork()
if pid == 0:
    syscalls.unshare(syscalls.CloneFlags.CLONE_NEWUSER)
    os.write(ready_w, b"u")
    os.read(mapped_r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.setgroups([])
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    os.execve(python, [python, "-m", "labkit", *args], dict(os.environ))
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 4294967295\\n")
os.write(mapped_w, b"m")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_where_user_namespaces_are_off_one_line_names_the_sysctl(user):
    entry, runtime_dir, code, data_home = user
    python = os.environ.get("LABKIT_VENV", "/opt/labkit/venv") + "/bin/python"
    env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "XDG_RUNTIME_DIR": str(runtime_dir),
           "XDG_DATA_HOME": str(data_home), "PYTHONPATH": str(code), "LANG": "C.UTF-8"}  # fmt: skip
    before = Path("/proc/sys/user/max_user_namespaces").read_text()
    r = subprocess.run([python, "-c", USERNS_OFF, USER, python, "run", "--rm", "busybox", "id"], env=env,
                       capture_output=True, text=True, timeout=60 * SLOWDOWN, stdin=subprocess.DEVNULL)  # fmt: skip
    assert Path("/proc/sys/user/max_user_namespaces").read_text() == before  # the host's is untouched
    assert r.returncode != 0 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "sysctl user.max_user_namespaces" in r.stderr, r.stderr
    assert "unprivileged user namespaces are off here" in r.stderr, r.stderr
    containers = data_home / "labkit" / "containers"
    assert not containers.exists() or list(containers.iterdir()) == []
    assert leftovers() == []


def test_limits_where_a_cgroup_v2_subtree_is_delegated_to_the_user(user):
    """What systemd does for a user's session with Delegate=yes, done by hand: a cgroup
    the user owns (its directory and its cgroup.procs, cgroup.subtree_control and
    cgroup.threads), with the user's process in a leaf below it. labkit nests its groups
    there, and -m applies; on cgroup v1, which is never delegated, the test cannot run."""
    from labkit.kernel import cgroups
    from labkit.kernel.cgroups.detect import v2_base

    if cgroups.version() != 2:
        pytest.skip("cgroup v1 here: only cgroup v2 can be delegated (the v2 guest runs this)")
    entry = user[0]
    home = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1].lstrip("/")
    base = v2_base() / f"lkrootless-{os.getpid()}"  # inside our own tree, where labkit nests too
    leaf = base / "session"
    leaf.mkdir(parents=True)
    try:
        controllers = set((base.parent / "cgroup.subtree_control").read_text().split())
        for name in ("memory", "pids"):
            if name not in controllers:
                (base.parent / "cgroup.subtree_control").write_text(f"+{name}")
        (base / "cgroup.subtree_control").write_text("+memory +pids")
        for path in (base, *(base / f for f in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"))):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chown(leaf, entry.pw_uid, entry.pw_gid)
        os.chown(leaf / "cgroup.procs", entry.pw_uid, entry.pw_gid)
        # the user's session: its processes start in the leaf
        (leaf / "cgroup.procs").write_text("0")  # (this process, for the moment of the fork below)
        try:
            r = as_user(user, "run", "--rm", "-m", "64m", "busybox", "sh", "-c",
                        "cat /sys/fs/cgroup/memory.max; cat /proc/self/cgroup")  # fmt: skip
        finally:
            (home / "cgroup.procs").write_text("0")  # back where we were
        assert r.returncode == 0, r.stderr
        limit, where = r.stdout.split()
        assert limit == str(64 * 1024 * 1024)
        assert where.startswith(f"0::/{base.relative_to('/sys/fs/cgroup')}/labkit/containers/"), where
    finally:
        for d in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir():
                d.rmdir()
        base.rmdir()
