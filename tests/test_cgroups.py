"""labkit.kernel.cgroups on the real kernel: limits hold, accounting counts, nothing is left.

The same module runs on this cgroup v1 (hybrid) host and inside labkit's cgroup v2 VM,
so it needs only labkit, pytest, /bin/sh-free Python children (sys.executable) and the
kernel. Each workload is a small Python child that waits on stdin until it has been
put in its group, so everything it does is charged there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.errors import AlreadyExists, CgroupError, InvalidValue, NotFound, StateError, Unsupported
from labkit.kernel import cgroups
from labkit.kernel.cgroups import detect, limits, v1, v2

VERSION = cgroups.version()
AVAILABLE = cgroups.available_controllers()
MiB = 1024 * 1024
_BACKING_FILES: list[str] = []  # loop device backing files this module made


def need(*controllers: str) -> None:
    missing = [c for c in controllers if c not in AVAILABLE]
    if missing:
        pytest.skip(f"cgroup {cgroups.mode()} here lacks the {', '.join(missing)} controller")


@pytest.fixture
def make():
    """create() that removes (after killing) whatever the test made, even on failure."""
    made = []

    def _make(name: str, **given):
        cg = cgroups.create(name, **given)
        made.append(cg)
        return cg

    yield _make
    for cg in reversed(made):
        if cg.exists():
            cg.kill()
            cg.remove()


def spawn(cg, code: str, *args: str) -> subprocess.Popen:
    """A Python child that starts ``code`` only once it sits in ``cg``."""
    gate = "import sys; sys.stdin.readline()\n"
    child = subprocess.Popen([sys.executable, "-c", gate + code, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    cg.add(child.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    return child


def finish(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.communicate(timeout=10)


def usage_over(groups, seconds: float) -> list[float]:
    """CPU seconds each group used during ``seconds`` of wall time, per wall second."""
    before = [g.stats().cpu_usage_ns for g in groups]
    start = time.monotonic()
    time.sleep(seconds)
    after = [g.stats().cpu_usage_ns for g in groups]
    wall = time.monotonic() - start
    return [(a - b) / 1e9 / wall for a, b in zip(after, before, strict=True)]


BUSY = "import time\nend = time.monotonic() + 10\nwhile time.monotonic() < end: pass\n"


# -- parsing and validation: no kernel object involved -----------------------------------

def test_sizes_and_cpus_parse_like_docker():
    got = cgroups.Limits.parse(memory="64m", memory_swap="1g", cpus=0.5, pids=20, cpu_shares="512")
    assert got.memory == 64 * MiB and got.memory_swap == 1024 * MiB
    assert got.cpu_quota_us == 50_000 and got.cpus == 0.5 and got.pids == 20
    assert (got.shares(), got.weight()) == (512, 59)
    assert limits.parse_size(4096) == 4096 and limits.parse_size("1.5k") == 1536
    assert limits.parse_size("2GB") == 2 * 1024 * MiB
    assert cgroups.Limits.parse(pids="max", memory="8m", memory_swap=-1).given() == {
        "pids": -1, "memory": 8 * MiB, "memory_swap": -1}


@pytest.mark.parametrize("given, message", [
    ({"memory": "64XB"},
     "invalid memory limit '64XB': expected a number with an optional unit b, k, m or g, e.g. 64m"),
    ({"memory": -5}, "invalid memory limit -5"),
    ({"cpus": -1}, "invalid cpus -1: expected a number of CPUs from 0.01 to"),
    ({"cpus": "half"}, "invalid cpus 'half'"),
    ({"pids": "abc"}, "invalid pids limit 'abc': expected a whole number from 1 to"),
    ({"pids": 0}, "invalid pids limit 0"),
    ({"cpu_shares": 1}, "invalid cpu_shares 1: expected a whole number from 2 to 262144"),
    ({"cpu_weight": 20000}, "invalid cpu_weight 20000"),
    ({"cpu_shares": 512, "cpu_weight": 50}, "only one of cpu_shares"),
    ({"memory": "64m", "memory_swap": "32m"}, "invalid memory_swap limit '32m': expected at least"),
    ({"memory_swap": "1g"}, "expected memory set as well"),
    ({"cpuset_cpus": "1-0"}, "invalid cpuset_cpus '1-0'"),
    ({"cpuset_cpus": "0,x"}, "invalid cpuset_cpus '0,x'"),
    ({"cpuset_cpus": "4096"}, "invalid cpuset_cpus '4096'"),
    ({"io_read_bps": "/dev/null:1m"}, "(/dev/null is not a block device)"),
    ({"io_read_bps": "/dev/nope:1m"}, "(/dev/nope does not exist)"),
    ({"io_write_iops": "1m"}, "expected DEVICE:RATE"),
    ({"swap": "1g"}, "invalid limit name 'swap'"),
])
def test_bad_values_fail_before_a_cgroup_exists(given, message):
    with pytest.raises(InvalidValue) as err:
        cgroups.create("t-bad", **given)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not any(p.exists() for p in cgroups.where("t-bad").values())


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "/abs", "a//b", "a/", "x.y", "cpu.max", "a b"])
def test_bad_names_are_rejected(name):
    with pytest.raises(InvalidValue, match="invalid cgroup name"):
        cgroups.create(name, pids=5)


def test_shares_weight_curve_matches_runc():
    shares = (0, 2, 512, 1024, 2048, 262144)
    assert [cgroups.shares_to_weight(s) for s in shares] == [0, 1, 59, 100, 174, 10000]
    for weight in (1, 2, 50, 100, 300, 5000, 10000):  # the inverse round-trips
        assert cgroups.shares_to_weight(cgroups.weight_to_shares(weight)) in (weight, weight + 1)


def test_parsers_on_made_up_files():
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 /ctr /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    mounts = detect.parse_mountinfo(mountinfo)
    assert mounts == [detect.Mount("/sys/fs/cgroup/cpu,cpuacct", "/", ("cpu", "cpuacct")),
                      detect.Mount("/sys/fs/cgroup/my mem", "/ctr", ("memory",))]
    assert detect.parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n0::/user.slice\n") == {
        "memory": "/a/b", "cpu": "/", "cpuacct": "/", "": "/user.slice"}
    assert detect.own_base("/x/labkit/containers/c1") == "/x" and detect.own_base("/") == "/"
    io = v2.parse_io_stat("7:0 rbytes=4096 wbytes=512 rios=1 wios=2 dbytes=0 dios=0\n")
    assert io == {"7:0": cgroups.IoStat(4096, 512, 1, 2)}
    io = v1.parse_blkio("7:0 Read 4096\n7:0 Write 0\n7:0 Total 4096\nTotal 4096\n",
                        "7:0 Read 1\n7:0 Write 0\n7:0 Total 1\nTotal 1\n")
    assert io == {"7:0": cgroups.IoStat(4096, 0, 1, 0)}


# -- groups on the real kernel ------------------------------------------------------------

def test_mode_and_controllers():
    assert cgroups.mode() in ("v1", "hybrid", "v2")
    assert (VERSION == 2) == (cgroups.mode() == "v2")
    assert {"memory", "pids"} <= AVAILABLE


def test_create_nest_open_list_remove(make):
    top = make("t-nest", pids=50)
    inner = make("t-nest/a/b", pids=5)
    assert set(cgroups.list_all()) >= {"t-nest", "t-nest/a", "t-nest/a/b"}
    for controller, path in inner.paths.items():
        assert path.is_dir() and path.parts[-4:] == ("labkit", "t-nest", "a", "b"), controller
    assert cgroups.open("t-nest/a/b").stats().pids_limit == 5
    with pytest.raises(AlreadyExists):
        cgroups.create("t-nest", pids=5)
    with pytest.raises(NotFound, match="no labkit cgroup named 't-none'"):
        cgroups.open("t-none")
    top.remove()  # takes the nested groups with it, deepest first
    assert not inner.exists() and not top.exists()
    assert not [n for n in cgroups.list_all() if n.startswith("t-nest")]
    deep = make("t-deep/x")
    deep.remove()  # the empty "t-deep" it made on the way goes too
    assert not [n for n in cgroups.list_all() if n.startswith("t-deep")]


def test_errors_name_the_file_and_value(make):
    cg = make("t-err", pids=5)
    with pytest.raises(CgroupError) as err:
        cg.add(2**22 + 1)  # above PID_MAX_LIMIT: no such process
    assert f"failed to write '{2**22 + 1}' to " in str(err.value) and "cgroup.procs: " in str(err.value)
    assert err.value.errno in (3, 22)  # ESRCH, or EINVAL on some kernels


def test_unsupported_limit_is_refused_before_creating(make):
    if VERSION == 1:
        with pytest.raises(Unsupported, match="memory_high needs cgroup v2"):
            cgroups.create("t-high", memory_high="32m")
        assert not any(p.exists() for p in cgroups.where("t-high").values())
    else:
        cg = make("t-high", memory_high="32m")
        assert (cg.path / "memory.high").read_text().strip() == str(32 * MiB)


def test_set_changes_limits_of_a_live_group(make):
    need("pids", "memory")
    cg = make("t-set", pids=10, memory="64m")
    cg.set(pids=25, memory="128m")
    got = cg.stats()
    assert (got.pids_limit, got.memory_limit) == (25, 128 * MiB)
    cg.set(pids=-1)
    assert cg.stats().pids_limit is None
    with pytest.raises(InvalidValue):
        cg.set(pids="lots")
    assert cg.stats().pids_limit is None


def test_memory_limit_oom_kills_the_child_only(make):
    need("memory")
    cg = make("t-mem", memory="32m", memory_swap="32m")
    hog = "chunks = []\nfor i in range(256): chunks.append(b'x' * (1 << 20))\nprint('survived')\n"
    child = spawn(cg, hog)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -9 and "survived" not in out  # SIGKILL from the OOM killer
    got = cg.stats()
    assert got.oom_kills is not None and got.oom_kills >= 1
    assert cg.oom_kills() == got.oom_kills  # the one-file read the runtime's shim uses
    assert got.memory_limit == 32 * MiB
    if VERSION == 1:  # Docker's memory+swap total, or v2's swap alone: no swap at all here
        assert (cg.paths["memory"] / "memory.memsw.limit_in_bytes").read_text().strip() == str(32 * MiB)
    else:
        assert (cg.path / "memory.swap.max").read_text().strip() == "0"
    assert got.memory_peak is None or got.memory_peak <= 32 * MiB + 64 * 1024


def test_fork_loop_stops_at_the_pids_limit(make):
    need("pids")
    cg = make("t-pids", pids=10)
    loop = (
        "import os, sys\nr, w = os.pipe()\nmade = refused = 0\n"
        "for i in range(40):\n"
        "    try:\n        pid = os.fork()\n"
        "    except BlockingIOError:\n        refused += 1\n        continue\n"
        "    if pid == 0:\n        os.close(w); os.read(r, 1); os._exit(0)\n"
        "    made += 1\n"
        "print(made, refused, flush=True)\nsys.stdin.readline()\nos.close(w)\n"
        "for i in range(made): os.wait()\n")
    child = spawn(cg, loop)
    try:
        made, refused = map(int, child.stdout.readline().split())
        assert (made, refused) == (9, 31)  # the loop's own process is the 10th
        got = cg.stats()
        assert got.pids_current == 10 and got.pids_limit == 10
        if got.pids_refused is not None:  # pids.events; the kernel counts each refused fork
            assert got.pids_refused == 31
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=10)
    finally:
        finish(child)


def test_cpu_quota_holds_a_busy_loop_near_20_percent(make):
    need("cpu")
    cg = make("t-quota", cpus=0.2)
    child = spawn(cg, BUSY)
    try:
        time.sleep(0.2)  # past the Python start-up
        samples = cgroups.record(cg, seconds=1.5, interval=0.25)
        got = cg.stats()
    finally:
        finish(child)
    used = sum(s.cpu_percent for s in samples) / len(samples)
    # The quota is a hard ceiling (20 ms per 100 ms); a busy host may give less, not more.
    assert 12.0 <= used <= 26.0, f"{used:.1f}% of a CPU under cpus=0.2"
    assert len(samples) == 6 and got.nr_throttled and got.nr_throttled > 0


def test_cpu_weights_split_one_cpu_one_to_three(make):
    need("cpu")
    spelling = "cpu_weight" if VERSION == 2 else "cpu_shares"
    light, heavy = (100, 300) if VERSION == 2 else (256, 768)
    pin = {"cpuset_cpus": "0"} if "cpuset" in AVAILABLE else {}
    code = ("import os\n" + ("" if pin else "os.sched_setaffinity(0, {0})\n")
            + "print(sorted(os.sched_getaffinity(0)), flush=True)\n" + BUSY)
    groups = [make("t-w1", **{spelling: light}, **pin), make("t-w3", **{spelling: heavy}, **pin)]
    children = [spawn(g, code) for g in groups]
    try:
        assert [c.stdout.readline().strip() for c in children] == ["[0]", "[0]"]
        time.sleep(0.2)
        a, b = usage_over(groups, 1.2)
    finally:
        for c in children:
            finish(c)
    # CFS shares CPU 0 in proportion to the weights: expect 3.0, allow 2.2 to 4.0
    assert 2.2 <= b / a <= 4.0, f"split {a:.2f}:{b:.2f} CPU"


LOOP_CTL_GET_FREE, LOOP_SET_FD, LOOP_CLR_FD = 0x4C82, 0x4C00, 0x4C01  # linux/loop.h


@contextlib.contextmanager
def loop_device(backing: Path):
    """losetup, in Python: attach ``backing`` to a free /dev/loopN; detach at the end."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: this kernel lacks loop devices (modprobe loop)")
    _BACKING_FILES.append(str(backing))
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(10):  # another program may grab the free device first: EBUSY
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = os.open(f"/dev/loop{n}", os.O_RDWR | os.O_CLOEXEC)
            back = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(dev, LOOP_SET_FD, back)
                break
            except OSError:
                os.close(dev)
            finally:
                os.close(back)
        else:
            pytest.fail("no free loop device after 10 tries")
    finally:
        os.close(ctl)
    try:
        yield f"/dev/loop{n}"
    finally:
        fcntl.ioctl(dev, LOOP_CLR_FD, 0)
        os.close(dev)


