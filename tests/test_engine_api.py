"""labkitd's Docker Engine API, driven by clients nobody here wrote: Debian's docker CLI
(package docker.io; /usr/bin/docker, never another one on PATH) and docker-py.

Every test talks to the API socket of a labkitd started for it; nothing reaches a
dockerd (none runs). Raw requests check the errors: malformed HTTP, bad JSON, unknown
paths and huge bodies get Docker's answers, and labkitd answers the next request.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import time

import pytest
from bundles import labkit, leftovers, until
from conftest import need_tool

from labkit.cli.daemon import start as start_labkitd
from labkit.engine import daemon

DOCKER = "/usr/bin/docker"  # Debian's docker.io (a hand-installed one may come first on PATH)


@pytest.fixture
def api():
    need_tool(DOCKER)
    start_labkitd()
    path = str(daemon.api_socket_path())
    yield path
    for line in labkit("ps", "-a", "-q").stdout.split():
        labkit("rm", "-f", line)
    if daemon.running_pid():
        daemon.stop()
    assert not os.path.exists(path), "the API socket outlived labkitd"
    assert leftovers() == []


def docker(sock: str, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_CONFIG": "/nonexistent-docker-config"}
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, **kw)  # fmt: skip


def raw(sock: str, request: bytes, timeout: float = 10) -> tuple[int, dict]:
    """Send bytes as they are; the status and the JSON body of the answer."""
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(timeout)
        c.connect(sock)
        c.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            piece = c.recv(65536)
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.strip() else {}


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_docker_run_prints_and_exits_as_the_container_did(api):
    r = docker(api, "run", "--rm", "busybox", "echo", "hi")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = docker(api, "run", "--name", "three", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3 and "out" in r.stdout + r.stderr and "err" in r.stdout + r.stderr, r
    assert "Exited (3)" in docker(api, "ps", "-a").stdout
    assert docker(api, "rm", "three").returncode == 0
    assert "three" not in labkit("ps", "-a").stdout  # labkit sees what the API made, and its removal
    assert leftovers() == []


def test_attach_and_logs_follow_a_container_until_it_exits(api):
    r = docker(api, "run", "--rm", "busybox", "sh", "-c", "echo one; sleep 0.3; echo two")
    assert (r.returncode, r.stdout) == (0, "one\ntwo\n"), r.stderr
    cid = docker(api, "run", "-d", "busybox", "sh", "-c", "echo a; sleep 0.5; echo b").stdout.strip()
    r = docker(api, "logs", "-f", cid)  # while it sleeps: follows it to its end
    assert (r.returncode, r.stdout) == (0, "a\nb\n"), r.stderr
    assert docker(api, "rm", cid).returncode == 0


def test_detached_ps_logs_exec_stop_rm_and_images(api):
    r = docker(api, "run", "-d", "--name", "web", "busybox", "sh", "-c", "echo started; sleep 300")
    cid = r.stdout.strip()
    assert r.returncode == 0 and len(cid) == 64, r.stderr
    until(lambda: "started" in docker(api, "logs", "web").stdout)
    ps = docker(api, "ps").stdout
    assert cid[:12] in ps and "web" in ps and "Up " in ps
    assert "web" in labkit("ps").stdout  # the same container, seen by labkit's own client
    r = docker(api, "exec", "web", "sh", "-c", "echo in exec; echo to err >&2; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, "in exec\n", "to err\n")  # stdout and stderr apart
    r = docker(api, "exec", "web", "no-such-command")  # said on the stream, and its exit code
    assert r.returncode == 127 and "no-such-command" in r.stderr, r
    assert docker(api, "pause", "web").returncode == 0
    assert "(Paused)" in docker(api, "ps").stdout and "Paused" in labkit("ps").stdout
    assert docker(api, "unpause", "web").returncode == 0
    assert "(Paused)" not in docker(api, "ps").stdout
    started = time.monotonic()
    assert docker(api, "stop", "-t", "1", "web").returncode == 0
    assert time.monotonic() - started < 10
    assert "Exited" in docker(api, "ps", "-a").stdout
    assert docker(api, "rm", "-f", "web").returncode == 0
    assert "web" not in docker(api, "ps", "-a").stdout
    docker(api, "run", "-d", "--name", "victim", "busybox", "sleep", "300")
    assert docker(api, "kill", "-s", "KILL", "victim").returncode == 0
    until(lambda: "Exited (137)" in docker(api, "ps", "-a").stdout)
    assert docker(api, "rm", "victim").returncode == 0
    images = docker(api, "images").stdout
    assert images.startswith("REPOSITORY") and "busybox" in images
    r = docker(api, "rm", "no-such-container")
    assert r.returncode != 0 and "No such container: no-such-container" in r.stderr


def test_pull_from_the_local_registry_and_build(api, tmp_dir):
    from labkit.lab.registry import local_registry

    need_tool("docker-registry")
    with local_registry() as reg:
        name = f"{reg.address}/course/bb:v1"
        assert labkit("tag", "busybox", name).returncode == 0
        assert labkit("push", name, timeout=120).returncode == 0
        assert labkit("rmi", name).returncode == 0
        r = docker(api, "pull", name)
        assert r.returncode == 0 and "Status: Downloaded newer image" in r.stdout, r.stdout + r.stderr
        assert f"{reg.address}/course/bb" in docker(api, "images").stdout
        (tmp_dir / "Dockerfile").write_text(f"FROM {name}\nCOPY msg.txt /\nRUN cat /msg.txt > /copy\n"
                                            'CMD ["cat", "/copy"]\n')  # fmt: skip
        (tmp_dir / "msg.txt").write_text("sent as the build context\n")
        r = docker(api, "build", "-t", "api-built:v1", str(tmp_dir))
        assert r.returncode == 0 and "Step 1/4 : FROM" in r.stdout and "Successfully tagged api-built:v1" in r.stdout, r
        r = docker(api, "run", "--rm", "api-built:v1")
        assert (r.returncode, r.stdout) == (0, "sent as the build context\n"), r.stderr
        r = docker(api, "build", "-t", "api-built:v1", str(tmp_dir))
        assert r.stdout.count("Using cache") == 3, r.stdout
        assert docker(api, "rmi", "api-built:v1", name).returncode == 0


def test_a_terminal_networks_and_a_push(api, tmp_dir):
    r = docker(api, "run", "--rm", "-t", "busybox", "sh", "-c", "tty; echo on a terminal")
    assert r.returncode == 0 and r.stdout.replace("\r\n", "\n") == "/dev/console\non a terminal\n", r  # raw, not framed
    assert docker(api, "network", "create", "apinet").returncode == 0
    assert "apinet" in docker(api, "network", "ls").stdout and "apinet" in labkit("network", "ls").stdout
    subnet = json.loads(docker(api, "network", "inspect", "apinet").stdout)[0]["IPAM"]["Config"][0]["Subnet"]
    r = docker(api, "run", "--rm", "--network", "apinet", "busybox", "ip", "-4", "-o", "addr", "show", "eth0")
    assert r.returncode == 0 and subnet.rsplit(".", 2)[0] in r.stdout, (r.stdout, subnet)
    r = docker(api, "run", "-d", "--name", "onnet", "--network", "apinet", "busybox", "sleep", "60")
    r = docker(api, "network", "rm", "apinet")
    assert r.returncode != 0 and "onnet" in r.stderr, r.stderr  # in use: refused, and says by whom
    docker(api, "rm", "-f", "onnet")
    assert docker(api, "network", "rm", "apinet").returncode == 0
    assert "apinet" not in labkit("network", "ls").stdout
    from labkit.lab.registry import local_registry

    need_tool("docker-registry")
    with local_registry() as reg:
        name = f"{reg.address}/course/pushed:v2"
        assert docker(api, "tag", "busybox", name).returncode == 0
        r = docker(api, "push", name)
        assert r.returncode == 0 and "digest: sha256:" in r.stdout, r.stdout + r.stderr
        assert docker(api, "rmi", name).returncode == 0
        assert labkit("pull", name, timeout=120).returncode == 0  # what docker pushed, labkit pulls
        labkit("rmi", name)


def test_docker_py_runs_a_container(api):
    docker_py = pytest.importorskip("docker")  # requirements.txt installs it
    client = docker_py.DockerClient(base_url=f"unix://{api}")
    try:
        assert client.version()["ApiVersion"] == "1.41"
        assert client.containers.run("busybox", "echo hi", remove=True) == b"hi\n"
        c = client.containers.run("busybox", ["sleep", "60"], detach=True, name="py")
        assert c.status in ("created", "running") and client.containers.get("py").status == "running"
        assert c.exec_run("echo from exec").output == b"from exec\n"
        assert c.exec_run(["sh", "-c", "exit 7"]).exit_code == 7
        assert c.logs() == b""  # a sleeping container has logged nothing
        assert "busybox:latest" in [t for i in client.images.list() for t in i.tags]
        c.remove(force=True)
        with pytest.raises(docker_py.errors.NotFound, match="No such container"):
            client.containers.get("py")
    finally:
        client.close()


def test_bad_requests_get_docker_s_answers_and_labkitd_serves_on(api):
    assert raw(api, b"NONSENSE\r\n\r\n")[0] == 400
    assert raw(api, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n") == (404, {"message": "page not found"})
    body = b"{not json"
    status, doc = raw(api, b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                      % (len(body), body))  # fmt: skip
    assert status == 400 and "invalid JSON" in doc["message"]
    status, doc = raw(api, b"POST /containers/create HTTP/1.1\r\nContent-Length: 9999999999999\r\n\r\n")
    assert status == 413 and "larger than" in doc["message"]
    big = b"[" + b"0," * (9 * 1024 * 1024) + b"0]"  # 18 MiB of JSON: too much for a request
    status, doc = raw(api, b"POST /containers/create HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big))
    assert status == 413 and "at most" in doc["message"]
    status, doc = raw(api, b"GET /v9.99/info HTTP/1.1\r\n\r\n")
    assert status == 400 and doc["message"].startswith("client version 9.99 is too new")
    status, doc = raw(api, b"GET /v1.41/containers/nosuch/json HTTP/1.1\r\n\r\n")
    assert (status, doc) == (404, {"message": "No such container: nosuch"})
    status, doc = raw(api, b"GET /v1.41/images/no-such-image:v9/json HTTP/1.1\r\n\r\n")
    assert status == 404 and "No such image" in doc["message"]
    status, doc = raw(api, b"DELETE /v1.41/info HTTP/1.1\r\n\r\n")
    assert status == 405
    assert raw(api, b"GET /_ping HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n")[0] == 431
    with socket.socket(socket.AF_UNIX) as c:  # a client that sends half a request and goes
        c.connect(api)
        c.sendall(b"POST /containers/create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    assert docker(api, "version").returncode == 0  # still serving


def test_connection_close_ends_the_connection_after_a_create(api):
    """A client that reads up to the end of the connection gets it right after the answer,
    although the create forked a shim that holds a copy of the socket for the container's life."""
    body = json.dumps({"Image": "busybox", "Cmd": ["sleep", "30"], "HostConfig": {"NetworkMode": "none"}}).encode()
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)  # without the server's shutdown, recv() waits for the container's end
        c.connect(api)
        c.sendall(b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%b" % (len(body), body))  # fmt: skip
        data = b""
        while piece := c.recv(65536):
            data += piece
    assert data.startswith(b"HTTP/1.1 201 Created"), data[:200]
    cid = json.loads(data.partition(b"\r\n\r\n")[2])["Id"]
    assert json.loads(docker(api, "inspect", cid).stdout)[0]["State"]["Status"] == "created"
    assert docker(api, "rm", "-f", cid).returncode == 0


def test_a_client_that_leaves_mid_attach_leaves_the_container_running(api):
    cid = docker(api, "run", "-d", "busybox", "sh", "-c", "while :; do echo tick; sleep 0.2; done").stdout.strip()
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(api)
        c.sendall(f"POST /v1.41/containers/{cid}/attach?stream=1&stdout=1 HTTP/1.1\r\nUpgrade: tcp\r\n"
                  "Connection: Upgrade\r\n\r\n".encode())  # fmt: skip
        c.settimeout(10)
        got = b""
        while b"tick" not in got:
            got += c.recv(4096)
        assert got.startswith(b"HTTP/1.1 101 UPGRADED")
    time.sleep(0.5)
    state = json.loads(docker(api, "inspect", cid).stdout)[0]["State"]
    assert state["Running"] and state["Status"] == "running"


def test_fifty_parallel_runs_all_succeed_and_leave_nothing(api):
    def one(i: int) -> int:
        return docker(api, "run", "--rm", "--network", "none", "busybox", "true", timeout=180).returncode

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:  # bounded: 10 at a time, 50 in all
        codes = list(pool.map(one, range(50)))
    assert codes == [0] * 50, codes
    assert time.monotonic() - started < 300
    assert docker(api, "ps", "-aq").stdout == ""
    assert leftovers() == []


def test_the_socket_is_for_root_only(api):
    st = os.stat(api)
    assert st.st_uid == 0 and st.st_mode & 0o077 in (0, 0o060)  # 0600, or 0660 with the labkit group
    pid = os.fork()
    if pid == 0:  # an ordinary user may not connect
        os.setgid(65534)
        os.setuid(65534)
        try:
            socket.socket(socket.AF_UNIX).connect(api)
            os._exit(1)
        except PermissionError:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
