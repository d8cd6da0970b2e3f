"""``labkit pull``: an image from a registry into the store, every byte checked.

The steps are the ones ``docker pull`` takes (distribution-spec ``spec.md``; moby's
``contrib/download-frozen-image-v2.sh`` does the same in shell):

1. ``GET /v2/<name>/manifests/<tag>``, accepting OCI and Docker v2 schema 2 manifests
   and indexes. An *index* (a "manifest list") names one manifest per platform: take
   the one for this machine (``linux``/``amd64``...), skipping the ``unknown/unknown``
   entries that hold build attestations, and fetch it by its digest.
2. The manifest names the config and the layers by digest. The config, a small JSON
   blob, lists each layer's DiffID (the sha256 of its *uncompressed* tar).
3. Layers download in parallel (three at a time, like dockerd's
   ``max-concurrent-downloads``), each into the staging directory, hashed as it
   arrives, and unpacked as soon as it is in (unpacking frees its download slot for
   the next layer). A connection cut half-way is resumed with ``Range: bytes=N-`` (or
   started again if the registry ignores Range), at most ``RETRIES`` times. A layer
   whose sha256 is not its digest is refused and deleted, as is one whose tar is not
   the DiffID the config promised.
4. Only when every layer is in: the blobs move into the store and the tag is set.
   A failure anywhere before leaves the store as it was (see ``content.Staging``).

``progress`` receives a ``LayerProgress`` per step and per MiB, from the download
threads; the CLI draws them as ``docker pull`` does.

Layer: engine. Used by the CLI (``labkit pull``) and notebook 10; calls registry,
content and images.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from labkit.engine import content, images, reference
from labkit.engine.registry import MAX_MANIFEST, Client, scope
from labkit.errors import BadContent, LabkitError, NotFound, RegistryError, Unsupported

RETRIES = 5  # times a cut download is resumed before the pull fails
PARALLEL = 3  # layers downloading at once
ACCEPT = ", ".join(content.MANIFESTS + content.INDEXES)
LAYER_TYPES = {content.LAYER_TAR, content.LAYER_GZIP, content.DOCKER_LAYER_GZIP,
               "application/vnd.docker.image.rootfs.diff.tar"}  # fmt: skip


@dataclass(frozen=True)
class LayerProgress:
    """One step of one layer: ``id`` is the layer digest's first 12 hex digits, as
    ``docker pull`` prints it; ``current``/``total`` are bytes (0 when not counting)."""

    id: str
    status: str
    current: int = 0
    total: int = 0


Progress = Callable[[LayerProgress], None]


@dataclass(frozen=True)
class Pulled:
    """What ``pull`` did. ``digest`` is the manifest's; ``downloaded`` counts layer bytes
    fetched now; ``updated`` is False when the tag already named this image."""

    image: images.Image
    digest: str
    downloaded: int
    updated: bool


def platform() -> tuple[str, str]:
    """This machine's OCI platform: ('linux', 'amd64') or ('linux', 'arm64')."""
    return "linux", images._oci_arch()


def pull(name: str, progress: Progress | None = None, credentials: tuple[str, str] | None = None) -> Pulled:
    """Pull ``name`` (``busybox``, ``localhost:5000/app:v1``, ``app@sha256:...``)."""
    ref = reference.parse(name)
    say = progress or (lambda p: None)
    client = Client(ref.domain, credentials)
    pull_scope = scope(ref.path)
    try:
        raw, digest, doc = _manifest(client, ref.path, ref.reference, pull_scope)
        if ref.digest and digest != ref.digest:
            raise BadContent(f"manifest {ref}: its sha256 is {digest}")
        if doc.get("mediaType") in content.INDEXES or "manifests" in doc:
            chosen = _choose(doc, str(ref))
            raw, digest, doc = _manifest(client, ref.path, chosen, pull_scope)
            if digest != chosen:
                raise BadContent(f"manifest {ref.path}@{chosen}: its sha256 is {digest}")
        config_desc, layer_descs = _check_manifest(doc, str(ref))
        key = f"{ref.name}:{ref.tag}" if ref.tag else f"{ref.name}@{ref.digest}"
        before = images._repositories().get(images._key(*images.parse_ref(key)))
        with content.Staging() as stage:
            resp = client.request("GET", f"/v2/{ref.path}/blobs/{config_desc['digest']}", scope=pull_scope)
            config = stage.write(resp, config_desc["digest"], config_desc["size"], where=f"config of {ref}")
            config_bytes = config.read_bytes()
            diff_ids = _diff_ids(config_bytes, len(layer_descs), str(ref))
            stage.write(raw, digest, where=f"manifest of {ref}")
            downloaded = _layers(client, ref.path, pull_scope, stage, layer_descs, diff_ids, say)
            stage.commit()
        image = images.store_config(key, config_bytes)
        return Pulled(image, digest, downloaded, updated=before != image.id)
    finally:
        client.close()


