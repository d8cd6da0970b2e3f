"""`labkit run` and friends, as a user types them: each flag is observed from inside the
container; bad input is one line and creates nothing; removing never touches the host."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from bundles import LABKIT, labkit, leftovers, served_by_labkitd, until


def v1_or_v2(v1, v2):
    from labkit.kernel.cgroups import detect

    return v1 if detect.version() == 1 else v2


PIDS = v1_or_v2("/sys/fs/cgroup/pids/", "/sys/fs/cgroup/")


@pytest.fixture(scope="module", params=["in-process", "labkitd"])
def mode(request):
    """Every test runs twice: each command in the labkit process, then each one handed to
    labkitd (client.py), which must give the same output and exit code."""
    from labkit.cli.daemon import start as start_labkitd
    from labkit.engine import daemon

    if request.param == "labkitd":
        start_labkitd()
    yield request.param
    if daemon.running_pid():
        daemon.stop()


@pytest.fixture(autouse=True)
def clean(mode):
    from labkit.cli.daemon import start as start_labkitd

    if mode == "labkitd":
        start_labkitd()  # again if a test's `labkit cleanup` stopped it
    before = served_by_labkitd()
    yield
    if mode == "labkitd":
        # more lines, or none after a test's `labkit cleanup` removed the log with the run root
        assert served_by_labkitd() != before, "labkitd served none of this test's commands"
    for line in labkit("ps", "-a", "-q").stdout.split():
        labkit("rm", "-f", line)
    assert leftovers() == []


def inside(*args: str) -> str:
    """stdout of `labkit run --rm ... busybox CMD`, asserting it exits 0."""
    *flags, cmd = args
    r = labkit("run", "--rm", *flags, "busybox", "sh", "-c", cmd)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("flags, cmd, expect", [
    (["-e", "GREETING=hi"], "echo $GREETING", "hi"),
    (["-w", "/tmp"], "pwd", "/tmp"),
    (["-u", "1000:1001"], "id -u; id -g; grep CapEff /proc/self/status", "1000\n1001\nCapEff:\t0000000000000000"),
    (["--hostname", "box1"], "hostname", "box1"),
    (["--read-only"], "touch /x 2>/dev/null || echo ro", "ro"),
    (["--cap-drop", "NET_RAW"], "grep CapBnd /proc/self/status", "CapBnd:\t00000000a80405fb"),
    (["--cap-add", "SYS_ADMIN"], "grep CapBnd /proc/self/status", "CapBnd:\t00000000a82425fb"),
    (["--network", "none"], "ls /sys/class/net", "lo"),
    # what the container sees in its /sys/fs/cgroup: v1's files here, v2's in the course VM
    (["-m", "48m"], *v1_or_v2(("cat /sys/fs/cgroup/memory/memory.limit_in_bytes", str(48 << 20)),
                              ("cat /sys/fs/cgroup/memory.max", str(48 << 20)))),
    (["--cpus", "0.5"], *v1_or_v2(("cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000"),
                                  ("cat /sys/fs/cgroup/cpu.max", "50000 100000"))),
    (["--cpu-shares", "512"], *v1_or_v2(("cat /sys/fs/cgroup/cpu/cpu.shares", "512"),
                                        ("cat /sys/fs/cgroup/cpu.weight", "59"))),
    (["--pids-limit", "7"], f"cat {PIDS}pids.max", "7"),
])  # fmt: skip
def test_run_flag_is_seen_inside(flags, cmd, expect):
    assert inside(*flags, cmd) == expect


def test_default_is_docker_like():
    out = inside("echo $$; hostname | wc -c; grep CapEff /proc/self/status; cat /proc/kcore | wc -c")
    assert out.split("\n") == ["1", "13", "CapEff:\t00000000a80425fb", "0"]


def test_network_host_keeps_the_host_interfaces():
    assert inside("--network", "host", "ls /sys/class/net") .split() == sorted(os.listdir("/sys/class/net"))


def test_volume_and_readonly_volume(tmp_dir):
    (tmp_dir / "f").write_text("from host")
    assert inside("-v", f"{tmp_dir}:/data", "cat /data/f; echo new > /data/g") == "from host"
    assert (tmp_dir / "g").read_text() == "new\n"
    assert inside("-v", f"{tmp_dir}:/data:ro", "echo x > /data/h 2>/dev/null || echo denied") == "denied"


def test_stdin_with_i_and_terminal_with_t():
    r = labkit("run", "--rm", "-i", "busybox", "cat", input="piped\n")
    assert r.stdout == "piped\n"
    r = labkit("run", "--rm", "busybox", "cat", input="ignored\n")
    assert r.stdout == ""  # without -i, stdin is /dev/null as in docker
    r = labkit("run", "--rm", "-t", "busybox", "sh", "-c", "test -t 0 && test -t 1 && echo tty")
    assert r.stdout.strip() == "tty"


def test_exit_code_and_missing_command():
    assert labkit("run", "--rm", "busybox", "sh", "-c", "exit 42").returncode == 42
    r = labkit("run", "busybox", "nosuch")
    assert r.returncode == 127
    assert r.stderr == 'labkit: exec: "nosuch": executable file not found in $PATH\n'
    assert labkit("ps", "-a", "-q").stdout == ""


def test_detached_lifecycle_with_ps_logs_exec_pause_stop_rm():
    r = labkit("run", "-d", "--name", "web", "busybox", "sh", "-c", "echo ready; trap 'exit 3' TERM; "
               "while true; do date +%s%N > /tmp/t; usleep 10000; done")  # fmt: skip
    assert r.returncode == 0 and len(r.stdout.strip()) == 64
    cid = r.stdout.strip()
    ps = labkit("ps").stdout
    assert cid[:12] in ps and "web" in ps and "Up" in ps
    until(lambda: labkit("logs", "web").stdout == "ready\n")
    assert labkit("exec", "web", "cat", "/proc/1/cmdline").stdout.startswith("sh")
    assert labkit("pause", "web").returncode == 0
    assert "(Paused)" in labkit("ps").stdout
    a = labkit("exec", "web", "true")
    assert a.returncode != 0 and "paused" in a.stderr
    assert labkit("unpause", "web").returncode == 0
    stats = labkit("stats", "--no-stream", "web").stdout
    assert "web" in stats and ("MiB" in stats or "KiB" in stats)
    assert '"Status": "running"' in labkit("inspect", "web").stdout
    assert labkit("stop", "-t", "5", "web").returncode == 0
    assert "Exited (3)" in labkit("ps", "-a").stdout
    assert labkit("rm", "web").returncode == 0
    assert labkit("ps", "-a", "-q").stdout == ""


def test_exec_user_name_comes_from_the_containers_passwd():
    assert labkit("run", "-d", "--name", "users", "busybox", "sleep", "30").returncode == 0
    r = labkit("exec", "-u", "nobody", "users", "id", "-u")
    assert (r.returncode, r.stdout) == (0, "65534\n"), r.stderr
    r = labkit("exec", "-u", "nosuchuser", "users", "id")
    assert r.returncode != 0 and r.stderr.startswith("labkit: invalid user 'nosuchuser'")


def test_oom_kill_shows_137_in_ps():
    r = labkit("run", "--name", "hog", "-m", "32m", "busybox", "sh", "-c",
               "x=a; while true; do x=$x$x; done")  # fmt: skip
    assert r.returncode == 137
    ps = labkit("ps", "-a").stdout
    assert "Exited (137)" in ps and "OOM killed" in ps


def test_fork_loop_stops_at_pids_limit():
    r = labkit("run", "--rm", "--pids-limit", "10", "busybox", "sh", "-c",
               "(for i in $(seq 30); do sleep 5 & done) 2>/dev/null; "
               f"cat {PIDS}pids.current {PIDS}pids.max", timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    current, limit = r.stdout.split()
    assert limit == "10" and 8 <= int(current) <= 10  # the loop got as far as the limit, no further


@pytest.mark.parametrize("args, words", [
    (["--memory-swap", "1g"], "invalid memory_swap limit '1g'"),
    (["-v", "/no/such/host/dir:/x"], "'/no/such/host/dir' does not exist"),
    (["-v", "relative:/x"], "invalid volume"),
    (["--network", "nosuch"], "no such network: nosuch"),
    (["-p", "70000:80"], "invalid published port '70000:80'"),
    (["-p", "abc"], "invalid published port 'abc'"),
    (["--network", "none", "-p", "8080:80"], "--network none has no ports"),
    (["--cap-add", "FLY"], "invalid capability 'FLY'"),
    (["-u", "nobodyhere"], "invalid user"),
])  # fmt: skip
def test_bad_input_is_one_line_and_creates_nothing(args, words):
    r = labkit("run", *args, "busybox", "true")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("labkit: ") and words in r.stderr, r.stderr
    assert leftovers() == []


@pytest.mark.parametrize("argv, first", [
    (["run", "-m", "-5m", "busybox", "true"],
     'invalid argument "-5m" for "-m, --memory" flag: expected a number with an optional unit'),
    (["run", "--memory", "64XB", "busybox", "true"], 'invalid argument "64XB" for "-m, --memory" flag'),
    (["run", "--cpus", "-1", "busybox", "true"], 'invalid argument "-1" for "--cpus" flag: expected a number of CPUs'),
    (["run", "--pids-limit", "0", "busybox", "true"], 'invalid argument "0" for "--pids-limit" flag'),
    (["run", "--cpu-shares", "lots", "busybox", "true"], 'invalid argument "lots" for "--cpu-shares" flag'),
    (["run", "--bogus", "busybox", "true"], "unrecognized arguments: --bogus"),
    (["run", "--name"], "argument --name: expected one argument"),
    (["run"], "the following arguments are required: image"),
    (["stop", "-t", "soon", "c1"], 'invalid argument "soon" for "-t, --time" flag: expected a number of seconds'),
    (["rm"], "the following arguments are required: containers"),
    (["runtime", "run"], "the following arguments are required: id"),
    (["runtime", "frob"], "invalid choice: 'frob'"),
    (["kill", "-s"], "argument -s/--signal: expected one argument"),
])  # fmt: skip
def test_a_bad_command_line_is_one_line_and_a_pointer_to_help(argv, first):
    """As the docker CLI does: what is wrong, naming the flag and the value, then where the
    usage is; not argparse's whole usage text."""
    r = labkit(*argv)
    command = " ".join(["labkit", *argv[:2]] if argv[0] == "runtime" and argv[1] == "run" else ["labkit", argv[0]])
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert len(lines) == 2 and lines[0].startswith("labkit: ") and first in lines[0], r.stderr
    assert lines[1] == f"See '{command} --help'."
    assert leftovers() == []


