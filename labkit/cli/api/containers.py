"""The Engine API's container routes: create, start, attach, wait, logs, exec and the rest.

A container made through the API is a detached labkit container: its output goes to its
log file (``labkit logs`` reads the same file), stdout and stderr together. So ``attach``
follows that file from where the container began, and sends it as Docker does: in
multiplexed frames without a terminal (all as stdout, since the log does not keep the
two apart), raw with one. The container's stdin stays /dev/null: ``docker run -i`` is
refused with one line, rather than silently not reading.

Layer: the top (labkit/cli/api).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import socket
import time
from datetime import datetime, timezone

from labkit.engine import http
from labkit.engine.http import ApiError, Request, Responder
from labkit.errors import LabkitError, NotFound

FOLLOW_POLL = 0.05  # seconds between looks at a running container's log


def add_routes(r: http.Router, wrap) -> None:
    for method, pattern, handler in [
        ("POST", "/containers/create", create), ("GET", "/containers/json", list_containers),
        ("GET", "/containers/{id}/json", inspect), ("POST", "/containers/{id}/start", start),
        ("POST", "/containers/{id}/attach", attach), ("POST", "/containers/{id}/wait", wait),
        ("GET", "/containers/{id}/logs", logs), ("POST", "/containers/{id}/stop", stop),
        ("POST", "/containers/{id}/kill", kill), ("POST", "/containers/{id}/pause", pause),
        ("POST", "/containers/{id}/unpause", unpause), ("DELETE", "/containers/{id}", delete),
        ("POST", "/containers/{id}/exec", exec_create), ("POST", "/exec/{id}/start", exec_start),
        ("GET", "/exec/{id}/json", exec_inspect),
    ]:  # fmt: skip
        r.add(method, pattern, wrap(handler))


def _id(req: Request) -> str:
    """The container the path names (an id, a prefix of one, or a name)."""
    from labkit.cli.containers import resolve

    try:
        return resolve(req.params["id"])
    except NotFound:
        raise ApiError(404, f"No such container: {req.params['id']}") from None


def _iso(t: float) -> str:
    if not t:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


# -- create: Docker's JSON as labkit run's flags ------------------------------------------
def run_argv(config: dict, host: dict, name: str) -> list[str]:
    """The ``labkit run -d`` arguments that mean what ``config`` and ``host`` say.

    >>> run_argv({"Image": "busybox", "Cmd": ["echo", "hi"], "Env": ["A=1"]}, {"AutoRemove": True}, "w")
    ['-d', '--name', 'w', '--rm', '-e', 'A=1', '--network', 'bridge', 'busybox', 'echo', 'hi']
    """
    if not isinstance(config.get("Image"), str) or not config["Image"]:
        raise ApiError(400, "Config.Image: an image name is required, e.g. busybox")
    if config.get("OpenStdin") or config.get("AttachStdin"):
        raise ApiError(400, "stdin is not supported through labkit's Engine API: run without -i, "
                            "or use labkit run -i")  # fmt: skip
    argv = ["-d"] + (["--name", name] if name else [])
    if host.get("AutoRemove"):
        argv.append("--rm")
    pairs = [("-e", e) for e in config.get("Env") or []]
    pairs += [("-w", config.get("WorkingDir")), ("-u", config.get("User")), ("--hostname", config.get("Hostname"))]
    pairs += [("-v", b) for b in host.get("Binds") or []]
    pairs += [("--cap-add", c) for c in host.get("CapAdd") or []] + [("--cap-drop", c) for c in host.get("CapDrop") or []]
    pairs += [("--security-opt", o) for o in host.get("SecurityOpt") or []]
    if host.get("Memory"):
        pairs.append(("-m", f"{int(host['Memory'])}b"))
    if host.get("MemorySwap"):
        pairs.append(("--memory-swap", str(host["MemorySwap"]) if host["MemorySwap"] == -1 else f"{int(host['MemorySwap'])}b"))
    if host.get("NanoCpus"):
        pairs.append(("--cpus", f"{host['NanoCpus'] / 1e9:g}"))
    if host.get("CpuShares"):
        pairs.append(("--cpu-shares", str(host["CpuShares"])))
    if host.get("PidsLimit"):
        pairs.append(("--pids-limit", str(host["PidsLimit"])))
    mode = host.get("NetworkMode") or "default"
    pairs.append(("--network", "bridge" if mode == "default" else mode))
    for port, bindings in (host.get("PortBindings") or {}).items():
        for b in bindings or [{}]:
            ip, hp = (b or {}).get("HostIp") or "", (b or {}).get("HostPort") or ""
            pairs.append(("-p", ":".join(x for x in (ip, hp) if x) + (":" if ip or hp else "") + port))
    argv += [x for flag, value in pairs if value for x in (flag, value)]
    argv += [flag for key, flag in (("Privileged", "--privileged"), ("ReadonlyRootfs", "--read-only"),
                                    ("PublishAllPorts", "-P")) if host.get(key)]  # fmt: skip
    if config.get("Tty"):
        argv.append("-t")
    entrypoint = config.get("Entrypoint")
    if isinstance(entrypoint, str):
        entrypoint = [entrypoint]
    cmd = list(config.get("Cmd") or [])
    if entrypoint:
        argv += ["--entrypoint", entrypoint[0]]
        cmd = entrypoint[1:] + cmd
    return argv + [config["Image"], *cmd]


def create(req: Request, out: Responder) -> None:
    from labkit.cli import dispatch, run

    doc = req.json({})
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a JSON object: {\"Image\": ..., \"HostConfig\": {...}}")
    name = req.query.get("name", "").lstrip("/")
    argv = run_argv(doc, doc.get("HostConfig") or {}, name)
    parser, _ = dispatch.build_parser("run")
    args = parser.parse_args(argv)
    from labkit.runtime import container

    if name and name in {s.name for s in container.list_states()}:
        raise ApiError(409, f'Conflict. The container name "/{name}" is already in use. '
                            "You have to remove (or rename) that container to be able to reuse that name.")  # fmt: skip
    try:
        cid = run.create(args)
    except NotFound as err:
        if "image" in str(err).lower():
            raise ApiError(404, f"No such image: {doc['Image']}") from None
        raise
    _api_record(cid, {"Tty": bool(doc.get("Tty")), "Config": doc})
    out.send(201, {"Id": cid, "Warnings": []})


def _api_record(cid: str, record: dict) -> None:
    """What the API was asked (Config, Tty), kept beside the container's state."""
    from labkit.runtime.state import container_dir

    (container_dir(cid) / "api.json").write_text(json.dumps(record))


