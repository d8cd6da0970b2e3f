"""The lab: JupyterLab started exactly as the VM's service and `sudo make lab` start it.

A real server on a free loopback port with a token of its own: it refuses requests
without the token, lists the work folder, runs the `labkit` kernel (labkit, doctor,
matplotlib, ipywidgets), and headless Chromium sees the notebook list. Every server,
kernel and browser started here is stopped, and the test checks that none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, need_tool

from labkit.kernel.syscalls import Prctl, prctl
from labkit.lab import jupyter

START_TIMEOUT_S = 90.0  # the first start imports JupyterLab's extensions: seconds, not minutes
NOTEBOOK = "00-lab-probe.ipynb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (our temp dir is in every one we start)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def write_notebook(path: Path, source: str = "1 + 1") -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


class Lab:
    """One JupyterLab process started by ``argv`` with its own token, port and folders."""

    def __init__(self, argv_of, env_extra: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="labkit-lab-"))
        self.work = self.dir / "work"
        self.work.mkdir()
        write_notebook(self.work / NOTEBOOK)
        self.port = free_port()
        self.token_file = self.dir / "jupyter_token"
        self.token, _ = jupyter.ensure_token(self.token_file)
        self.log = self.dir / "server.log"
        env = {
            **os.environ,
            "LABKIT_TOKEN_FILE": str(self.token_file),
            "LABKIT_WORK": str(self.work),
            "LABKIT_LAB_PORT": str(self.port),
            # kernels' connection files land here: their command lines name our temp dir
            "JUPYTER_RUNTIME_DIR": str(self.dir / "runtime"),
            # workspaces and settings the browser makes stay here too, not in root's home;
            # kernelspecs and lab settings still come from the venv (sys.prefix)
            "JUPYTER_CONFIG_DIR": str(self.dir / "config"),
            "JUPYTER_DATA_DIR": str(self.dir / "data"),
            **(env_extra or {}),
        }
        with open(self.log, "w") as log:
            # a session of its own: cleanup can signal the whole group
            self.proc = subprocess.Popen(argv_of(self), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        if not jupyter.wait_until_up(self.port, START_TIMEOUT_S):
            self.stop()
            pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log.read_text()}")

    def request(self, path: str, token: str | None = "", method: str = "GET", body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"token {token or self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                raw = reply.read()
                return reply.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            return err.code, None

    def stop(self) -> list[int]:
        """SIGTERM (Jupyter shuts its kernels down), then SIGKILL; returns leftover pids."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (left := processes_mentioning(str(self.dir))) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # report them, but never leave them behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


def serve_argv(lab: Lab) -> list[str]:
    # What the service's ExecStart runs (vagrant/labkit-lab.service.in), on loopback.
    return [sys.executable, "-m", "labkit.lab.jupyter", "serve", "--root-dir", str(lab.work),
            "--ip", "127.0.0.1", "--port", str(lab.port)]


@pytest.fixture(scope="module")
def lab():
    server = Lab(serve_argv)
    yield server
    assert server.stop() == [], "Jupyter processes were left running"


def test_requests_without_the_token_are_refused(lab):
    assert lab.request("/api/contents", token=None)[0] == 403
    assert lab.request("/api/contents", token="0" * 48)[0] == 403
    assert lab.request("/api/contents")[0] == 200


def test_contents_api_lists_the_work_folder(lab):
    status, listing = lab.request("/api/contents")
    assert status == 200
    assert NOTEBOOK in [item["name"] for item in listing["content"]]


def test_labkit_kernel_is_the_default(lab):
    status, specs = lab.request("/api/kernelspecs")
    assert status == 200
    assert specs["default"] == jupyter.KERNEL_NAME
    spec = specs["kernelspecs"][jupyter.KERNEL_NAME]["spec"]
    assert spec["display_name"] == "labkit (Python 3)"
    assert Path(spec["argv"][0]).parent == Path(sys.prefix, "bin")  # the venv's Python