def test_a_value_that_starts_with_a_dash_is_the_flags_value():
    """`--pids-limit -1` (unlimited) is a value, as docker reads it, and after the image
    everything belongs to the container's command, dashes included."""
    assert inside("--pids-limit", "-1", f"cat {PIDS}pids.max") == "max"
    r = labkit("run", "--rm", "busybox", "echo", "-m", "-5m", "--bogus")
    assert r.returncode == 0 and r.stdout == "-m -5m --bogus\n", r.stderr


def test_missing_image_and_taken_name():
    r = labkit("run", "nosuchimage", "true")
    assert r.returncode != 0 and "no such image 'nosuchimage'" in r.stderr and r.stderr.count("\n") == 1
    assert labkit("run", "-d", "--name", "taken", "busybox", "sleep", "30").returncode == 0
    r = labkit("run", "--name", "taken", "busybox", "true")
    assert r.returncode != 0 and "'taken' is already in use" in r.stderr
    assert len(labkit("ps", "-a", "-q").stdout.split()) == 1


def test_rm_force_with_a_host_bind_mount_leaves_the_host_dir(tmp_dir):
    (tmp_dir / "keep").write_text("precious")
    assert labkit("run", "-d", "--name", "vol", "-v", f"{tmp_dir}:/data", "busybox", "sleep", "30").returncode == 0
    assert labkit("rm", "-f", "vol").returncode == 0
    assert (tmp_dir / "keep").read_text() == "precious"