def _record(cid: str) -> dict:
    from labkit.runtime.state import container_dir

    try:
        return json.loads((container_dir(cid) / "api.json").read_text())
    except (OSError, ValueError):
        return {}


def start(req: Request, out: Responder) -> None:
    from labkit.runtime import container
    from labkit.runtime.status import Status

    cid = _id(req)
    if container.load(cid).status is Status.RUNNING:
        out.send(304)
        return
    container.start(cid)
    out.send(204)


def wait(req: Request, out: Responder) -> None:
    """Answer 200 once the exit cannot be missed, the exit code at the exit. The docker
    CLI sends this before start, and starts once the 200 is in: so a --rm container
    that ends at once is still waited for."""
    from labkit.runtime import container

    cid = _id(req)
    condition = req.query.get("condition", "not-running")
    if condition not in ("not-running", "next-exit", "removed"):
        raise ApiError(400, f"invalid condition {condition!r}: expected not-running, next-exit or removed")
    writes = []
    try:
        code = container.wait_exit(cid, listening=lambda: writes.append(out.stream()))
    except NotFound:
        if not writes:
            raise ApiError(404, f"No such container: {req.params['id']}") from None
        code = 0  # removed (labkit rm -f) without an exit to tell
    write = writes[0]
    if condition == "removed":
        _until_gone(cid)
    write(json.dumps({"StatusCode": code, "Error": None}).encode() + b"\n")
    out.end_stream()


