"""The runtime on the real kernel: spec, init's sequence, the lifecycle state machine,
exec, pause, and what a failing create leaves (nothing)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundles import bundle, busybox_rootfs, edit_config, labkit, leftovers, until

from labkit.errors import ExecFailed, InvalidValue, NotFound, StateError, Unsupported
from labkit.kernel import namespaces as ns
from labkit.runtime import container, execute, init, shim, timing
from labkit.runtime.container import Stdio
from labkit.runtime.filesystem import parse_options, secure_join
from labkit.runtime.spec import RUNC_NAMESPACES, Mount, Spec
from labkit.runtime.status import Status

RUNC_TIMENS = (*RUNC_NAMESPACES, "time")


@pytest.fixture
def clean():
    yield
    for cid in container.ids():
        container.delete(cid, force=True)
    assert leftovers() == []


def out_err(tmp_dir):
    """Files for a container's stdout/stderr, and a reader."""
    path = tmp_dir / "out.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    return fd, lambda: path.read_text()


# -- spec: pure ---------------------------------------------------------------------------


def test_spec_round_trips_through_oci_json(tmp_dir):
    from labkit.kernel.cgroups import Limits

    spec = Spec.docker(["sh", "-c", "id"], hostname="box", limits=Limits.parse(memory="64m", cpus=0.5, pids=20),
                       mounts=(Mount("/data", "bind", str(tmp_dir), ("rbind", "ro")),))
    spec.save(tmp_dir)
    back = Spec.load(tmp_dir)
    assert back == spec
    doc = spec.to_oci()
    assert doc["linux"]["resources"] == {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000},
                                         "pids": {"limit": 20}}
    assert len(doc["process"]["capabilities"]["bounding"]) == 14


