"""labkitd and the thin client: same results as in-process, and every reason to fall back.

tests/test_cli.py runs all of its tests twice, in-process and through labkitd; these
tests cover the daemon itself: its lifecycle, what it declines, and what a dying daemon
or worker looks like to the caller. Those that a client decides run with both clients
(the ``client`` fixture): labkit/cli/client.py, which ``python -m labkit`` runs, and the
compiled command (labkit/cli/client.c), built here as provisioning builds
/usr/local/bin/labkit.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest
from bundles import LABKIT, labkit, leftovers, served_by_labkitd, until
from conftest import REPO

from labkit.cli.daemon import start as start_labkitd
from labkit.engine import daemon, protocol


@pytest.fixture(scope="module")
def compiled_labkit(tmp_path_factory) -> list[str]:
    from labkit.cli import compiled

    return [str(compiled.build(tmp_path_factory.mktemp("compiled") / "labkit", werror=True))]


@pytest.fixture(params=["python", "compiled"])
def client(request) -> list[str]:
    """The argv that starts `labkit`: the Python client, or the compiled one."""
    return LABKIT if request.param == "python" else request.getfixturevalue("compiled_labkit")


@pytest.fixture
def labkitd():
    pid = start_labkitd()
    yield pid
    if daemon.running_pid():
        daemon.stop()
    for path in (daemon.socket_path(), daemon.pid_path()):  # after a SIGKILL
        path.unlink(missing_ok=True)
    for line in labkit("ps", "-a", "-q").stdout.split():
        labkit("rm", "-f", line)
    assert leftovers() == []


def test_start_status_stop(labkitd):
    assert start_labkitd() == labkitd  # a second start finds it running
    mode = os.stat(daemon.socket_path()).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600  # root's only
    # the protocol spells the path rule without pathlib, for the client: the same path
    assert protocol.socket_path(os.environb) == bytes(daemon.socket_path())
    assert protocol.socket_path({}) == b"/run/labkit/labkitd.sock"
    r = labkit("daemon", "status")
    assert r.returncode == 0 and f"pid {labkitd}" in r.stdout
    assert psutil.Process(labkitd).name() == "labkitd"
    r = labkit("daemon", "stop")
    assert r.returncode == 0 and f"pid {labkitd}" in r.stdout
    assert not psutil.pid_exists(labkitd) or psutil.Process(labkitd).status() == psutil.STATUS_ZOMBIE
    assert not daemon.socket_path().exists()
    r = labkit("daemon", "status")
    assert r.returncode == 3 and "not running" in r.stdout


def test_same_output_and_exit_code_as_in_process(labkitd, client):
    commands = [
        ("run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3"),
        ("run", "--rm", "-m", "64XB", "busybox", "true"),
        ("run", "--rm", "no-such-image", "true"),
        ("run", "--rm", "busybox", "no-such-command"),
        ("run", "--bogus-flag", "busybox"),
        ("ps", "-a"),
    ]
    for args in commands:
        before = served_by_labkitd()
        served = labkit(*args, command=client)
        assert served_by_labkitd() == before + 1, args
        local = labkit(*args, command=client, env={**os.environ, "LABKIT_NO_DAEMON": "1"})
        assert served_by_labkitd() == before + 1, args  # that one ran in-process
        assert served.returncode == local.returncode, args
        assert (served.stdout, served.stderr) == (local.stdout, local.stderr)
    r = labkit("run", "--rm", "-i", "-w", "/tmp", "-e", "A=b c", "busybox", "sh", "-c", 'pwd; echo "$A"; cat',
               input="from stdin\n", command=client)  # fmt: skip
    assert r.stdout == "/tmp\nb c\nfrom stdin\n"
    # an environment larger than the worker's first read (64 KiB): the rest follows it
    big = {**os.environ, "BIG": "x" * 100_000, "MORE": "y" * 100_000}  # (execve takes 128 KiB a string)
    before = served_by_labkitd()
    r = labkit("run", "--rm", "-e", "BIG", "busybox", "sh", "-c", 'echo ${#BIG}', env=big, command=client)
    assert (r.returncode, r.stdout, served_by_labkitd()) == (0, "100000\n", before + 1), r.stderr


def test_callers_back_to_back_and_at_once_are_all_served(labkitd, client):
    """Each request takes the spare worker and labkitd forks the next one: callers one
    right after the other, and several at once, are all served by labkitd (none falls
    back to running in-process), and a spare is ready again afterwards."""
    def spares() -> list[psutil.Process]:
        return [c for c in psutil.Process(labkitd).children() if c.name() == daemon.WORKER_NAME]

    until(lambda: len(spares()) == 1)
    before = served_by_labkitd()
    assert all(labkit("ps", command=client).returncode == 0 for _ in range(3))
    procs = [subprocess.Popen([*client, "ps"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    assert served_by_labkitd() == before + 7
    until(lambda: len(spares()) == 1)  # and one is ready again, blocked in accept()


def test_the_working_directory_is_the_callers(labkitd, tmp_dir, client):
    from bundles import bundle

    bundle(tmp_dir / "b", ["echo", "from the bundle here"])
    r = labkit("runtime", "run", "--bundle", ".", "cwd1", cwd=tmp_dir / "b", command=client)
    assert (r.returncode, r.stdout) == (0, "from the bundle here\n"), r.stderr


def test_images_are_built_and_saved_by_labkitd(labkitd, tmp_dir):
    """As dockerd does: the worker reads the context, and writes save's -o file, where
    the caller is; the answers are the in-process ones."""
    (tmp_dir / "Dockerfile").write_text("FROM busybox\nCOPY hello.txt /\nCMD [\"cat\", \"/hello.txt\"]\n")
    (tmp_dir / "hello.txt").write_text("built by labkitd\n")
    before = served_by_labkitd()
    steps = [("build", "-t", "daemon-built:v1", "."), ("tag", "daemon-built:v1", "daemon-built:v2"),
             ("history", "-q", "daemon-built:v2"), ("save", "-o", "out.tar", "daemon-built:v2")]
    try:
        for n, args in enumerate(steps, 1):
            r = labkit(*args, cwd=tmp_dir)
            assert r.returncode == 0 and served_by_labkitd() == before + n, (args, r.stderr)
        assert (tmp_dir / "out.tar").stat().st_size > 0
        r = labkit("run", "--rm", "--network", "none", "daemon-built:v2")
        assert (r.returncode, r.stdout) == (0, "built by labkitd\n"), r.stderr
        served = labkit("image", "inspect", "daemon-built:v1")  # history's CREATED column moves on
        local = labkit("image", "inspect", "daemon-built:v1", env={**os.environ, "LABKIT_NO_DAEMON": "1"})
        assert (served.returncode, served.stdout) == (local.returncode, local.stdout)
    finally:
        labkit("rmi", "daemon-built:v1", "daemon-built:v2")
    assert "daemon-built" not in labkit("images").stdout


def test_detached_shims_are_labkitds_children(labkitd):
    r = labkit("run", "-d", "--name", "sub", "busybox", "sleep", "30")
    assert r.returncode == 0, r.stderr
    shims = []
    for child in psutil.Process(labkitd).children():
        try:
            if child.name() == "labkit-shim":
                shims.append(child)
        except psutil.NoSuchProcess:  # a worker that has just ended
            pass
    assert len(shims) == 1  # labkitd is a subreaper, like containerd
    daemon.stop()
    assert "Up" in labkit("ps").stdout  # containers outlive the daemon


def test_at_a_terminal_only_interactive_commands_run_in_process(labkitd, client):
    master, slave = pty.openpty()
    try:
        for args, served in ((["ps"], 1), (["run", "--rm", "busybox", "true"], 1),
                             (["run", "--rm", "-it", "busybox", "true"], 0),
                             (["run", "--rm", "-i", "busybox", "true"], 0)):  # fmt: skip
            before = served_by_labkitd()
            r = subprocess.run([*client, *args], stdin=slave, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert served_by_labkitd() == before + served, args
    finally:
        os.close(master)
        os.close(slave)


def test_a_caller_in_another_namespace_runs_in_process(labkitd, client):
    before = served_by_labkitd()
    r = subprocess.run(["unshare", "--net", *client, "run", "--rm", "--network", "host", "busybox",
                        "ls", "/sys/class/net"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "lo\n"), r.stderr  # the caller's network, not labkitd's
    assert served_by_labkitd() == before


def test_changed_code_makes_labkitd_step_aside(labkitd):
    source = REPO / "labkit" / "errors.py"
    st = os.stat(source)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    time.sleep(2 * daemon.STALE_CHECK_INTERVAL)  # labkitd looks once in that time
    try:
        r = labkit("ps")
        assert r.returncode == 0 and r.stdout.startswith("CONTAINER ID")  # served in-process
        until(lambda: daemon.running_pid() is None)  # it exited, for a fresh one to load the new code
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_dead_daemon_leaves_the_command_working(labkitd, client):
    os.kill(labkitd, signal.SIGKILL)
    until(lambda: daemon.running_pid() is None)
    assert daemon.socket_path().exists()  # stale: nobody listens
    r = labkit("run", "--rm", "busybox", "echo", "still works", command=client)
    assert (r.returncode, r.stdout) == (0, "still works\n"), r.stderr


def test_a_killed_worker_is_one_line_and_exit_125(labkitd, tmp_dir, client):
    # stderr to a file: the container, still running, holds the same stderr open
    err_file = open(tmp_dir / "stderr", "w+")
    p = subprocess.Popen([*client, "run", "--rm", "--name", "w", "busybox", "sleep", "30"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file)  # fmt: skip
    until(lambda: "Up" in labkit("ps").stdout)
    log = daemon.log_path().read_text().splitlines()
    ours = "labkit run --rm --name w busybox sleep 30"
    worker = [int(line.split()[2]) for line in log if line.endswith(ours)][-1]  # (the log outlives labkitd)
    assert psutil.Process(worker).name() == "labkit"
    os.kill(worker, signal.SIGKILL)
    assert p.wait(timeout=10) == 125
    err_file.close()
    err = (tmp_dir / "stderr").read_text()
    assert err.count("\n") == 1 and "labkitd went away" in err
    assert labkit("rm", "-f", "w").returncode == 0


def test_cleanup_stops_labkitd(labkitd):
    from labkit.lab.cleanup import cleanup

    assert f"stopped labkitd (pid {labkitd})" in cleanup()
    assert daemon.running_pid() is None


def test_the_client_imports_nothing_but_builtins():
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import labkit.cli.client"
    err = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", code], capture_output=True, text=True,
                         check=True).stderr  # fmt: skip
    before = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", "pass"], capture_output=True,
                            text=True, check=True).stderr  # fmt: skip
    names = {line.split("|")[-1].strip() for line in err.splitlines()[1:]}
    names -= {line.split("|")[-1].strip() for line in before.splitlines()[1:]}
    assert names == {"labkit", "labkit.cli", "labkit.cli.client", "labkit.engine", "labkit.engine.protocol",
                     "_socket"}  # fmt: skip


def test_the_installed_command_both_ways(labkitd):
    """/usr/local/bin/labkit is the compiled client; in-process it starts Python with -S,
    which must then load site-packages."""
    command = "/usr/local/bin/labkit"
    if not os.path.exists(command):
        pytest.skip("no /usr/local/bin/labkit: run vagrant/provision.sh")
    assert open(command, "rb").read(4) == b"\x7fELF"
    before = served_by_labkitd()
    r = subprocess.run([command, "run", "--rm", "busybox", "echo", "via labkitd"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (r.returncode, r.stdout, served_by_labkitd()) == (0, "via labkitd\n", before + 1), r.stderr
    r = subprocess.run([command, "cleanup"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LABKIT_NO_DAEMON": "1"})  # fmt: skip
    assert r.returncode == 0 and "stopped labkitd" in r.stdout, r.stderr  # psutil, from site-packages


def test_start_keeps_no_fd_of_the_caller(labkitd):
    daemon.stop()
    r, w = os.pipe()
    try:
        p = subprocess.run([*LABKIT, "daemon", "start"], pass_fds=(w,), capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "started" in p.stdout, p.stderr
        os.close(w)
        w = -1
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""  # end of file: nobody, labkitd included, holds the write end
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_worker_that_ends_at_once_is_still_answered(labkitd, client):
    """A usage error ends the worker within microseconds, sometimes before the client has
    opened a pidfd on it: the client must still read the exit code the worker wrote, not
    fail on the process being gone (seen in about 1 of 30 runs before it was fixed)."""
    before = served_by_labkitd()
    deadline = time.monotonic() + 30
    runs = 0
    while runs < 150 and time.monotonic() < deadline:
        r = labkit("runtime", "run", command=client)
        assert r.returncode == 2 and r.stderr.startswith("labkit: the following arguments"), r.stderr
        runs += 1
    assert runs >= 50 and served_by_labkitd() - before == runs


def test_labkitd_reads_the_default_seccomp_profile_once_for_all_its_containers(labkitd):
    """Its warm-up reads (or compiles) Docker's profile; every init it forks then has the
    program in memory. With the state root's entry removed, a container served by labkitd
    is still filtered and writes no entry; one run in-process reads it again, so writes it."""
    from labkit import paths

    cache = paths.seccomp_cache_dir()
    for entry in cache.glob("*.bpf"):
        entry.unlink()
    before = served_by_labkitd()
    r = labkit("run", "--rm", "busybox", "grep", "Seccomp:", "/proc/self/status")
    assert served_by_labkitd() == before + 1
    assert r.returncode == 0 and r.stdout.split() == ["Seccomp:", "2"], r.stderr  # 2: a filter
    assert list(cache.glob("*.bpf")) == []
    r = labkit("run", "--rm", "busybox", "true", env={**os.environ, "LABKIT_NO_DAEMON": "1"})
    assert r.returncode == 0 and len(list(cache.glob("*.bpf"))) == 1


def test_both_clients_hand_labkitd_the_same_commands():
    """client.c keeps its own copy of client.SERVED: the two must agree."""
    from labkit.cli import client, compiled

    source = compiled.SOURCE.read_text()
    listed = source[source.index("SERVED[] = {") : source.index("NULL,", source.index("SERVED[] = {"))]
    assert set(re.findall(r'"([a-z]+)"', listed)) == client.SERVED


def test_ctrl_c_reaches_the_container_through_the_client(labkitd, client):
    """SIGINT to the client goes on to the worker, which passes it to the container."""
    script = 'trap "exit 7" INT; echo ready; sleep 30 & wait'
    p = subprocess.Popen([*client, "run", "--rm", "busybox", "sh", "-c", script], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=15) == 7, p.stderr.read()
    finally:
        p.kill()
        p.wait()


def test_without_a_working_directory_the_command_runs_in_process(labkitd, client, tmp_dir):
    gone = tmp_dir / "gone"
    gone.mkdir()
    before = served_by_labkitd()
    r = subprocess.run(["sh", "-c", f'cd {gone} && rmdir {gone} && exec "$@"', "sh", *client, "ps"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("CONTAINER ID"), r.stderr
    assert served_by_labkitd() == before


def test_a_python_the_compiled_client_cannot_start_is_one_line_and_127(tmp_dir):
    from labkit.cli import compiled

    broken = compiled.build(tmp_dir / "labkit", python="/nonexistent/python3", werror=True)
    r = subprocess.run([str(broken), "ps"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                       env={**os.environ, "LABKIT_NO_DAEMON": "1"})  # fmt: skip
    assert r.returncode == 127 and r.stderr.count("\n") == 1 and "/nonexistent/python3" in r.stderr, r.stderr


def test_a_connection_closed_before_a_worker_took_it_runs_the_command_here(client, tmp_dir):
    """A labkitd killed a moment ago leaves its spare worker, which may still accept a
    connection before it dies too: the caller then sees the socket close with no worker
    named. Nothing ran, so the command runs in-process (it did not: exit 125, "went away").
    A socket that accepts and closes stands in for that spare."""
    import socket
    import threading

    root = tmp_dir / "root"
    (root / "run").mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "run" / "labkitd.sock"))
    listener.listen()
    accepted = []

    def dying_spare():
        conn, _ = listener.accept()
        accepted.append(conn.recv(65536)[:4])
        conn.close()

    spare = threading.Thread(target=dying_spare, daemon=True)
    spare.start()
    try:
        r = labkit("ps", command=client, env={**os.environ, "LABKIT_ROOT": str(root)})
    finally:
        listener.close()
    spare.join(timeout=10)
    assert accepted == [b"LKD1"]  # it did ask
    assert r.returncode == 0 and r.stdout.startswith("CONTAINER ID"), r.stderr
