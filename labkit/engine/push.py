"""``labkit push``: an image from the store to a registry.

Pushing is pulling backwards (distribution-spec ``spec.md``, "Pushing"): every blob
first, the manifest last, because the registry refuses a manifest whose blobs it does
not have, and the manifest is what makes the tag visible:

1. for each layer blob and the config: ``HEAD /v2/<name>/blobs/<digest>``; if the
   registry has it already, nothing to send ("Layer already exists");
2. otherwise ``POST /v2/<name>/blobs/uploads/`` opens an upload session and answers
   with its ``Location``; ``PUT <Location>&digest=<digest>`` sends the whole blob
   (the "monolithic" upload) and the registry checks the digest itself;
3. ``PUT /v2/<name>/manifests/<tag>`` with an OCI image manifest naming them all.

The blobs are the ones the layers came in (``content.layer_blob``), so the pushed
image has the same config, the same DiffIDs and the same image ID as here.

Layer: engine. Used by the CLI (``labkit push``) and notebook 10; calls registry,
content and images.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from labkit.engine import content, images, reference
from labkit.engine.pull import PARALLEL, LayerProgress, Progress
from labkit.engine.registry import Client, scope
from labkit.errors import InvalidValue, RegistryError

# A layer's media type in an OCI manifest, whatever the registry it came from called it.
OCI_LAYER_TYPE = {content.DOCKER_LAYER_GZIP: content.LAYER_GZIP,
                  "application/vnd.docker.image.rootfs.diff.tar": content.LAYER_TAR}  # fmt: skip


@dataclass(frozen=True)
class Pushed:
    """What ``push`` did: the manifest's digest and size, and the blobs it sent."""

    digest: str
    size: int
    uploaded: int


def manifest_for(image: images.Image) -> tuple[bytes, list[content.Blob], content.Blob]:
    """The OCI manifest of a stored image, with its layer blobs and its config blob."""
    config_path = images._store() / "configs" / f"{image.id.removeprefix('sha256:')}.json"
    config = content.Blob(image.id, content.OCI_CONFIG, config_path.stat().st_size, config_path)
    diff_ids = json.loads(config_path.read_bytes())["rootfs"]["diff_ids"]
    blobs = [content.layer_blob(d) for d in diff_ids]
    doc = {
        "schemaVersion": 2,
        "mediaType": content.OCI_MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": OCI_LAYER_TYPE.get(b.media_type, b.media_type), "digest": b.digest,
                    "size": b.size} for b in blobs],  # fmt: skip
    }
    return json.dumps(doc, indent=2).encode(), blobs, config


def push(name: str, progress: Progress | None = None, credentials: tuple[str, str] | None = None) -> Pushed:
    """Push the stored image ``name`` to the registry its name starts with."""
    ref = reference.parse(name)
    if ref.digest:
        raise InvalidValue("image to push", name, "a NAME:TAG, e.g. localhost:5000/app:v1 (a digest names no tag)")
    image = images.get(name)
    say = progress or (lambda p: None)
    manifest, blobs, config = manifest_for(image)
    client = Client(ref.domain, credentials)
    push_scope = scope(ref.path, "pull,push")
    try:
        for b in blobs:
            say(LayerProgress(b.digest.removeprefix("sha256:")[:12], "Preparing"))
        with ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="labkit-push") as pool:
            sent = list(pool.map(lambda b: _blob(client, ref.path, push_scope, b, say), blobs))
        _blob(client, ref.path, push_scope, config, lambda p: None)
        resp = client.request("PUT", f"/v2/{ref.path}/manifests/{ref.tag}", scope=push_scope,
                              headers={"Content-Type": content.OCI_MANIFEST}, body=manifest, ok=(201,))  # fmt: skip
        resp.read()
        import hashlib

        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        answered = resp.getheader("Docker-Content-Digest")
        if answered and answered != digest:
            raise RegistryError(f"{client.domain} stored the manifest of {ref} as {answered}, not {digest}")
        return Pushed(digest, len(manifest), sum(sent))
    finally:
        client.close()


def _blob(client: Client, repo: str, push_scope: str, blob: content.Blob, say: Progress) -> int:
    """Upload one blob unless the registry has it; the bytes sent."""
    short = blob.digest.removeprefix("sha256:")[:12]
    head = client.request("HEAD", f"/v2/{repo}/blobs/{blob.digest}", scope=push_scope, ok=(200, 404))
    head.read()
    if head.status == 200:
        say(LayerProgress(short, "Layer already exists"))
        return 0
    start = client.request("POST", f"/v2/{repo}/blobs/uploads/", scope=push_scope, ok=(202,),
                           headers={"Content-Length": "0"})  # fmt: skip
    start.read()
    location = start.getheader("Location")
    if not location:
        raise RegistryError(f"{client.domain} opened an upload for {repo} without a Location")
    if location.startswith("/"):
        location = f"{client.scheme}://{client.domain}{location}"
    url = location + ("&" if "?" in location else "?") + f"digest={blob.digest}"
    say(LayerProgress(short, "Pushing", 0, blob.size))
    with open(blob.path, "rb") as body:
        done = client.request("PUT", url, scope=push_scope, body=body, ok=(201,), headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(blob.size)})  # fmt: skip
        done.read()
    say(LayerProgress(short, "Pushed", blob.size, blob.size))
    return blob.size
