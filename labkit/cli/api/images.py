"""The Engine API's image, build and network routes.

``docker pull`` and ``docker push`` get their progress as a stream of JSON objects, one a
line (``{"status": "Downloading", "id": "a1b2c3d4e5f6", "progressDetail": {...}}``); the
client draws its bars from them. ``docker build`` sends the context as a tar in the
request's body, "the context sent to the daemon" of the lecture's slide: labkitd
unpacks it (safely: engine/layers.py) into a temporary directory and builds there,
streaming each line of the build as ``{"stream": "Step 1/3 : FROM busybox\\n"}``.
An error half-way through a stream is one more object, ``{"error": ..., "errorDetail":
{"message": ...}}``, since the status line has gone out already.

Layer: the top (labkit/cli/api).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from datetime import datetime, timezone

from labkit.engine import http
from labkit.engine.http import ApiError, Request, Responder
from labkit.errors import LabkitError, NotFound


def add_routes(r: http.Router, wrap) -> None:
    for method, pattern, handler in [
        ("GET", "/images/json", list_images), ("POST", "/images/create", pull), ("POST", "/build", build),
        ("GET", "/images/{name*}/json", inspect), ("GET", "/images/{name*}/history", history),
        ("POST", "/images/{name*}/tag", tag), ("POST", "/images/{name*}/push", push),
        ("DELETE", "/images/{name*}", remove),
        ("GET", "/networks", list_networks), ("POST", "/networks/create", create_network),
        ("GET", "/networks/{id}", inspect_network), ("DELETE", "/networks/{id}", remove_network),
    ]:  # fmt: skip
        r.add(method, pattern, wrap(handler))


def _get(name: str):
    from labkit.engine import images

    try:
        return images.get(name)
    except NotFound:
        raise ApiError(404, f"No such image: {name}") from None


def _json_stream(out: Responder):
    """Start a JSON-lines answer; returns send(obj)."""
    write = out.stream()
    return lambda obj: write(json.dumps(obj).encode() + b"\r\n")


def _streamed(out: Responder, work) -> None:
    """Run ``work(send)``; an error after the stream began is sent as Docker does."""
    send = _json_stream(out)
    try:
        work(send)
    except LabkitError as err:
        send({"errorDetail": {"message": err.one_line()}, "error": err.one_line()})
    out.end_stream()


def list_images(req: Request, out: Responder) -> None:
    from labkit.engine import images

    out.send(200, [{"Id": i.id, "ParentId": "", "RepoTags": [i.ref], "RepoDigests": [], "Created": int(i.created),
                    "Size": i.size_bytes, "VirtualSize": i.size_bytes, "SharedSize": -1,
                    "Labels": i.config.labels or None, "Containers": -1}
                   for i in images.list_images()])  # fmt: skip


def inspect(req: Request, out: Responder) -> None:
    from labkit.engine import images

    i = _get(req.params["name"])
    doc = images.config_doc(i.id)
    created = datetime.fromtimestamp(i.created, timezone.utc).isoformat().replace("+00:00", "Z")
    out.send(200, {"Id": i.id, "RepoTags": [i.ref], "RepoDigests": [], "Parent": "", "Comment": "",
                   "Created": created, "Config": doc.get("config") or {}, "Architecture": doc.get("architecture", ""),
                   "Os": doc.get("os", "linux"), "Size": i.size_bytes, "VirtualSize": i.size_bytes,
                   "RootFS": doc.get("rootfs") or {"Type": "layers"}, "GraphDriver": {"Name": "overlay2", "Data": {}},
                   "Metadata": {"LastTagTime": created}})  # fmt: skip


def history(req: Request, out: Responder) -> None:
    from labkit.engine import images

    i = _get(req.params["name"])
    rows = images.config_doc(i.id).get("history") or []
    out.send(200, [{"Id": i.id if n == 0 else "<missing>", "Created": 0, "CreatedBy": h.get("created_by", ""),
                    "Tags": [i.ref] if n == 0 else None, "Size": 0, "Comment": h.get("comment", "")}
                   for n, h in enumerate(reversed(rows))])  # fmt: skip


def tag(req: Request, out: Responder) -> None:
    from labkit.engine import images

    repo, tag_ = req.query.get("repo", ""), req.query.get("tag", "") or "latest"
    if not repo:
        raise ApiError(400, "repo: the new name is required, e.g. ?repo=localhost:5000/app&tag=v1")
    _get(req.params["name"])
    images.tag(req.params["name"], f"{repo}:{tag_}")
    out.send(201)


def remove(req: Request, out: Responder) -> None:
    from labkit.engine import images

    i = _get(req.params["name"])
    images.remove(req.params["name"])
    out.send(200, [{"Untagged": i.ref}, {"Deleted": i.id}])


def _credentials(req: Request) -> tuple[str, str] | None:
    """X-Registry-Auth: base64url of {"username": ..., "password": ...} (or of {})."""
    raw = req.headers.get("x-registry-auth", "")
    if not raw:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except ValueError:
        raise ApiError(400, "X-Registry-Auth: expected base64url of a JSON object") from None
    if isinstance(doc, dict) and doc.get("username"):
        return doc["username"], doc.get("password", "")
    return None


def _progress(send):
    def say(p) -> None:
        detail = {"current": p.current, "total": p.total} if p.total else {}
        send({"status": p.status, "progressDetail": detail, "id": p.id})

    return say


def pull(req: Request, out: Responder) -> None:
    from labkit.engine import pull as puller
    from labkit.engine import reference

    image = req.query.get("fromImage", "")
    if not image:
        raise ApiError(400, "fromImage: the image to pull is required, e.g. ?fromImage=busybox&tag=latest")
    tag_ = req.query.get("tag", "")
    name = f"{image}@{tag_}" if tag_.startswith("sha256:") else f"{image}:{tag_}" if tag_ else image
    credentials = _credentials(req)

    def work(send) -> None:
        ref = reference.parse(name)
        send({"status": f"Pulling from {ref.path}", "id": ref.reference})
        done = puller.pull(name, progress=_progress(send), credentials=credentials)
        send({"status": f"Digest: {done.digest}"})
        verb = "Downloaded newer image for" if done.updated else "Image is up to date for"
        send({"status": f"Status: {verb} {done.image.ref}"})

    _streamed(out, work)


def push(req: Request, out: Responder) -> None:
    from labkit.engine import push as pusher

    tag_ = req.query.get("tag", "")
    name = f"{req.params['name']}:{tag_}" if tag_ else req.params["name"]
    _get(name)
    credentials = _credentials(req)

    def work(send) -> None:
        done = pusher.push(name, progress=_progress(send), credentials=credentials)
        send({"status": f"{tag_ or 'latest'}: digest: {done.digest} size: {done.size}"})
        send({"progressDetail": {}, "aux": {"Tag": tag_ or "latest", "Digest": done.digest, "Size": done.size}})

    _streamed(out, work)


def build(req: Request, out: Responder) -> None:
    """POST /build: the body is the context, a tar (the docker CLI sends it uncompressed)."""
    from labkit.engine import build as builder
    from labkit.engine import layers

    if req.body is None:
        raise ApiError(400, "the build context is missing: send it as a tar in the request body")
    try:
        build_args = json.loads(req.query.get("buildargs") or "{}")
    except ValueError:
        raise ApiError(400, "buildargs: expected a JSON object, e.g. {\"VERSION\": \"1\"}") from None
    tags = [v for k, v in req.query.items() if k == "t" and v]
    ctx = tempfile.mkdtemp(prefix="labkit-build-context-")
    try:
        try:
            layers.unpack(req.body, ctx)
        except LabkitError as err:
            raise ApiError(400, f"the build context is not a valid tar: {err.one_line()}") from None

        def work(send) -> None:
            say = lambda line: send({"stream": line + "\n"})  # noqa: E731
            dockerfile = req.query.get("dockerfile") or "Dockerfile"
            done = builder.build(ctx, tag=tags[0] if tags else "", file=f"{ctx}/{dockerfile}",
                                 build_args={str(k): str(v) for k, v in (build_args or {}).items()},
                                 no_cache=req.flag("nocache"), target=req.query.get("target", ""), progress=say)  # fmt: skip
            send({"aux": {"ID": done.id}})
            send({"stream": f"Successfully built {done.id.removeprefix('sha256:')[:12]}\n"})
            if done.ref:
                send({"stream": f"Successfully tagged {done.ref}\n"})

        _streamed(out, work)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


# -- networks ---------------------------------------------------------------------------
def _network_doc(n) -> dict:
    return {"Name": n.name, "Id": n.name, "Driver": n.driver, "Scope": "local", "EnableIPv6": False,
            "Internal": False, "Attachable": False, "Containers": {}, "Options": {}, "Labels": {},
            "IPAM": {"Driver": "default", "Config": [{"Subnet": n.subnet, "Gateway": n.gateway}] if n.subnet else []}}  # fmt: skip


def list_networks(req: Request, out: Responder) -> None:
    from labkit.engine import networks

    out.send(200, [_network_doc(n) for n in networks.list_networks()])


def inspect_network(req: Request, out: Responder) -> None:
    from labkit.engine import networks

    out.send(200, _network_doc(networks.get(req.params["id"])))


def create_network(req: Request, out: Responder) -> None:
    from labkit.engine import networks

    doc = req.json({})
    if not isinstance(doc, dict) or not isinstance(doc.get("Name"), str):
        raise ApiError(400, 'Name: a network name is required, e.g. {"Name": "web"}')
    configs = (doc.get("IPAM") or {}).get("Config") or []
    subnet = configs[0].get("Subnet") if configs and isinstance(configs[0], dict) else None
    n = networks.create(doc["Name"], subnet)
    out.send(201, {"Id": n.name, "Warning": ""})


def remove_network(req: Request, out: Responder) -> None:
    from labkit.engine import endpoints, networks

    name = req.params["id"]
    networks.remove(name, endpoints.users(name))
    out.send(204)