def _manifest(client: Client, repo: str, ref: str, pull_scope: str) -> tuple[bytes, str, dict]:
    try:
        resp = client.request("GET", f"/v2/{repo}/manifests/{ref}", scope=pull_scope, headers={"Accept": ACCEPT})
    except RegistryError as err:
        if err.status == 404 or err.code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"):
            raise NotFound(f"manifest for {client.domain}/{repo}:{ref} not found ({err.code or err.status})") from None
        raise
    raw = resp.read(MAX_MANIFEST + 1)
    if len(raw) > MAX_MANIFEST:
        raise BadContent(f"manifest {repo}:{ref} is larger than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadContent(f"manifest {repo}:{ref} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise Unsupported(f"manifest {repo}:{ref} is not schema version 2 (labkit reads OCI and Docker v2.2)")
    doc.setdefault("mediaType", resp.getheader("Content-Type", ""))
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest(), doc


def _choose(index: dict, where: str) -> str:
    """The digest of this platform's manifest in an index (image-spec ``image-index.md``)."""
    want_os, want_arch = platform()
    seen = []
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        os_, arch = plat.get("os", ""), plat.get("architecture", "")
        if (os_, arch) == ("unknown", "unknown"):
            continue  # an attestation (SBOM, provenance), not an image
        seen.append(f"{os_}/{arch}" + (f"/{plat['variant']}" if plat.get("variant") else ""))
        if (os_, arch) == (want_os, want_arch) and entry.get("mediaType", content.OCI_MANIFEST) in content.MANIFESTS:
            return content.check_digest(entry.get("digest"), f"index of {where}")
    raise NotFound(f"{where} has no image for {want_os}/{want_arch}; it has {', '.join(seen) or 'none'}")


def _check_manifest(doc: dict, where: str) -> tuple[dict, list[dict]]:
    """The config and layer descriptors, each with a well-formed digest and size."""
    if doc.get("mediaType") not in content.MANIFESTS:
        raise Unsupported(f"{where}: manifest type {doc.get('mediaType')!r}; labkit reads {', '.join(content.MANIFESTS)}")
    descs = [doc.get("config")] + list(doc.get("layers") or [])
    for i, desc in enumerate(descs):
        what = "config" if i == 0 else f"layer {i}"
        if not isinstance(desc, dict) or not isinstance(desc.get("size"), int) or desc["size"] < 0:
            raise BadContent(f"{where}: the manifest's {what} descriptor has no size")
        content.check_digest(desc.get("digest"), f"{where}: {what}")
        if i and desc.get("mediaType", content.LAYER_TAR) not in LAYER_TYPES:
            raise Unsupported(f"{where}: {what} is {desc.get('mediaType')!r}; labkit reads tar and tar+gzip layers")
    return descs[0], descs[1:]


def _diff_ids(config: bytes, n: int, where: str) -> list[str]:
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise BadContent(f"config of {where} has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or len(diff_ids) != n:
        raise BadContent(f"config of {where} lists {len(diff_ids)} layers, its manifest {n}")
    return [content.check_digest(d, f"config of {where}") for d in diff_ids]


def _layers(client: Client, repo: str, pull_scope: str, stage: content.Staging,
            descs: list[dict], diff_ids: list[str], say: Progress) -> int:  # fmt: skip
    """Fetch every layer, PARALLEL at a time, and unpack each as soon as it is in; the
    bytes downloaded. A layer being unpacked holds no download slot, so the next
    layer's download starts meanwhile."""
    cancel = threading.Event()
    downloads = threading.BoundedSemaphore(PARALLEL)

    def one(desc: dict, diff_id: str) -> int:
        short = desc["digest"].removeprefix("sha256:")[:12]
        if (images._layer_dir(diff_id) / "layer.json").exists() and content.blob_path(desc["digest"]).exists():
            say(LayerProgress(short, "Already exists"))
            return 0
        try:
            with downloads:
                path = _download(client, repo, pull_scope, stage, desc, say, cancel)
            say(LayerProgress(short, "Extracting", 0, desc["size"]))
            stage.import_layer(path, desc.get("mediaType", content.LAYER_TAR), diff_id, where=f"layer {short}")
        except BaseException:
            cancel.set()  # the others stop at their next chunk
            raise
        say(LayerProgress(short, "Pull complete"))
        return desc["size"]

    for desc in descs:
        say(LayerProgress(desc["digest"].removeprefix("sha256:")[:12], "Waiting"))
    with ThreadPoolExecutor(max_workers=2 * PARALLEL, thread_name_prefix="labkit-pull") as pool:
        futures = [pool.submit(one, d, i) for d, i in zip(descs, diff_ids)]
    errors = [f.exception() for f in futures if f.exception() is not None]
    real = [e for e in errors if not isinstance(e, _Cancelled)]
    if real or errors:
        raise (real or errors)[0]
    return sum(f.result() for f in futures)


class _Cancelled(LabkitError):
    """Another layer failed: this download stopped without finishing."""


def _download(client: Client, repo: str, pull_scope: str, stage: content.Staging, desc: dict,
              say: Progress, cancel: threading.Event) -> Path:  # fmt: skip
    """One blob into the staging directory, resumed after a cut; its path once verified."""
    digest, size = desc["digest"], desc["size"]
    short = digest.removeprefix("sha256:")[:12]
    path = stage.path(digest)
    sha, have, cuts = hashlib.sha256(), 0, 0
    with open(path, "wb") as out:
        while True:
            try:
                headers = {"Range": f"bytes={have}-"} if have else {}
                resp = client.request("GET", f"/v2/{repo}/blobs/{digest}", scope=pull_scope,
                                      headers=headers, ok=(200, 206))  # fmt: skip
                if have and resp.status == 200:  # Range ignored: the whole blob again
                    out.seek(0)
                    out.truncate()
                    sha, have = hashlib.sha256(), 0
                while chunk := resp.read(content.CHUNK):
                    if cancel.is_set():
                        raise _Cancelled(f"layer {short}: stopped")
                    have += len(chunk)
                    if have > size:
                        break
                    sha.update(chunk)
                    out.write(chunk)
                    say(LayerProgress(short, "Downloading", have, size))
                if have >= size:
                    break
                raise ConnectionResetError(f"connection closed after {have} of {size} bytes")
            except (OSError, http.client.HTTPException, RegistryError) as err:
                if isinstance(err, RegistryError) and 0 < err.status < 500:
                    raise  # the registry said no: asking again will not help
                client.reset()
                cuts += 1
                if cuts > RETRIES:
                    raise RegistryError(f"layer {short}: download failed {cuts} times, last: {err}") from None
                say(LayerProgress(short, f"Retrying ({cuts}/{RETRIES})", have, size))
                time.sleep(min(0.05 * 2**cuts, 2.0))
    say(LayerProgress(short, "Verifying Checksum", have, size))
    got = "sha256:" + sha.hexdigest()
    if got != digest or have != size:
        path.unlink()
        raise BadContent(f"layer {short}: expected {digest} ({size} bytes), got {got} ({have} bytes); nothing stored")
    stage.adopt(path, digest)
    say(LayerProgress(short, "Download complete", have, size))
    return path