def test_docker_defaults():
    spec = Spec.docker(["true"])
    assert {m.destination for m in spec.mounts} >= {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"}
    assert "/proc/kcore" in spec.masked_paths and "/proc/sys" in spec.readonly_paths
    assert set(spec.namespaces) == {"mount", "network", "uts", "pid", "ipc"}
    assert not spec.no_new_privileges
    assert Spec.runc().capabilities == ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")


@pytest.mark.parametrize("change, word", [
    ({"args": ()}, "command"),
    ({"env": ("NOEQUALS",)}, "environment"),
    ({"cwd": "relative"}, "working directory"),
    ({"namespaces": ("pid", "pid")}, "namespace list"),
    ({"namespaces": ("pid", "bogus")}, "namespace type"),
    ({"capabilities": ("CAP_FLY",)}, "capability"),
    ({"hostname": "bad host"}, "hostname"),
    ({"uid": -1}, "uid"),
])  # fmt: skip
def test_spec_validation_names_the_bad_value(change, word):
    with pytest.raises(InvalidValue) as info:
        Spec.docker(["true"]).replace(**change).validate()
    assert word in str(info.value)


def test_spec_checks_user_namespaces_and_rejects_missing_bind_sources():
    with pytest.raises(InvalidValue, match="needs both: uidMappings and gidMappings"):
        Spec.docker(["true"], namespaces=("mount", "user")).validate()
    with pytest.raises(InvalidValue, match="id maps need"):  # maps without a user namespace
        Spec.docker(["true"], uid_map=((0, 1000, 1),), gid_map=((0, 1000, 1),)).validate()
    with pytest.raises(InvalidValue, match="do not overlap"):
        Spec.docker(["true"], namespaces=("mount", "user"), uid_map=((0, 1000, 10), (5, 2000, 10)),
                    gid_map=((0, 1000, 1),)).validate()  # fmt: skip
    with pytest.raises(Unsupported, match="joining a user namespace"):
        Spec.docker(["true"], namespace_paths=(("user", "/proc/self/ns/user"),)).validate()
    with pytest.raises(Unsupported, match="joining a pid namespace together with a new user"):
        Spec.docker(["true"], namespaces=("mount", "user"), uid_map=((0, 1000, 1),), gid_map=((0, 1000, 1),),
                    namespace_paths=(("pid", "/proc/self/ns/pid"),)).validate()  # fmt: skip
    ok = Spec.docker(["true"], namespaces=("mount", "user"), uid_map=((0, 1000, 10),), gid_map=((0, 2000, 10),))
    assert ok.validate().root_ids() == (1000, 2000)
    assert Spec.from_oci(ok.to_oci()) == ok
    with pytest.raises(NotFound, match="/no/such/dir"):
        Spec.docker(["true"], mounts=(Mount("/x", "bind", "/no/such/dir", ("rbind",)),)).validate()
    with pytest.raises(InvalidValue, match="needs its own mount namespace"):  # before anything is created
        Spec.docker(["true"], namespaces=("pid", "uts")).validate()


def test_malformed_config_json_is_one_invalid_value(tmp_dir):
    from bundles import edit_config

    from labkit.runtime.spec import Rlimit

    b = bundle(tmp_dir, ["true"])
    edit_config(b, lambda doc: doc["process"]["user"].update(uid="root"))
    with pytest.raises(InvalidValue, match="config.json"):
        Spec.load(b)
    with pytest.raises(InvalidValue, match="rlimit"):
        Spec.docker(["true"], rlimits=(Rlimit("RLIMIT_FILES", 1, 1),)).validate()


def test_secure_join_never_leaves_the_root(tmp_dir):
    root = tmp_dir / "r"
    (root / "etc").mkdir(parents=True)
    os.symlink("/", root / "escape")
    os.symlink("../../../..", root / "etc" / "up")
    assert secure_join(str(root), "/escape/etc") == f"{root}/etc"
    assert secure_join(str(root), "/etc/up/tmp") == f"{root}/tmp"
    assert secure_join(str(root), "../../x") == f"{root}/x"


def test_mount_options_split_into_flags_and_data():
    flags, data = parse_options(("nosuid", "ro", "mode=755", "size=65536k", "rprivate"))
    assert flags == 1 | 2 and data == "mode=755,size=65536k"


# -- lifecycle on the kernel --------------------------------------------------------------


def test_run_reports_exit_code_and_isolates(tmp_dir, clean):
    b = bundle(tmp_dir, ["sh", "-c", "echo pid=$$ host=$(hostname); cat /proc/1/cmdline | head -c 2; exit 3"])
    fd, read = out_err(tmp_dir)
    code = container.run("rt1", Spec.load(b), bundle=b, stdio=Stdio(fd, fd, fd))
    os.close(fd)
    assert code == 3
    assert read().startswith("pid=1 host=runc\nsh")
    assert container.load("rt1").status == Status.STOPPED and container.load("rt1").exit_code == 3


def test_timing_marks_each_phase_of_a_start_only_when_asked(tmp_dir, clean):
    b = bundle(tmp_dir, ["true"])
    marks = tmp_dir / "marks"
    assert labkit("runtime", "run", "--bundle", str(b), "rt-timing").returncode == 0
    assert not marks.exists()  # off by default
    r = labkit("runtime", "run", "--bundle", str(b), "rt-timing", env={**os.environ, "LABKIT_TIMING": str(marks)})
    assert r.returncode == 0, r.stderr
    got = timing.read(marks)
    phases = [phase for phase, _, _ in got]
    # "cgroup" comes first, then again where v1's init joins or v2's waits for the shim
    assert phases[0] == "cgroup" and [p for p in phases if p != "cgroup"] == [
        "namespaces", "namespaces", "mounts", "pivot_root", "created", "capabilities", "exec", "teardown"]
    assert got[-1][1] - got[0][1] < 30e9  # nanoseconds of one clock: the start took less than 30 s
    by: dict[str, set[int]] = {}  # phase -> the pids that marked it
    for phase, _, pid in got:
        by.setdefault(phase, set()).add(pid)
    monitor = by["teardown"]  # the labkit process: it made the cgroup, forked init, waited for it
    assert len(monitor) == 1 and 1 not in monitor
    assert by["cgroup"] == by["namespaces"] == monitor | {1}  # ... and init, PID 1 of its namespace
    assert all(by[phase] == {1} for phase in ("mounts", "pivot_root", "created", "capabilities", "exec"))


def test_state_machine_and_illegal_transitions(tmp_dir, clean):
    b = bundle(tmp_dir, ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; usleep 20000; done"])
    spec = Spec.load(b).replace(readonly=False)
    st = container.create("rt2", spec, bundle=b)
    assert st.status == Status.CREATED
    # created: the user's command has not run, the process is our init blocked on the fifo
    with open(f"/proc/{st.pid}/comm") as f:
        assert f.read().strip() != "sh"
    with pytest.raises(StateError, match="cannot pause container rt2: it is created"):
        container.pause("rt2")
    with pytest.raises(StateError):
        container.resume("rt2")
    container.start("rt2")
    assert container.load("rt2").status == Status.RUNNING
    with pytest.raises(StateError, match="cannot start"):
        container.start("rt2")
    with pytest.raises(StateError, match="cannot delete"):
        container.delete("rt2")
    counter = f"/proc/{st.pid}/root/tmp/n"
    until(lambda: os.path.exists(counter))
    container.pause("rt2")
    assert container.load("rt2").status == Status.PAUSED
    first = Path(counter).read_text()
    time.sleep(0.3)
    assert Path(counter).read_text() == first, "a paused container made progress"
    container.resume("rt2")
    until(lambda: Path(counter).read_text() != first)
    container.kill("rt2", signal.SIGKILL)
    assert container.wait("rt2", 10) == 137
    with pytest.raises(StateError, match="cannot kill"):
        container.kill("rt2")
    container.delete("rt2")
    with pytest.raises(NotFound):
        container.load("rt2")


def test_an_exit_fifo_hears_the_exit_even_of_a_container_that_removes_itself(tmp_dir, clean):
    b = bundle(tmp_dir, ["sh", "-c", "exit 5"])
    container.create("rt40", Spec.load(b), bundle=b, auto_remove=True)  # detached: its shim removes it
    with container.exit_fifo("rt40") as fd:
        assert not select.select([fd], [], [], 0)[0]  # created: nothing to hear yet
        container.start("rt40")
        assert select.select([fd], [], [], 10)[0]
        assert os.read(fd, 64) == b"5\n"
    until(lambda: "rt40" not in container.ids())
    with pytest.raises(NotFound), container.exit_fifo("rt40"):
        pass


def test_exec_joins_namespaces_and_cgroup_of_pid1(tmp_dir, clean):
    b = bundle(tmp_dir, ["sleep", "30"])
    container.create("rt3", Spec.load(b), bundle=b)
    container.start("rt3")
    pid1 = container.load("rt3").pid
    fd, read = out_err(tmp_dir)
    code = execute.exec_in("rt3", ["sh", "-c", "echo $$; cat /proc/self/cgroup; sleep 0.1"], stdio=Stdio(fd, fd, fd),
                           wait=False)
    # while it runs, compare its namespaces with PID 1's from the host side
    host_pid = _child_of(code)
    assert ns.compare(pid1, host_pid).separate == frozenset()
    assert _cgroups(pid1) == _cgroups(host_pid)
    os.waitpid(code, 0)
    os.close(fd)
    lines = read().splitlines()
    assert lines[0] != "1" and any("containers/rt3" in line for line in lines)
    with pytest.raises(ExecFailed, match='exec: "nosuch": executable file not found'):
        execute.exec_in("rt3", ["nosuch"])
    container.stop("rt3", timeout=0.2)


def test_created_means_init_sits_in_its_cgroup(tmp_dir, clean):
    # init sets itself up while the shim moves it into the cgroup: "created" waits for both
    from labkit.kernel import cgroups

    b = bundle(tmp_dir, ["true"])
    fd, _ = out_err(tmp_dir)
    state = container.create("rt6", Spec.load(b), bundle=b, stdio=Stdio(fd, fd, fd))
    os.close(fd)
    for d in cgroups.open(state.cgroup).dirs():  # every v1 hierarchy, or the one v2 directory
        assert (d / "cgroup.procs").read_text().split() == [str(state.pid)], d
    container.delete("rt6")


def test_init_says_created_only_after_the_go_byte(tmp_dir):
    # init's setup overlaps the parent's cgroup move, but "created" must wait for it
    b = bundle(tmp_dir, ["true"])
    os.mkfifo(tmp_dir / "exec.fifo")
    sync_r, sync_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # new namespaces but no new PID one: init.main always ends in os._exit
        try:
            os.close(sync_r)
            os.close(go_w)
            ctx = init.Context(Spec.load(b), str(b / "rootfs"), str(tmp_dir / "exec.fifo"), sync_w, go_r)
            init.main(ctx)
        finally:
            os._exit(1)
    os.close(sync_w)
    os.close(go_r)
    try:
        assert select.select([sync_r], [], [], 0.5)[0] == []  # set up, yet silent
        os.write(go_w, b"g")
        assert select.select([sync_r], [], [], 10)[0] and os.read(sync_r, 100) == b"created\n"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(sync_r)
        os.close(go_w)


def test_runtime_run_loads_only_what_it_needs():
    """Imports are most of a Python runtime's start: init's modules load in the child
    (while the kernel moves it into its cgroup), and these not at all."""
    light = ["typing", "socket", "shutil", "labkit.runtime.init", "labkit.engine.images"]
    code = ("import sys, json; from labkit.cli import build_parser; "
            "parser, _ = build_parser('runtime'); parser.parse_args(['run', 'c1']); "
            "import labkit.runtime.container, labkit.kernel.cgroups; "
            f"print(json.dumps([m for m in {light!r} if m in sys.modules]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_missing_command_fails_create_and_leaves_nothing(tmp_dir, clean):
    b = bundle(tmp_dir, ["nosuch-command"])
    with pytest.raises(ExecFailed) as info:
        container.create("rt4", Spec.load(b), bundle=b)
    assert info.value.exit_code == 127 and '"nosuch-command": executable file not found in $PATH' in str(info.value)
    (tmp_dir / "rootfs" / "bin" / "noexec").write_text("not a program")
    b = bundle(tmp_dir, ["/bin/noexec"])
    with pytest.raises(ExecFailed) as info:
        container.create("rt4", Spec.load(b), bundle=b)
    assert info.value.exit_code == 126
    assert leftovers() == []


def test_create_gives_up_on_an_init_that_hangs(tmp_dir, clean, monkeypatch):
    # init's setup is stalled (think of a bind mount of a hung network share): create
    # must stop waiting after CREATE_TIMEOUT, kill it and remove what it made
    real_setup = init.setup

    def stalled(ctx):
        time.sleep(5)
        return real_setup(ctx)

    monkeypatch.setattr(init, "setup", stalled)  # the forked init runs this copy
    monkeypatch.setattr(shim, "CREATE_TIMEOUT", 0.5)
    b = bundle(tmp_dir, ["true"])
    started = time.monotonic()
    with pytest.raises(StateError, match="gave no answer"):
        container.create("rt7", Spec.load(b), bundle=b, detach=False)
    assert time.monotonic() - started < 3
    assert leftovers() == []


def test_symlinks_in_rootfs_cannot_reach_host_paths(tmp_dir, clean):
    host = tmp_dir / "host"
    host.mkdir()
    root = busybox_rootfs(tmp_dir / "rootfs")
    (root / "dev").rmdir()
    os.symlink(str(host), root / "dev")  # /dev -> an absolute host path
    b = bundle(tmp_dir, ["sh", "-c", "ls /dev/null"])
    assert container.run("rt5", Spec.load(b), bundle=b) == 0
    assert list(host.iterdir()) == [], "device nodes were made in a host directory"


def test_wrong_ids_and_missing_rootfs(tmp_dir, clean):
    b = bundle(tmp_dir, ["true"])
    with pytest.raises(InvalidValue, match="container id"):
        container.create("../x", Spec.load(b), bundle=b)
    with pytest.raises(NotFound, match="root filesystem"):
        container.create("rt6", Spec.load(b).replace(rootfs="nope"), bundle=b)
    assert leftovers() == []


# -- time and cgroup namespaces -----------------------------------------------------------

DAY = 86400


def test_time_offsets_round_trip_and_are_checked(tmp_dir):
    timens = RUNC_TIMENS
    spec = Spec.runc(namespaces=timens, time_offsets=(("boottime", DAY, 0), ("monotonic", -5, 250)))
    assert spec.to_oci()["linux"]["timeOffsets"] == {"boottime": {"secs": DAY, "nanosecs": 0},
                                                     "monotonic": {"secs": -5, "nanosecs": 250}}
    spec.save(tmp_dir)
    assert Spec.load(tmp_dir) == spec.validate()
    bad = [
        ({"namespaces": RUNC_NAMESPACES}, "expected a new time namespace with them"),
        ({"time_offsets": (("realtime", 1, 0),)}, "invalid clock in linux.timeOffsets 'realtime'"),
        ({"time_offsets": (("boottime", 1, 0), ("boottime", 2, 0))}, "each at most once"),
        ({"time_offsets": (("boottime", 2**62, 0),)}, "invalid linux.timeOffsets.boottime.secs"),
        ({"time_offsets": (("boottime", 1.5, 0),)}, "invalid linux.timeOffsets.boottime.secs"),
        ({"time_offsets": (("monotonic", 1, 10**9),)}, "invalid linux.timeOffsets.monotonic.nanosecs"),
    ]
    for change, message in bad:
        with pytest.raises(InvalidValue, match=re.escape(message)):
            spec.replace(**change).validate()


def test_time_offsets_are_seen_inside_and_by_exec(tmp_dir, clean):
    # boottime shifts /proc/uptime; the offsets are the namespace's; PID 1 itself is in it
    # (older kernels, as 6.1, move only its children in at execve); labkit exec joins it
    b = bundle(tmp_dir, ["sh", "-c", "cat /proc/uptime /proc/self/timens_offsets; readlink /proc/1/ns/time"],
               namespaces=RUNC_TIMENS)
    edit_config(b, lambda doc: doc["linux"].update(
        timeOffsets={"boottime": {"secs": DAY, "nanosecs": 0}, "monotonic": {"secs": 3600, "nanosecs": 0}}))
    before = _uptime()
    r = labkit("runtime", "run", "--bundle", str(b), "rt-time")
    after = _uptime()
    assert r.returncode == 0, r.stderr
    uptime, monotonic, boottime, ns_inside = r.stdout.splitlines()
    assert before + DAY <= float(uptime.split()[0]) <= after + DAY + 0.01
    assert monotonic.split() == ["monotonic", "3600", "0"] and boottime.split() == ["boottime", str(DAY), "0"]
    assert ns_inside != os.readlink("/proc/self/ns/time")

    b = bundle(tmp_dir, ["sleep", "30"], namespaces=RUNC_TIMENS, time_offsets=(("boottime", DAY, 0),))
    container.create("rt-time2", Spec.load(b), bundle=b)
    container.start("rt-time2")
    fd, read = out_err(tmp_dir)
    before = _uptime()
    assert execute.exec_in("rt-time2", ["cat", "/proc/uptime"], stdio=Stdio(fd, fd, fd)) == 0
    os.close(fd)
    assert before + DAY <= float(read().split()[0]) <= _uptime() + DAY + 0.01
    container.stop("rt-time2", timeout=0.2)


def test_time_offsets_without_a_time_namespace_fail_before_anything_is_made(tmp_dir, clean):
    b = bundle(tmp_dir, ["true"])
    edit_config(b, lambda doc: doc["linux"].update(timeOffsets={"boottime": {"secs": DAY, "nanosecs": 0}}))
    r = labkit("runtime", "run", "--bundle", str(b), "rt-notime")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["labkit: invalid linux.timeOffsets {'boottime': {'secs': 86400, "
                                             "'nanosecs': 0}}: expected a new time namespace with them: "
                                             "{'type': 'time'} in linux.namespaces"]
    assert leftovers() == []


def test_cgroup_namespace_views(tmp_dir, clean):
    """Without a cgroup namespace (labkit's and Docker's default on v1; Docker makes one on
    v2, labkit does not yet) /proc/self/cgroup shows the host's paths of the container's
    groups; with one, the container's groups are the roots: every line, v1 hierarchies
    and v2's "0::" alike, ends in "/"."""
    from labkit.kernel import cgroups

    show = ["cat", "/proc/self/cgroup"]
    for cid, namespaces in (("rt-cg-host", RUNC_NAMESPACES), ("rt-cg-own", (*RUNC_NAMESPACES, "cgroup"))):
        b = bundle(tmp_dir, show, namespaces=namespaces)
        fd, read = out_err(tmp_dir)
        assert container.run(cid, Spec.load(b), bundle=b, stdio=Stdio(fd, fd, fd)) == 0
        os.close(fd)
        lines = read().splitlines()
        paths = {line.split(":", 2)[2] for line in lines}
        if "cgroup" in namespaces:
            assert paths == {"/"}, lines
        else:
            assert any(p.endswith(f"/containers/{cid}") for p in paths), lines
        if cgroups.version() == 2:
            assert len(lines) == 1 and lines[0].startswith("0::"), lines
        else:  # every v1 hierarchy has its line, then the (empty) v2 one of a hybrid host
            assert "memory" in {c for line in lines for c in line.split(":")[1].split(",")}, lines
        container.delete(cid)


# -- helpers ------------------------------------------------------------------------------


def _child_of(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _cgroups(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        return sorted(line.split(":", 1)[1] for line in f)


def test_the_transition_table_gives_the_result_or_a_clear_error():
    from labkit.runtime import status

    assert status.check("start", "c1", Status.CREATED) is Status.RUNNING
    assert status.check("stop", "c1", Status.STOPPED) is Status.STOPPED  # stop has its row too
    with pytest.raises(StateError, match=r"cannot pause container c1: it is created \(must be running\)"):
        status.check("pause", "c1", Status.CREATED)
    for verb, (allowed, result) in status.TRANSITIONS.items():
        assert allowed and all(isinstance(s, Status) for s in allowed), verb
        assert result is None or isinstance(result, Status), verb


def test_a_program_on_a_noexec_mount_is_one_line_that_says_so(tmp_dir):
    """/run is mounted noexec on some systems (Debian 13): a plain directory there, as a
    root to pivot into, cannot run its programs, and the error must say why instead of a
    bare EACCES. (The runtime's own root is a bind mount of its own: a bundle there runs.)"""
    from labkit.kernel import syscalls

    place = tmp_dir / "noexec"
    place.mkdir()
    syscalls.mount("tmpfs", place, "tmpfs", syscalls.MountFlags.MS_NOEXEC)
    try:
        rootfs = busybox_rootfs(place / "root")
        with pytest.raises(Exception, match=r"EACCES.*/bin/sleep lies on a mount with noexec"):
            with ns.spawn(["/bin/sleep", "1"], new={"mnt", "pid"}, root=rootfs):
                pass
        bundle(place / "b", ["true"])
        r = labkit("runtime", "run", "--bundle", str(place / "b"), "noexec1")
        assert r.returncode == 0, r.stderr
    finally:
        syscalls.umount2(place)
    assert leftovers() == []
