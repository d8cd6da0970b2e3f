"""Namespaces on the real kernel: for every kind, a spawned child has its own namespace,
and a change made inside it cannot be seen from the host."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from labkit.errors import InvalidValue, NotFound, SyscallError
from labkit.kernel import namespaces as ns
from labkit.kernel.namespaces import Kind, nsenter


def wait_for_sleep(pid, timeout=5.0):
    """Wait until the setup script has exec'd `sleep`: then its changes are all made."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "sleep":
                return
        assert time.monotonic() < deadline, "the setup script did not finish"
        time.sleep(0.005)


@pytest.fixture
def sleeper():
    """Start `sleep` in new namespaces after a setup script; killed after the test."""
    started = []

    def start(new, script="", **kw):
        p = ns.spawn(["sh", "-c", f"{script}\nexec sleep 30"], new, **kw)
        started.append(p)
        wait_for_sleep(p.pid)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_every_kind_gets_its_own_inode():
    for kind in Kind:
        if not os.path.exists(f"/proc/self/ns/{kind.value}"):
            continue
        extra = {"uid_map": "root", "gid_map": "root"} if kind is Kind.USER else {}
        r = ns.run(lambda: ns.namespaces_of("self"), new={kind}, **extra)
        assert r.returncode == 0, r.stderr
        inside, host = r.value, ns.namespaces_of()
        assert inside[kind] != host[kind], kind
        others = [k for k in host if k is not kind and k is not Kind.USER]
        assert all(inside[k] == host[k] for k in others), f"{kind}: only it should differ"


def test_uts_hostname_is_private():
    before = socket.gethostname()
    r = ns.run(lambda: socket.gethostname(), new={"uts"}, hostname="inside-box")
    assert r.value == "inside-box"
    assert socket.gethostname() == before


def host_queues():
    with open("/proc/sysvipc/msg") as f:
        return f.read().splitlines()[1:]


def test_ipc_objects_are_private(sleeper):
    before = host_queues()
    p = sleeper({"ipc"}, "ipcmk -Q >/dev/null")
    inside = ns.enter(p.pid, ["cat", "/proc/sysvipc/msg"], {"ipc"})
    assert len(inside.stdout.splitlines()[1:]) == 1  # the queue it made
    assert host_queues() == before


def test_pid_namespace_child_is_pid_1_and_sees_only_its_own():
    r = ns.run(["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"], new={"pid", "mnt"})
    me, count = r.stdout.split()
    assert me == "1"
    assert int(count) <= 3  # sh, ls, grep: not the host's processes


def test_pid_as_seen_from_host_is_not_1(sleeper):
    p = sleeper({"pid", "mnt"})
    assert p.pid != 1
    with open(f"/proc/{p.pid}/status") as f:
        nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
    assert nspid[0] == str(p.pid) and nspid[-1] == "1"


def test_mount_is_private(sleeper, tmp_dir):
    target = tmp_dir / "m"
    target.mkdir()
    p = sleeper({"mnt"}, f"mount -t tmpfs inside {target}")
    inside = ns.enter(p.pid, ["cat", "/proc/self/mountinfo"], {"mnt"})
    assert str(target) in inside.stdout
    with open("/proc/self/mountinfo") as f:
        assert str(target) not in f.read()


def test_network_namespace_has_its_own_interfaces(sleeper):
    p = sleeper({"net"}, "ip link add lkt0 type veth peer name lkt1")
    inside = ns.enter(p.pid, ["ip", "-o", "link"], {"net"})
    names = {line.split(":")[1].strip().split("@")[0] for line in inside.stdout.splitlines()}
    assert names == {"lo", "lkt0", "lkt1"}
    assert not {"lkt0", "lkt1"} & set(os.listdir("/sys/class/net"))


def test_user_namespace_maps_root_to_an_unprivileged_id(sleeper):
    p = sleeper({"user"}, uid_map=[(0, 100000, 65536)], gid_map=[(0, 100000, 65536)])
    inside = ns.enter(p.pid, ["id", "-u"], {"user"})
    assert inside.stdout.strip() == "0"
    with open(f"/proc/{p.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert uids == ["100000"] * 4
    with open(f"/proc/{p.pid}/setgroups") as f:
        assert f.read().strip() == "deny"


def test_cgroup_namespace_hides_the_path():
    r = ns.run(["cat", "/proc/self/cgroup"], new={"cgroup"})
    inside = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in r.stdout.splitlines()}
    assert all(path == "/" for path in inside.values())


