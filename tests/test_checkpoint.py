"""`labkit checkpoint` and `labkit restore` (CRIU), as a user types them.

The round trips need criu working on this kernel. Debian's criu 3.17 works on Debian 12's
kernel 6.1, which labkit's VM boots (tests/test_cgroups_v2.py runs them there, and fails
if one skipped); on a newer kernel `criu check` fails, and they skip with its reason.
There the one-line error is what is tested instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from bundles import labkit, leftovers, until
from conftest import need_tool

from labkit.runtime import checkpoint, container

COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done"
HTTPD = "mkdir -p /www && echo hello-from-c > /www/index.html && exec httpd -f -p 80 -h /www"


@pytest.fixture(autouse=True)
def clean():
    yield
    for cid in labkit("ps", "-a", "-q").stdout.split():
        labkit("rm", "-f", cid)
    assert leftovers() == []


def criu_check_fails() -> str:
    """Why criu cannot work here, in criu's own words; '' where it can."""
    r = subprocess.run([need_tool("criu"), "check"], capture_output=True, text=True, check=False)
    return "" if r.returncode == 0 else checkpoint.criu_errors(r.stdout + r.stderr) or "criu check failed"


def need_criu() -> None:
    why = criu_check_fails()
    if why:
        pytest.skip(f"criu cannot work on this kernel ({os.uname().release}): criu check: {why}")


def counts(name: str) -> list[int]:
    """The numbers the counter has logged, whole lines only."""
    out = labkit("logs", name).stdout
    return [int(n) for n in out[: out.rfind("\n") + 1].split()]


def run_counter(name: str, *flags: str) -> None:
    r = labkit("run", "-d", "--name", name, "--network", "none", *flags, "busybox", "sh", "-c", COUNTER)
    assert r.returncode == 0, r.stderr
    until(lambda: len(counts(name)) >= 5, 60)


def full_id(name: str) -> str:
    return next(s.id for s in container.list_states() if s.name == name)


def one_line(r: subprocess.CompletedProcess, words: str) -> bool:
    return r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr


def test_criu_errors_are_the_lines_that_say_why():
    check = ("Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n"
             "Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable\n"
             "Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.\n")
    assert checkpoint.criu_errors(check) == ("vdso: Unexpected rt vDSO area bounds; "
                                             "vdso: Failed to fill self vdso symtable")
    dump = ("(01.71) Error (criu/tun.c:85): tun: Unable to create tun: No such file or directory\n"
            "(02.63) Warn  (compel/arch/x86/src/lib/infect.c:352): Will restore 240 with interrupted syscall\n"
            "(00.70) Error (criu/mount.c:753): mnt: 58:./etc/resolv.conf doesn't have a proper root mount\n"
            "(00.97) Error (criu/cr-dump.c:2053): Dumping FAILED.\n")  # fmt: skip
    assert checkpoint.criu_errors(dump) == "mnt: 58:./etc/resolv.conf doesn't have a proper root mount"
    assert checkpoint.criu_errors("Looks good.\n") == ""


def test_where_criu_cannot_work_checkpoint_says_why_in_one_line_and_changes_nothing():
    why = criu_check_fails()
    if not why:
        pytest.skip("criu works on this kernel: the round trips below run instead")
    run_counter("counter")
    r = labkit("checkpoint", "counter")
    assert one_line(r, "criu cannot work on this kernel"), r.stderr
    kernel = os.uname().release
    assert r.stderr.startswith(f"labkit: criu cannot work on this kernel ({kernel}): criu check: {why}")
    assert "Up " in labkit("ps").stdout  # still running, still counting
    before = len(counts("counter"))
    until(lambda: len(counts("counter")) > before, 30)
    images = checkpoint.images_dir(full_id("counter"))
    assert not images.exists() and not images.with_name("checkpoint.new").exists()