def test_sigkill_of_labkit_run_then_cleanup_leaves_nothing():
    from labkit.lab.cleanup import cleanup

    p = subprocess.Popen([*LABKIT, "run", "busybox", "sleep", "30"], stdout=subprocess.DEVNULL)
    until(lambda: "sleep" in labkit("ps").stdout)
    p.send_signal(signal.SIGKILL)
    p.wait()
    removed = cleanup()
    assert removed, "cleanup found nothing of the killed run"
    until(lambda: leftovers() == [])
    assert labkit("ps", "-a").stdout.strip().count("\n") == 0  # just the header
    assert cleanup() == []  # safe to run twice


def test_ctrl_c_in_the_foreground_reaches_the_container_not_the_shim():
    # a terminal's Ctrl-C signals its whole foreground process group: labkit, its shim
    # (the shim must survive to record the exit) and, without -t, the container's init
    p = subprocess.Popen([*LABKIT, "run", "--name", "fg", "busybox", "sh", "-c",
                          "trap 'exit 7' INT; echo up; while true; do usleep 10000; done"],
                         process_group=0, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline() == "up\n"
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(timeout=10) == 7
    p.stdout.close()
    assert "Exited (7)" in labkit("ps", "-a").stdout


def test_runtime_run_interrupted_leaves_no_container(tmp_dir):
    from bundles import bundle

    b = bundle(tmp_dir, ["sh", "-c", "trap '' INT; echo up; sleep 30"])
    p = subprocess.Popen([*LABKIT, "runtime", "run", "--bundle", str(b), "rt-int"],
                         process_group=0, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline() == "up\n"
    os.killpg(p.pid, signal.SIGINT)  # the container ignores it; labkit stops and cleans up
    assert p.wait(timeout=15) == 130
    p.stdout.close()
    assert leftovers() == []


def test_rm_force_of_an_rm_container_races_with_its_own_removal():
    # the shim removes a --rm container once it exits; `rm -f` removes it too, at the same time
    for _ in range(8):
        r = labkit("run", "-d", "--rm", "busybox", "sleep", "30")
        cid = r.stdout.strip()
        assert r.returncode == 0 and cid, r.stderr
        r = labkit("rm", "-f", cid)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        assert r.stdout.strip() == cid
    until(lambda: leftovers() == [])
