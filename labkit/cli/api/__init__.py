"""The Docker Engine API, served by labkitd on ``/run/labkit/docker.sock``.

The slide's "Docker Engine" is a daemon behind a REST API; the ``docker`` command is one
client of many. labkitd speaks the same API (version 1.41, Docker 20.10's), so the real
docker CLI and docker-py drive labkit:

    DOCKER_HOST=unix:///run/labkit/docker.sock docker run --rm busybox echo hi

What ``docker run`` sends, in order (each on its own connection):

    GET  /_ping                                  which API version to speak
    POST /v1.41/containers/create?name=N         Config + HostConfig as JSON -> {"Id": ...}
    POST /v1.41/containers/ID/attach?stream=1&stdout=1&stderr=1   101, then the output
    POST /v1.41/containers/ID/wait?condition=next-exit            answers at the exit
    POST /v1.41/containers/ID/start              204

Each route turns Docker's JSON into what the labkit command does for the same flags:
``containers/create`` builds ``labkit run``'s argument list from Config and HostConfig,
so there is one meaning of every option (cli/run.py, cli/runflags.py). The HTTP itself,
framing and streams are labkit/engine/http.py; labkitd forks one worker per connection
(engine/daemon.py).

Layer: the top, beside the CLI: like the command line, it translates Docker's
vocabulary into calls on the engine and the runtime.
"""

from __future__ import annotations

import os
import platform
import socket

from labkit import __version__, paths
from labkit.cli.api import containers, images
from labkit.engine import http
from labkit.engine.http import ApiError, Request, Responder
from labkit.errors import AlreadyExists, InvalidValue, LabkitError, NotFound, StateError, UsageError

API_VERSION = "1.41"  # Docker 20.10's, what Debian 12's docker CLI speaks
MIN_API_VERSION = "1.12"
HEADERS = {"Api-Version": API_VERSION, "Server": f"labkit/{__version__} (linux)", "Docker-Experimental": "false",
           "Ostype": "linux"}  # fmt: skip


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def check_version(asked: str) -> None:
    """Version negotiation: a path's /v1.NN/ between MIN_API_VERSION and API_VERSION."""
    if not asked:
        return
    if _version_tuple(asked) > _version_tuple(API_VERSION):
        raise ApiError(400, f"client version {asked} is too new. Maximum supported API version is {API_VERSION}")
    if _version_tuple(asked) < _version_tuple(MIN_API_VERSION):
        raise ApiError(400, f"client version {asked} is too old. Minimum supported API version is "
                            f"{MIN_API_VERSION}, please upgrade your client to a newer version")  # fmt: skip


def status_of(err: LabkitError) -> int:
    """Docker's status code for a labkit error: 404 no such, 409 conflict, 400 bad value."""
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, (AlreadyExists, StateError)):
        return 409
    if isinstance(err, (InvalidValue, UsageError)):
        return 400
    return 500


def labkit_errors(handler):
    """A route whose LabkitError becomes Docker's error answer, in one line."""

    def wrapped(req: Request, out: Responder) -> None:
        try:
            handler(req, out)
        except LabkitError as err:
            raise ApiError(status_of(err), err.one_line()) from None

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


# -- /_ping, /version, /info ----------------------------------------------------------------
def ping(req: Request, out: Responder) -> None:
    out.extra = {**out.extra, "Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache"}
    out.send(200, b"" if req.method == "HEAD" else b"OK", content_type="text/plain; charset=utf-8")


def version(req: Request, out: Responder) -> None:
    u = os.uname()
    out.send(200, {"Platform": {"Name": "labkit"}, "Version": __version__, "ApiVersion": API_VERSION,
                   "MinAPIVersion": MIN_API_VERSION, "Os": "linux", "Arch": _arch(), "KernelVersion": u.release,
                   "GoVersion": f"python{platform.python_version()}", "GitCommit": "", "BuildTime": "",
                   "Components": [{"Name": "Engine", "Version": __version__,
                                   "Details": {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION}}]})  # fmt: skip


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def info(req: Request, out: Responder) -> None:
    from labkit.engine import images as store
    from labkit.kernel import cgroups
    from labkit.runtime import container
    from labkit.runtime.status import Status

    states = container.list_states()
    count = {s: sum(1 for x in states if x.status is s) for s in Status}
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    out.send(200, {"ID": "labkit", "Containers": len(states), "ContainersRunning": count[Status.RUNNING],
                   "ContainersPaused": count[Status.PAUSED], "ContainersStopped": count[Status.STOPPED],
                   "Images": len(store.list_images()), "Driver": "overlay2", "DriverStatus": [],
                   "CgroupDriver": "cgroupfs", "CgroupVersion": str(cgroups.version()),
                   "KernelVersion": os.uname().release, "OperatingSystem": _os_name(), "OSType": "linux",
                   "Architecture": os.uname().machine, "NCPU": os.cpu_count(), "MemTotal": mem,
                   "DockerRootDir": str(paths.lib_root()), "Name": socket.gethostname(), "ServerVersion": __version__,
                   "SecurityOptions": ["name=seccomp,profile=builtin"], "DefaultRuntime": "labkit",
                   "Runtimes": {"labkit": {"path": "labkit runtime"}}, "Swarm": {"LocalNodeState": "inactive"},
                   "Plugins": {"Volume": [], "Network": ["bridge", "host", "none"], "Log": ["json-file"]},
                   "Warnings": []})  # fmt: skip


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("PRETTY_NAME", "Linux").strip('"')
    except OSError:
        return "Linux"


def router() -> http.Router:
    r = http.Router()
    r.add("GET", "/_ping", ping)
    r.add("GET", "/version", version)
    r.add("GET", "/info", labkit_errors(info))
    containers.add_routes(r, labkit_errors)
    images.add_routes(r, labkit_errors)
    return r


def serve(conn: socket.socket, log=lambda line: None) -> None:
    """Answer one client connection (labkitd's API worker calls this)."""
    http.serve_connection(conn, router(), HEADERS, check_version, log)