def _until_gone(cid: str, timeout: float = 30.0) -> None:
    from labkit import poll
    from labkit.runtime.state import container_dir

    # the shim removes it right after it has told the exit: look often
    poll.until(lambda: not container_dir(cid).exists(), timeout, most=0.005)


def _gone_or_stopped(cid: str) -> bool:
    from labkit.runtime import container
    from labkit.runtime.status import Status

    try:
        return container.load(cid).status is Status.STOPPED
    except NotFound:
        return True


def _open_log(cid: str):
    """The container's log file, open for reading from its start (None: none yet, or gone)."""
    from labkit.runtime import container

    try:
        return open(container.log_path(cid), "rb")
    except FileNotFoundError:
        return None


def _follow(log, cid: str, send, follow: bool = True) -> None:
    """Send what ``log`` holds and, with ``follow``, what it gets until the container
    stops (then what was written before the stop). Between two looks at the log it
    waits on an exit fifo of the container's: the stop is seen the moment the shim
    records it, and a running container's output is looked for every FOLLOW_POLL s."""
    from labkit.runtime import container

    with log, contextlib.ExitStack() as stack:
        exited = []  # the exit fifo's fd, while the container is there to watch
        if follow:
            with contextlib.suppress(NotFound):  # gone already: the log is all there is
                exited.append(stack.enter_context(container.exit_fifo(cid)))
        while True:
            stopped = not follow or _gone_or_stopped(cid)
            data = log.read(http.CHUNK)
            while data:
                send(data)
                data = log.read(http.CHUNK)
            if stopped:
                return
            if select.select(exited, [], [], FOLLOW_POLL)[0] and not os.read(exited[0], 64):
                time.sleep(FOLLOW_POLL)  # a writer came and went without a word: the fifo stays readable


def attach(req: Request, out: Responder) -> None:
    cid = _id(req)
    tty = bool(_record(cid).get("Tty"))
    log = _open_log(cid)  # before start: from the beginning
    sock = out.hijack(multiplexed=not tty)
    if not req.flag("stream") or log is None:
        return
    send = sock.sendall if tty else (lambda data: sock.sendall(http.frame(http.STDOUT, data)))
    try:  # (a client without stdin closes its side at once: that is no leaving)
        _follow(log, cid, send)
    except (BrokenPipeError, ConnectionResetError):  # the client went: the container stays
        return
    sock.shutdown(socket.SHUT_WR)


def logs(req: Request, out: Responder) -> None:
    cid = _id(req)
    if not (req.flag("stdout") or req.flag("stderr")):
        raise ApiError(400, "you must choose at least one stream: stdout=1 or stderr=1")
    tty = bool(_record(cid).get("Tty"))
    write = out.stream("application/vnd.docker.raw-stream" if tty else "application/vnd.docker.multiplexed-stream")
    send = write if tty else (lambda data: write(http.frame(http.STDOUT, data)))
    log = _open_log(cid)
    if log is not None:
        _follow(log, cid, send, follow=req.flag("follow"))
    out.end_stream()