def test_time_namespace_shifts_boottime():
    r = ns.run(["cat", "/proc/uptime"], new={"time"}, time_offsets={"boottime": 86400})
    with open("/proc/uptime") as f:
        host = float(f.read().split()[0])
    assert float(r.stdout.split()[0]) - host > 86000


def test_enter_lands_in_the_targets_namespaces(sleeper):
    p = sleeper({"uts", "ipc", "pid", "mnt", "net"}, hostname="target")
    r = ns.enter(p.pid, lambda: (ns.namespaces_of("self"), socket.gethostname()))
    mine, hostname = r.value
    theirs = ns.namespaces_of(p.pid)
    assert hostname == "target"
    for kind in (Kind.UTS, Kind.IPC, Kind.PID, Kind.MNT, Kind.NET):
        assert mine[kind] == theirs[kind], kind


def test_compare_says_what_is_shared(sleeper):
    p = sleeper({"uts", "net"})
    c = ns.compare(p.pid)
    assert {Kind.UTS, Kind.NET} == set(c.separate)
    assert Kind.PID in c.shared and Kind.MNT in c.shared


def test_exit_codes_and_signals():
    assert ns.run(["sh", "-c", "exit 7"], new={"pid", "mnt"}).returncode == 7
    with ns.spawn(["sleep", "30"], new={"pid", "mnt"}) as p:
        p.kill()
        assert p.wait(timeout=5) == -9


def test_context_manager_kills_and_reaps_the_child():
    with ns.spawn(["sleep", "30"], new={"uts", "pid", "mnt"}) as p:
        pid, child = p.pid, p._child
    assert p.returncode == -9
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(f"/proc/{child}")


def test_pivot_root_into_a_directory(tmp_dir):
    root = tmp_dir / "root"
    (root / "bin").mkdir(parents=True)
    (root / "proc").mkdir()
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    r = ns.run(["/bin/busybox", "sh", "-c", "/bin/busybox ls /; echo $$"], new={"mnt", "pid"}, root=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["bin", "proc", "1"]


def test_a_missing_command_fails_in_the_caller():
    with pytest.raises(SyscallError) as e:
        ns.run(["no-such-command-here"], new={"uts"})
    assert e.value.errno == 2 and "execvp('no-such-command-here')" in str(e.value)


def test_bad_options_fail_before_anything_starts():
    with pytest.raises(InvalidValue, match="namespace kind 'utz'"):
        ns.spawn(["true"], new={"utz"})
    with pytest.raises(InvalidValue, match="hostname"):
        ns.spawn(["true"], hostname="x")
    with pytest.raises(InvalidValue, match="id map"):
        ns.spawn(["true"], new={"user"}, uid_map=[(0, 1)])


def test_the_callers_pid_for_children_is_restored():
    # spawn() makes the child PID 1 by switching our pid_for_children for one fork
    r = ns.run(["true"], new={"pid"})
    assert r.returncode == 0
    assert os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
    assert ns.run(lambda: os.getpid()).value != 1  # a plain child is no PID 1


def _children() -> set[int]:
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.add(int(entry))
            except (OSError, IndexError):
                pass
    return kids


def test_an_id_map_the_kernel_refuses_fails_in_one_line_and_leaves_no_child():
    before = _children()
    # overlapping ranges pass labkit's form check; the kernel refuses them with EINVAL
    with pytest.raises(SyscallError, match=r"uid_map.*EINVAL.*overlap"):
        ns.spawn(["true"], new={"user"}, uid_map=[(0, 0, 10), (5, 100, 1)])
    time.sleep(0.1)
    assert _children() - before == set()  # the child that waited for its map is gone and reaped


def test_a_pid_that_does_not_exist_is_not_found():
    from labkit.errors import NotFound

    with pytest.raises(NotFound, match="no process with pid 999999999"):
        ns.namespaces_of(999999999)


def test_enter_a_process_that_is_gone_is_one_line_and_leaks_nothing(monkeypatch):
    with pytest.raises(NotFound, match="ended before"):
        nsenter._open_namespaces(2**22 + 7, frozenset({Kind.UTS}))  # above pid_max: no such process
    # the process ends after its namespace files were opened, before its cwd was
    real_open = os.open

    def open_until_cwd(path, *args, **kw):
        if str(path).endswith("/cwd"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kw)

    fds_before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "open", open_until_cwd)
    with pytest.raises(NotFound, match="ended before"):
        nsenter._open_namespaces(os.getpid(), frozenset({Kind.UTS, Kind.IPC, Kind.MNT}))
    monkeypatch.undo()
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