def test_read_throttle_on_a_loop_device(make, tmp_dir):
    need("io" if VERSION == 2 else "blkio")
    backing = tmp_dir / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    size = 3 * MiB // 2
    reader = (  # O_DIRECT: the page cache would answer repeated reads without the device
        "import mmap, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)\n"
        "buf = mmap.mmap(-1, 65536)\ndone, start = 0, time.monotonic()\n"
        f"while done < {size}: done += os.preadv(fd, [buf], done)\n"
        "print(time.monotonic() - start, flush=True)\n")
    with loop_device(backing) as dev:
        cg = make("t-io", io_read_bps=f"{dev}:1m")
        child = spawn(cg, reader, dev)
        out, _ = child.communicate(timeout=20)
        assert child.returncode == 0
        rate = size / float(out) / MiB
        st = os.stat(dev)
        counted = cg.stats().io.get(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        cg.remove()
    # 1 MiB/s, allowing for the first request passing at once and for scheduling noise
    assert 0.7 <= rate <= 1.3, f"read at {rate:.2f} MiB/s under a 1 MiB/s limit"
    assert counted is not None and counted.read_bytes >= size and counted.read_ops >= size // 65536


def test_freeze_stops_progress_and_thaw_resumes(make, tmp_dir):
    need("freezer") if VERSION == 1 else None
    counter = tmp_dir / "count"
    code = ("import os, sys, time\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\nn = 0\n"
            "end = time.monotonic() + 20\nwhile time.monotonic() < end:\n"
            "    n += 1\n    os.pwrite(fd, b'%12d' % n, 0)\n    time.sleep(0.002)\n")
    cg = make("t-freeze")
    child = spawn(cg, code, str(counter))

    def count() -> int:
        text = counter.read_text().strip() if counter.exists() else ""
        return int(text or 0)

    try:
        deadline = time.monotonic() + 10
        while count() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        cg.freeze()
        assert cg.is_frozen
        frozen_at = count()
        time.sleep(0.3)
        assert count() == frozen_at, "a frozen process kept counting"
        cg.thaw()
        assert not cg.is_frozen
        time.sleep(0.3)
        assert count() > frozen_at + 10, "the process did not resume after thaw"
        cg.freeze()
        cg.kill()  # docker kill of a paused container: SIGKILL reaches frozen tasks too
        assert child.wait(timeout=5) == -9 and cg.procs() == []
    finally:
        finish(child)


def test_remove_waits_for_processes_and_kill_empties(make):
    cg = make("t-kill")
    child = spawn(cg, "import time\ntime.sleep(30)\n")
    with pytest.raises(StateError, match="still in it"):
        cg.remove(timeout=0.2)
    assert cg.exists() and cg.procs() == [child.pid]
    cg.kill()
    assert cg.procs() == []
    child.wait(timeout=5)
    cg.remove()
    assert not cg.exists()


def test_close_kills_removes_and_can_keep_the_parents(make):
    cg = make("t-keep/c1", pids=10)
    assert cg.oom_kills() in (0, None)  # None: a kernel that does not count them
    child = spawn(cg, "import time\ntime.sleep(30)\n")
    cg.close(keep_parents=True)  # as the runtime does for containers/<id>
    assert child.wait(timeout=5) == -9 and not cg.exists()
    parent = cgroups.open("t-keep")  # kept, and empty
    assert parent.procs(recursive=True) == []
    empty = make("t-keep/c2")
    empty.close()  # an empty group: one rmdir per directory, then the empty parents
    assert not empty.exists() and not parent.exists()


def test_context_manager_kills_and_removes():
    with cgroups.create("t-with", pids=10) as cg:
        child = spawn(cg, "import time\ntime.sleep(30)\n")
    assert child.wait(timeout=5) == -9
    assert not cg.exists()


def test_watch_samples_until_the_group_empties(make):
    cg = make("t-watch", pids=10)
    child = spawn(cg, "import time\ntime.sleep(0.5)\n")
    samples = list(cg.watch(interval=0.1))  # no duration: ends when the child has exited
    child.wait(timeout=5)
    assert 3 <= len(samples) <= 30
    assert samples[0].pids == 1 and samples[-1].t >= 0.3
    assert all(s.cpu_percent is not None and s.cpu_percent >= 0 for s in samples)


def test_zz_nothing_left_behind():
    # Only this module's groups ("t-...") are counted: on a shared machine another
    # program may hold labkit groups of its own while these tests run.
    assert [n for n in cgroups.list_all() if n.startswith("t-")] == []
    if not cgroups.list_all():  # then the labkit parents must be gone too
        for parent in {p.parent for p in cgroups.where("x").values()}:
            assert not parent.exists(), f"empty labkit parent left: {parent}"
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        assert backing.read_text().strip() not in _BACKING_FILES


@pytest.mark.skipif(VERSION != 1, reason="v1's cpuset: a new group starts with empty cpus and mems")
def test_a_group_below_an_empty_cpuset_parent_still_takes_a_process(make):
    """A parent level made by a process that was killed between mkdir and filling in its
    cpus (or made by another process a moment ago) is empty; a group below it must fill it
    in rather than fail every later `add` with ENOSPC."""
    need("cpuset")
    base = detect.v1_bases()["cpuset"] / "labkit"
    base.mkdir(exist_ok=True)
    if not (base / "cpuset.cpus").read_text().strip():  # the labkit parent itself, first use here
        v1._fill_cpuset(base)
    level = base / f"half-made-{os.getpid()}"
    level.mkdir()  # as a killed maker leaves it: no cpus, no mems
    try:
        assert (level / "cpuset.cpus").read_text().strip() == ""
        cg = make(f"{level.name}/leaf", cpuset_cpus="0")
        child = spawn(cg, "import time; time.sleep(30)")
        try:
            assert child.pid in cg.procs()
        finally:
            finish(child)
        assert (level / "cpuset.cpus").read_text().strip() != ""
    finally:
        for d in (level / "leaf", level):
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()


def test_kill_of_a_frozen_group_thaws_it_first(make):
    """A frozen process acts on no signal until it is thawed (v1's freezer): kill() must
    thaw first, as `docker rm -f` does with a paused container, not wait out its timeout."""
    need("freezer") if VERSION == 1 else None
    cg = make(f"frozen-kill-{os.getpid()}")
    child = spawn(cg, "import time; time.sleep(60)")
    try:
        cg.freeze()
        assert cg.is_frozen
        started = time.monotonic()
        cg.kill(timeout=3.0)
        assert child.wait(timeout=5) == -9 and time.monotonic() - started < 3.0
    finally:
        finish(child)
