"""`vagrant up --provider=libvirt` on the course's own Vagrantfile, with the box built here.

What a student's first `vagrant up` does, checked from the host: the ready box
(build_box.py --ready: provision.sh ran in it once at build time) boots under
libvirt (driver qemu: software emulation, since KVM cannot run a guest on every host),
Vagrant syncs the checkout, runs provision.sh --service and forwards JupyterLab to
127.0.0.1. Then: the URL serves the lab, a request without the token is refused, the
services run, a notebook runs to its end, halt/up keeps the work and the token, a second
provision changes nothing, and destroy leaves nothing on the host.

The tests run in file order on one VM (a module fixture): each is one step of the
student's path. Only under `make test-vm` (LABKIT_TEST_VM=1); the first test, the
Vagrantfile's settings for it, is quick and runs in the normal suite too.

Where no systemd runs libvirtd (a container, this CI machine), the fixture starts
virtlogd and libvirtd itself and stops them at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import need_tool

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import boot_box  # noqa: E402
import build_box  # noqa: E402

vm_test = pytest.mark.skipif(os.environ.get("LABKIT_TEST_VM") != "1",
                             reason="boots a VM under libvirt's software emulation (minutes): make test-vm")

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
UP_TIMEOUT_S = 60 * 60  # first boot and provisioning under emulation
URL = re.compile(r"http://127\.0\.0\.1:(\d+)/lab\?token=([0-9a-f]+)")


def virsh(*args: str, check: bool = True) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          check=check, timeout=60).stdout


def libvirt_objects() -> dict[str, list[str]]:
    """The domains, networks, storage pools and volumes (of every pool) libvirt knows now."""
    names = lambda out: [n for n in out.split() if n]  # noqa: E731
    pools = names(virsh("pool-list", "--all", "--name"))
    vols = []
    for pool in pools:  # libvirt 9's vol-list has no --name: a table, two lines of header
        table = virsh("vol-list", "--pool", pool, check=False).splitlines()[2:]
        vols += [f"{pool}/{line.split()[0]}" for line in table if line.strip()]
    return {"domains": names(virsh("list", "--all", "--name")), "pools": pools,
            "networks": names(virsh("net-list", "--all", "--name")), "volumes": vols}


def libvirt_chains() -> dict[tuple[str, str], list[str]]:
    """iptables' rules that mention libvirt's chains, by (tool, table): libvirt 9 adds them
    for its NAT networks, and leaves them when the last network goes."""
    found = {}
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            out = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True, timeout=30).stdout
            found[(tool, table)] = [line for line in out.splitlines() if "LIBVIRT_" in line]
    return found


def remove_libvirt_chains(rules: dict[tuple[str, str], list[str]]) -> None:
    """Undo what libvirt_chains() found: the jumps first, then the chains themselves."""
    for (tool, table), lines in rules.items():
        for line in lines:
            if line.startswith("-A "):
                subprocess.run([tool, "-t", table, "-D", *line.split()[1:]], check=True, timeout=30)
        for line in lines:
            if line.startswith("-N "):
                subprocess.run([tool, "-t", table, "-F", line.split()[1]], check=True, timeout=30)
                subprocess.run([tool, "-t", table, "-X", line.split()[1]], check=True, timeout=30)


@pytest.fixture(scope="module")
def libvirtd():
    """libvirt's daemon: the one running, or one this fixture starts and stops again."""
    for tool in ("libvirtd", "virtlogd", "virsh", "vagrant", "iptables"):
        need_tool(tool)
    chains_before = any(libvirt_chains().values())
    started = []
    if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                      timeout=30).returncode != 0:
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            subprocess.run([f"/usr/sbin/{daemon}", "--daemon", "--pid-file", pidfile], check=True, timeout=30)
            started.append(pidfile)
        deadline = time.monotonic() + 30
        while subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                             timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd did not answer within 30 s"
            time.sleep(0.5)
    yield
    for pidfile in reversed(started):
        pid = int(Path(pidfile).read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists(), f"{pidfile}: {pid} still runs 30 s after SIGTERM"
    if not chains_before:  # this run's networks made them: they go with it
        remove_libvirt_chains(libvirt_chains())
        assert not any(libvirt_chains().values())


class Project:
    """A copy of the checkout with its own Vagrant home, as a student's clone would be."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="labkit-vagrant-", dir="/var/tmp"))
        self.dir.chmod(0o755)  # libvirt's qemu user reads the box's kernel below it
        self.checkout = self.dir / "labkit"
        self.checkout.mkdir()
        boot_box.copy_checkout(self.checkout)
        self.port = boot_box.free_port()
        self.env = {**os.environ, "VAGRANT_HOME": str(self.dir / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1",
                    "VAGRANT_DEFAULT_PROVIDER": "libvirt", "LABKIT_BOX": build_box.READY_BOX_NAME,
                    "LABKIT_LIBVIRT_DRIVER": "qemu", "LABKIT_PORT": str(self.port),
                    "LABKIT_CPUS": "2", "LABKIT_MEMORY": "4096"}
        self.timings: dict[str, float] = {}

    def vagrant(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        started = time.monotonic()
        r = subprocess.run(["vagrant", *args], cwd=self.checkout, env=self.env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        self.timings[" ".join(args[:2])] = time.monotonic() - started
        if check and r.returncode != 0:
            raise AssertionError(f"vagrant {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-3000:]}")
        return r

    def ssh(self, command: str, timeout: float = 600) -> str:
        return self.vagrant("ssh", "-c", command, timeout=timeout).stdout


@pytest.fixture(scope="module")
def project(libvirtd):
    before = libvirt_objects()
    box = build_box.build(ready=True)  # provision.sh ran in it once: minutes, not an hour
    p = Project()
    try:
        subprocess.run(["vagrant", "box", "add", "--name", build_box.READY_BOX_NAME, str(box / "labkit.box")],
                       env=p.env, cwd=p.checkout, check=True, capture_output=True, timeout=600)
        yield p
    finally:
        p.vagrant("destroy", "-f", check=False)
        # vagrant-libvirt keeps the box's base volume in the pool for the next `up`, and
        # the pool it made: a test leaves nothing, so they go too
        for vol in set(libvirt_objects()["volumes"]) - set(before["volumes"]):
            pool, name = vol.split("/", 1)
            virsh("vol-delete", name, "--pool", pool)
        for pool in set(libvirt_objects()["pools"]) - set(before["pools"]):
            virsh("pool-destroy", pool, check=False)
            virsh("pool-undefine", pool)
        assert libvirt_objects() == before
        print(f"\nvagrant timings (s): { {k: round(v) for k, v in p.timings.items()} }")
        shutil.rmtree(p.dir, ignore_errors=True)


def test_vagrantfile_box_and_libvirt_driver_from_the_environment():
    from test_provision import vagrant_validate

    good = vagrant_validate(REPO, LABKIT_BOX="labkit/debian-13", LABKIT_LIBVIRT_DRIVER="qemu")
    assert good.returncode == 0, good.stdout + good.stderr
    for name, bad, accepted in [("LABKIT_BOX", "no box!", "a box name"),
                                ("LABKIT_LIBVIRT_DRIVER", "xen", "kvm or qemu")]:
        result = vagrant_validate(REPO, **{"LABKIT_BOX": "", "LABKIT_LIBVIRT_DRIVER": "", name: bad})
        assert result.returncode != 0, f"{name}={bad} was accepted"
        assert f'{name}="{bad}"' in result.stderr and accepted in result.stderr, result.stderr


def test_ci_runs_the_vm_test_only_when_its_files_changed(tmp_path):
    stamp = tmp_path / "vm-tested"
    changed = lambda *args: subprocess.run(["bash", str(REPO / "scripts" / "vm_changed.sh"), *args],  # noqa: E731
                                           env={**os.environ, "LABKIT_VM_TESTED": str(stamp)}, timeout=60).returncode
    assert changed() == 0  # never passed: run it
    assert changed("--stamp") == 0
    assert changed() == 1  # as when it passed: skip it
    stamp.write_text("0" * 64 + "\n")  # another state of the files than the one tested
    assert changed() == 0
    assert changed("--bogus") == 2


def lab_url(output: str) -> tuple[int, str]:
    found = URL.findall(output)
    assert found, f"no lab URL in vagrant's output:\n{output[-2000:]}"
    return int(found[-1][0]), found[-1][1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@vm_test
def test_vagrant_up_provisions_and_prints_the_url(project):
    out = project.vagrant("up", "--provider=libvirt", timeout=UP_TIMEOUT_S).stdout
    port, token = lab_url(out)
    assert port == project.port
    project.token = token
    # libvirt's qemu driver (LABKIT_LIBVIRT_DRIVER=qemu): software emulation, not KVM
    assert "<domain type='qemu'" in virsh("dumpxml", f"{project.checkout.name}_default")
    assert project.ssh("hostname").strip() == "labkit"


@vm_test
def test_lab_answers_with_its_token_and_refuses_without(project):
    base = f"http://127.0.0.1:{project.port}"
    assert http_status(f"{base}/lab?token={project.token}") == 200
    assert http_status(f"{base}/api/contents?token={project.token}") == 200
    assert http_status(f"{base}/api/contents") == 403


@vm_test
def test_services_run_and_labkits_cgroups_sit_in_their_delegated_subtree(project):
    out = project.ssh("systemctl is-active labkitd labkit-lab; stat -fc %T /sys/fs/cgroup; "
                      "systemctl show -p Delegate labkitd labkit-lab").split()
    assert out == ["active", "active", "cgroup2fs", "Delegate=yes", "Delegate=yes"], out
    # a container started through labkitd sits below labkitd's own cgroup
    seen = project.ssh("sudo labkit run --rm busybox cat /proc/self/cgroup", timeout=300).split()
    assert len(seen) == 1 and seen[0].startswith("0::/system.slice/labkitd.service/"), seen


@vm_test
def test_the_lab_in_a_browser_in_the_vm(project, tmp_path):
    """Chromium on the host, through the forwarded port: notebook 02 runs, its checks pass."""
    from browser import run_notebook

    notebook = "02-namespaces-uts-ipc.ipynb"
    project.ssh(f"sudo cp /vagrant/solutions/{notebook} /vagrant/work/{notebook}")
    run = run_notebook(f"http://127.0.0.1:{project.port}", project.token, notebook, tmp_path / "chromium",
                       "browser-vm-02", timeout=900)
    print(f"\nnotebook 02 in Chromium against the VM: {run.seconds:.0f} s; screenshot {run.screenshot}")
    assert run.errors == [] and run.executed == run.code_cells
    assert len(run.passed) == 3, run.passed


@vm_test
def test_a_notebook_runs_to_its_end_in_the_vm(project):
    out = project.ssh("cd /vagrant && sudo LABKIT_QUICK=1 /opt/labkit/venv/bin/python -m pytest -p no:cacheprovider "
                      "-q --nbval-lax --nbval-current-env solutions/02-namespaces-uts-ipc.ipynb 2>&1 | tail -3",
                      timeout=1200)
    assert re.search(r"\d+ passed", out) and "failed" not in out, out


# The guest's Python (Debian 13's 3.13), under systemd, on cgroup v2: the suites of the
# kernel, runtime and CLI layers, and notebooks 03 to 07, run in the lab service's
# delegated subtree, where the notebooks' own kernels run (labkit-lab.service.in:
# Delegate=yes, the server in its "jupyter" child). The shell that starts pytest joins a
# "tests" child beside it, so labkit puts its groups below the service, as it does for a
# notebook in the browser (cgroups/detect.py v2_base).
IN_THE_LAB_SERVICE = ("g=/sys/fs/cgroup/system.slice/labkit-lab.service/tests; mkdir -p $g; echo $$ > $g/cgroup.procs; "
                      "cd /vagrant; exec env LABKIT_QUICK=1 LABKIT_TEST_SLOWDOWN=4 ")
GUEST_SUITES = ("tests/test_syscalls.py tests/test_namespaces.py tests/test_cgroups.py tests/test_overlay.py "
                "tests/test_seccomp.py tests/test_runtime.py tests/test_cli.py")
GUEST_NOTEBOOKS = " ".join(f"solutions/{n}" for n in ("03-pid-namespace.ipynb", "04-mount-namespace-and-rootfs.ipynb",
                                                      "05-overlayfs.ipynb", "06-cgroups-cpu.ipynb",
                                                      "07-cgroups-memory-pids-io-freezer.ipynb"))  # fmt: skip


def in_the_lab_service(project, command: str, timeout: float) -> str:
    """``command`` as root in the VM, in a child of labkit-lab.service's cgroup; its output."""
    return project.ssh(f"sudo sh -c '{IN_THE_LAB_SERVICE}{command} 2>&1 | tail -15'; "
                       "sudo rmdir /sys/fs/cgroup/system.slice/labkit-lab.service/tests", timeout=timeout)  # fmt: skip


@vm_test
def test_labkit_s_own_groups_sit_in_the_lab_service_s_delegated_subtree(project):
    seen = in_the_lab_service(project, "LABKIT_NO_DAEMON=1 labkit run --rm busybox cat /proc/self/cgroup",
                              timeout=300).split()  # (in-process: labkitd would put it below its own service)
    assert len(seen) == 1 and seen[0].startswith("0::/system.slice/labkit-lab.service/labkit/"), seen
    version = project.ssh("/opt/labkit/venv/bin/python -c 'import sys; print(sys.version_info >= (3, 12), "
                          "sys.version.split()[0])'").split()  # fmt: skip
    assert version[0] == "True", version  # the point of the run: a Python that is not the host's


@vm_test
def test_the_kernel_runtime_and_cli_suites_pass_on_the_guest_s_python(project):
    out = in_the_lab_service(project, "/opt/labkit/venv/bin/python -m pytest -p no:cacheprovider -q "
                             f"{GUEST_SUITES}", timeout=3 * 3600)  # fmt: skip
    print(f"\nthe kernel, runtime and CLI suites in the VM:\n{out}")
    assert re.search(r"\d+ passed", out) and not re.search(r"\d+ (failed|error)", out), out


@vm_test
def test_notebooks_03_to_07_run_to_their_end_in_the_vm(project):
    out = in_the_lab_service(project, "/opt/labkit/venv/bin/python -m pytest -p no:cacheprovider -q --nbval-lax "
                             "--nbval-current-env --nbval-cell-timeout=1200 --nbval-sanitize-with tests/nbval_sanitize.cfg "
                             f"{GUEST_NOTEBOOKS}", timeout=3 * 3600)  # fmt: skip
    print(f"\nnotebooks 03-07 in the VM:\n{out}")
    assert re.search(r"\d+ passed", out) and not re.search(r"\d+ (failed|error)", out), out


@vm_test
def test_halt_and_up_keep_the_work_and_the_token(project):
    project.ssh("echo mine | sudo tee /vagrant/work/keep-me.txt >/dev/null")
    project.vagrant("halt", timeout=300)
    out = project.vagrant("up", "--provider=libvirt", timeout=1800).stdout
    assert lab_url(out)[1] == project.token
    assert project.ssh("cat /vagrant/work/keep-me.txt").strip() == "mine"
    assert http_status(f"http://127.0.0.1:{project.port}/lab?token={project.token}") == 200


@vm_test
def test_a_second_provision_changes_nothing(project):
    out = project.vagrant("provision", timeout=1200).stdout
    assert "system packages: all present" in out and "Python packages: up to date" in out, out
    assert "==> default: wrote" not in out and "installing" not in out, out


@vm_test
def test_destroy_leaves_nothing_on_the_host(project):
    before = set(libvirt_objects()["domains"])
    assert f"{project.checkout.name}_default" in before
    project.vagrant("destroy", "-f", timeout=300)
    left = libvirt_objects()
    assert [d for d in left["domains"] if d.startswith(project.checkout.name)] == []
    assert "vagrant-libvirt" not in left["networks"]
    # the VM's own disk is gone; the box's base volume stays for the next `up` (the fixture
    # removes it)
    assert [v for v in left["volumes"] if f"/{project.checkout.name}_default" in v] == []
    assert subprocess.run(["pgrep", "-f", f"guest={project.checkout.name}"], capture_output=True).stdout == b""