def run_in_kernel(lab: Lab, kernel_id: str, code: str, timeout: float = 120) -> list[dict]:
    """Execute ``code`` in a kernel the server started; return its iopub messages."""
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=str(lab.dir / "runtime" / f"kernel-{kernel_id}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        messages: list[dict] = []
        reply = client.execute_interactive(code, timeout=timeout, output_hook=messages.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        return messages
    finally:
        client.stop_channels()


@pytest.fixture(scope="module")
def kernel_id(lab):
    status, kernel = lab.request("/api/kernels", method="POST", body={})  # the default kernel
    assert status == 201, status
    assert kernel["name"] == jupyter.KERNEL_NAME
    # Not deleted here on purpose: stopping the server must stop its kernels too, and
    # the lab fixture checks that none is left.
    return kernel["id"]


def test_kernel_imports_labkit_and_doctor_passes(lab, kernel_id):
    if not (REPO / "labkit" / "lab" / "doctor.py").exists():
        pytest.skip("labkit.lab.doctor is not part of this checkout yet")
    code = (
        "import json, labkit\n"
        "from labkit.lab import doctor\n"
        "print(json.dumps([[c.name, c.status, c.detail] for c in doctor.run_checks()]))\n"
    )
    out = [m for m in run_in_kernel(lab, kernel_id, code) if m["msg_type"] == "stream"]
    checks = json.loads("".join(m["content"]["text"] for m in out))
    assert checks, "doctor ran no checks"
    assert {status for _, status, _ in checks} <= {"pass", "warn", "fail"}
    failed = [c for c in checks if c[1] == "fail"]
    assert not failed, f"doctor failed inside the lab's kernel: {failed}"


def test_matplotlib_and_widgets_work_out_of_the_box(lab, kernel_id):
    code = (
        "import matplotlib.pyplot as plt, ipywidgets\n"
        "plt.plot([1, 2, 3]); plt.show()\n"
        "display(ipywidgets.IntSlider(3))\n"
    )
    displayed = [m["content"]["data"] for m in run_in_kernel(lab, kernel_id, code)
                 if m["msg_type"] == "display_data"]
    assert any("image/png" in d for d in displayed), "matplotlib drew no inline figure"
    assert any("application/vnd.jupyter.widget-view+json" in d for d in displayed), "no widget view"


def test_serve_rejects_bad_input_and_creates_nothing(tmp_path):
    token_file = tmp_path / "token"
    env = {**os.environ, "LABKIT_TOKEN_FILE": str(token_file)}
    cases = [(["--port", "99999", "--root-dir", str(tmp_path)], "'99999'", "1 to 65535"),
             (["--ip", "localhost:1", "--root-dir", str(tmp_path)], "'localhost:1'", "IP address"),
             (["--root-dir", str(tmp_path / "nope")], "nope", "does not exist")]
    for args, value, accepted in cases:
        result = subprocess.run([sys.executable, "-m", "labkit.lab.jupyter", "serve", *args], env=env,
                                check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and value in lines[0] and accepted in lines[0], result.stderr
        assert not token_file.exists() and not (tmp_path / "nope").exists()


def test_token_is_made_once_and_private(tmp_path):
    path = tmp_path / "etc" / "jupyter_token"
    token, created = jupyter.ensure_token(path)
    assert created and len(token) == 48
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert path.read_text() == token  # no newline: Jupyter reads the file verbatim
    assert jupyter.ensure_token(path) == (token, False)


def test_sync_work_never_replaces_a_students_notebook(tmp_path):
    notebooks, work = tmp_path / "notebooks", tmp_path / "work"
    (notebooks / "figures").mkdir(parents=True)
    (notebooks / ".ipynb_checkpoints").mkdir()
    write_notebook(notebooks / "01-a.ipynb", "print('new version')")
    write_notebook(notebooks / "02-b.ipynb")
    (notebooks / "figures" / "map.svg").write_text("<svg/>")
    (notebooks / ".ipynb_checkpoints" / "01-a-checkpoint.ipynb").write_text("{}")
    work.mkdir()
    write_notebook(work / "01-a.ipynb", "print('my answer')")
    mine = (work / "01-a.ipynb").read_bytes()

    def sync() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "sync_work.py"),
                               "--notebooks", str(notebooks), "--work", str(work)],
                              check=False, capture_output=True, text=True, timeout=60)

    first = sync()
    assert first.returncode == 0, first.stderr
    assert (work / "01-a.ipynb").read_bytes() == mine
    assert (work / "02-b.ipynb").read_bytes() == (notebooks / "02-b.ipynb").read_bytes()
    assert (work / "figures" / "map.svg").read_text() == "<svg/>"
    assert not (work / ".ipynb_checkpoints").exists()
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    assert sync().returncode == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before


def reap_orphaned_browser_helpers(timeout: float = 10.0) -> None:
    """Wait for the browser helpers that were re-parented to this process.

    Chromium's crash handler and zygote outlive the browser by a moment; as a
    subreaper this process inherits them instead of PID 1 (which, in a container,
    may never reap them and would keep them as zombies).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ours = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(rest[1]) == os.getpid() and comm.startswith("chrom"):
                ours.append(int(entry.name))
        if not ours:
            return
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, os.WNOHANG)
            except (ProcessLookupError, ChildProcessError):
                pass
        time.sleep(0.1)


def chromium_dom(url: str, profile: Path, budget_ms: int = 20000) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",  # let JupyterLab's scripts render the file list
            "--dump-dom", url]
    prctl(Prctl.PR_SET_CHILD_SUBREAPER, 1)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            try:  # the browser's helpers (zygote, GPU, renderers) share its session
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            reap_orphaned_browser_helpers()
    finally:
        prctl(Prctl.PR_SET_CHILD_SUBREAPER, 0)
    return out.decode(errors="replace")


def test_make_lab_end_to_end_in_chromium():
    """The README's lab command, vagrant/lab.sh, then a real browser with the token."""
    need_tool("chromium")
    lab = Lab(lambda lab: ["bash", str(REPO / "vagrant" / "lab.sh")],
              env_extra={"LABKIT_LAB_IP": "127.0.0.1"})
    try:
        deadline = time.monotonic() + 10
        while "token=" not in lab.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        url = f"http://127.0.0.1:{lab.port}/lab?token={lab.token}"
        assert url in lab.log.read_text(), "lab.sh did not print the URL with the token"
        for attempt in range(2):  # a slow machine may need a second, longer look
            dom = chromium_dom(url, lab.dir / f"chromium{attempt}", budget_ms=20000 * (attempt + 1))
            if f"<span>{NOTEBOOK}</span>" in dom:
                break
        assert "jp-DirListing" in dom, "JupyterLab's file browser did not render"
        assert f"<span>{NOTEBOOK}</span>" in dom, "the work folder's notebook is not in the file list"
        without_token = chromium_dom(f"http://127.0.0.1:{lab.port}/lab", lab.dir / "chromium-login")
        assert "/login?next=" in without_token and NOTEBOOK not in without_token  # the login page
    finally:
        left = lab.stop()
    assert left == [], f"processes left after the lab stopped: {left}"