def test_bad_input_is_one_line_and_changes_nothing():
    for verb in ("checkpoint", "restore"):
        r = labkit(verb, "nosuch")
        assert r.returncode == 1 and r.stderr == "labkit: no such container: nosuch\n", r.stderr
    r = labkit("checkpoint")
    assert r.returncode == 2 and r.stderr.startswith("labkit: the following arguments are required: container")
    run_counter("counter")
    assert one_line(labkit("restore", "counter"), "it is running (must be stopped)")
    assert labkit("stop", "-t", "0", "counter").returncode == 0
    assert one_line(labkit("restore", "counter"), "has no checkpoint (labkit checkpoint counter makes one)")
    assert one_line(labkit("checkpoint", "counter"), "it is stopped (must be running)")
    # what criu could not take is refused before criu is asked
    for name, flag, words in [("term", "-t", "it has a terminal (-t)"), ("gone", "--rm", "it runs with --rm")]:
        r = labkit("run", "-d", flag, "--name", name, "--network", "none", "busybox", "sleep", "60")
        assert r.returncode == 0, r.stderr
        assert one_line(labkit("checkpoint", name), words)
    assert "gone" in labkit("ps").stdout
    assert not any(checkpoint.images_dir(s.id).exists() for s in container.list_states())


def test_a_counter_goes_on_counting_after_checkpoint_and_restore():
    need_criu()
    run_counter("counter", "-m", "64m", "--pids-limit", "20")
    r = labkit("checkpoint", "counter")
    assert r.returncode == 0 and r.stdout == "counter\n", r.stderr
    assert "Exited (137)" in labkit("ps", "-a").stdout  # criu killed it once its images were written
    saved = counts("counter")
    time.sleep(1)
    assert counts("counter") == saved  # nothing runs: the log stands still
    r = labkit("restore", "counter")
    assert r.returncode == 0 and r.stdout == "counter\n", r.stderr
    assert "Up " in labkit("ps").stdout
    until(lambda: len(counts("counter")) >= len(saved) + 5, 60)
    numbers = counts("counter")
    assert numbers == list(range(len(numbers)))  # on from where it was: no restart at 0, no gap
    # labkit exec joins it as any other; its cgroup is made again, with its limits (v2, v1)
    r = labkit("exec", "counter", "sh", "-c", "cat /sys/fs/cgroup/pids.max || cat /sys/fs/cgroup/pids/pids.max")
    assert r.stdout == "20\n", r.stderr
    assert labkit("stop", "-t", "1", "counter").returncode == 0  # the shim records the end again
    assert "Exited (137)" in labkit("ps", "-a").stdout
    assert labkit("rm", "counter").returncode == 0


def test_leave_running_then_restore_goes_back_to_the_checkpoint():
    need_criu()
    run_counter("counter")
    assert labkit("checkpoint", "--leave-running", "counter").returncode == 0
    at = len(counts("counter"))
    until(lambda: len(counts("counter")) > at + 3, 60)  # it goes on counting
    assert labkit("kill", "counter").returncode == 0
    until(lambda: "Exited" in labkit("ps", "-a").stdout, 30)
    ended = counts("counter")
    assert labkit("restore", "counter").returncode == 0
    until(lambda: len(counts("counter")) > len(ended) + 3, 60)
    again = counts("counter")[len(ended) :]
    # the restored shell counts on from its memory at the checkpoint; the log goes on from its end
    assert again[0] < ended[-1] and again == list(range(again[0], again[0] + len(again)))


def test_a_web_server_on_the_bridge_serves_again_after_restore():
    need_criu()
    port = free_port()
    r = labkit("run", "-d", "--name", "web", "-p", f"{port}:80", "busybox", "sh", "-c", HTTPD)
    assert r.returncode == 0, r.stderr
    assert "hello-from-c" in http_get(port)
    assert labkit("checkpoint", "web").returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    r = labkit("restore", "web")
    assert r.returncode == 0, r.stderr
    assert "hello-from-c" in http_get(port)  # same namespace, address and port: the veth stayed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def http_get(port: int) -> str:
    """GET / on the host's port, retried for a while (the DNAT'd server may be starting)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return b"".join(iter(lambda: s.recv(4096), b"")).decode(errors="replace")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