def _summary(s) -> dict:
    from labkit.cli.containers import _status

    return {"Id": s.id, "Names": [f"/{s.name}"], "Image": s.image, "ImageID": "", "Command": " ".join(s.command),
            "Created": int(s.created), "State": s.status.value if s.status.value != "stopped" else "exited",
            "Status": _status(s, time.time()), "Ports": [], "Labels": {}, "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {"Networks": {}}, "Mounts": []}  # fmt: skip


def list_containers(req: Request, out: Responder) -> None:
    from labkit.runtime import container
    from labkit.runtime.status import Status

    states = [s for s in container.list_states() if req.flag("all") or s.status is not Status.STOPPED]
    out.send(200, [_summary(s) for s in sorted(states, key=lambda s: -s.created)])


def inspect(req: Request, out: Responder) -> None:
    from labkit.runtime import container
    from labkit.runtime.status import Status

    cid = _id(req)
    s = container.load(cid)
    record = _record(cid)
    config = record.get("Config") or {"Image": s.image, "Cmd": list(s.command)}
    running = s.status in (Status.RUNNING, Status.PAUSED)
    out.send(200, {
        "Id": s.id, "Name": f"/{s.name}", "Created": _iso(s.created), "Path": s.command[0] if s.command else "",
        "Args": list(s.command[1:]), "Image": s.image, "LogPath": str(container.log_path(cid)),
        "State": {"Status": "exited" if s.status is Status.STOPPED else s.status.value, "Running": running,
                  "Paused": s.status is Status.PAUSED, "Restarting": False, "OOMKilled": s.oom_killed, "Dead": False,
                  "Pid": s.pid if running else 0, "ExitCode": s.exit_code or 0, "Error": s.error,
                  "StartedAt": _iso(s.started), "FinishedAt": _iso(s.finished)},
        "Config": {"Image": s.image, "Tty": bool(record.get("Tty")), "Cmd": config.get("Cmd"),
                   "Entrypoint": config.get("Entrypoint"), "Env": config.get("Env") or [],
                   "OpenStdin": False, "AttachStdout": True, "AttachStderr": True, "Labels": config.get("Labels") or {}},
        "HostConfig": {"AutoRemove": s.auto_remove, **(config.get("HostConfig") or {}),
                       "LogConfig": {"Type": "json-file", "Config": {}}},  # docker-py reads logs only from these
        "NetworkSettings": {"Networks": {}}, "Mounts": [], "Driver": "overlay2"})  # fmt: skip


def stop(req: Request, out: Responder) -> None:
    from labkit.cli.containers import _stop_signal
    from labkit.runtime import container
    from labkit.runtime.status import Status

    cid = _id(req)
    if container.load(cid).status is Status.STOPPED:
        out.send(304)
        return
    container.stop(cid, float(req.query.get("t") or 10), _stop_signal(cid))
    out.send(204)


def kill(req: Request, out: Responder) -> None:
    from labkit.cli.containers import parse_signal
    from labkit.runtime import container

    cid = _id(req)
    try:
        sig = parse_signal(req.query.get("signal") or "KILL")
    except LabkitError as err:
        raise ApiError(400, err.one_line()) from None
    container.kill(cid, sig)
    out.send(204)


def pause(req: Request, out: Responder) -> None:
    from labkit.runtime import container

    container.pause(_id(req))
    out.send(204)


def unpause(req: Request, out: Responder) -> None:
    from labkit.runtime import container

    container.resume(_id(req))
    out.send(204)


def delete(req: Request, out: Responder) -> None:
    from labkit.cli.containers import network_hooks
    from labkit.runtime import container
    from labkit.runtime.status import Status

    cid = _id(req)
    if container.load(cid).status is not Status.STOPPED and not req.flag("force"):
        raise ApiError(409, f"You cannot remove a running container {cid}. Stop the container before "
                            "attempting removal or force remove")  # fmt: skip
    network_hooks()
    container.delete(cid, force=req.flag("force"))
    out.send(204)


# -- exec -------------------------------------------------------------------------------
def _exec_path(exec_id: str):
    """execs/<id>.json in the container's state dir: it goes when the container goes."""
    from labkit.runtime import container
    from labkit.runtime.state import container_dir

    for cid in container.ids():
        path = container_dir(cid) / "execs" / f"{exec_id}.json"
        if path.exists():
            return cid, path
    raise ApiError(404, f"No such exec instance: {exec_id}")


def exec_create(req: Request, out: Responder) -> None:
    from labkit.runtime import container
    from labkit.runtime.state import container_dir
    from labkit.runtime.status import check

    cid = _id(req)
    doc = req.json({})
    cmd = doc.get("Cmd") if isinstance(doc, dict) else None
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise ApiError(400, 'Cmd: a list of strings is required, e.g. ["sh", "-c", "echo hi"]')
    if doc.get("AttachStdin"):
        raise ApiError(400, "stdin is not supported through labkit's Engine API: exec without -i")
    check("exec", cid, container.load(cid).status)
    exec_id = secrets.token_hex(32)
    d = container_dir(cid) / "execs"
    d.mkdir(exist_ok=True)
    record = {"ID": exec_id, "ContainerID": cid, "Running": False, "ExitCode": None, "Pid": 0,
              "ProcessConfig": {"entrypoint": cmd[0], "arguments": cmd[1:], "tty": bool(doc.get("Tty")),
                                "user": doc.get("User") or ""},
              "Env": doc.get("Env") or [], "WorkingDir": doc.get("WorkingDir") or "", "Tty": bool(doc.get("Tty"))}  # fmt: skip
    (d / f"{exec_id}.json").write_text(json.dumps(record))
    out.send(201, {"Id": exec_id})


def exec_start(req: Request, out: Responder) -> None:
    from labkit.cli import runflags
    from labkit.kernel import proc
    from labkit.runtime import container, execute

    exec_id = req.params["id"]
    cid, path = _exec_path(exec_id)
    record = json.loads(path.read_text())
    if record["Running"] or record["ExitCode"] is not None:
        raise ApiError(409, f"exec {exec_id[:12]} has already run")
    cfg = record["ProcessConfig"]
    uid = gid = None
    if cfg["user"]:
        uid, gid = runflags.user_ids(cfg["user"], [f"/proc/{container.load(cid).pid}/root"])
    # The 101 goes out before the process starts: a client reads the answer's headers
    # through a buffer, and output sent right behind them could land in that buffer
    # instead of the stream it reads next (docker-py does so)
    detach = bool((req.json({}) or {}).get("Detach"))
    sock = None if detach else out.hijack(multiplexed=not record["Tty"])
    null = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = execute.exec_in(cid, [cfg["entrypoint"], *cfg["arguments"]], env=record["Env"],
                              cwd=record["WorkingDir"] or None, uid=uid, gid=gid,
                              stdio=container.Stdio(null, out_w, err_w), wait=False)  # fmt: skip
    except LabkitError as err:  # the command cannot run: said on the stream, as dockerd does
        os.close(out_r)
        os.close(err_r)
        code = getattr(err, "exit_code", 126)
        path.write_text(json.dumps({**record, "ExitCode": code}))
        if sock is None:
            raise
        sock.sendall(http.frame(http.STDERR, f"{err.one_line()}\n".encode()) if not record["Tty"]
                     else f"{err.one_line()}\r\n".encode())  # fmt: skip
        return
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    path.write_text(json.dumps({**record, "Running": True, "Pid": pid}))
    if detach:
        out.send(200)
    streams = {out_r: http.STDOUT, err_r: http.STDERR}
    while streams:
        for fd in select.select(list(streams), [], [])[0]:
            data = os.read(fd, http.CHUNK)
            if not data:
                os.close(fd)
                del streams[fd]
            elif sock is not None:
                try:
                    sock.sendall(data if record["Tty"] else http.frame(streams[fd], data))
                except OSError:  # the client left: the process runs on, its output is dropped
                    sock = None
    code = proc.exit_code(os.waitpid(pid, 0)[1])
    path.write_text(json.dumps({**record, "Running": False, "Pid": pid, "ExitCode": code}))
    if sock is not None:
        sock.shutdown(socket.SHUT_WR)


def exec_inspect(req: Request, out: Responder) -> None:
    _, path = _exec_path(req.params["id"])
    record = json.loads(path.read_text())
    out.send(200, {**record, "OpenStdin": False, "OpenStdout": True, "OpenStderr": True, "CanRemove": False})
