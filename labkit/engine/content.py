"""The content store: every blob of an image kept as it came, under its digest.

An image travels as *blobs* (image-spec ``descriptor.md``): the config, and one
(usually gzip-compressed) tar per layer, each named by the sha256 of its bytes. A
container needs the layers *unpacked* instead: ``images`` keeps those under their
DiffID (the sha256 of the uncompressed tar). containerd keeps both as well, a
"content store" and "snapshots"; so does labkit:

    images/blobs/sha256/<hex>          a blob, byte for byte (what push and save send)
    images/blobs/layers/<diff_id>.json  {"digest", "mediaType", "size"}: the blob a layer came from

Writes go through ``Staging``, a context manager: blobs are written into a temporary
directory and checked against their digest as they stream in; layers are unpacked
(each one appears whole or not at all, see ``images.import_layer``); only ``commit()``
moves the blobs into the store. If anything fails first, the staged blobs and every
layer this staging added are removed again: a pull or a load leaves nothing half-stored.

    >>> with Staging() as stage:                                        # doctest: +SKIP
    ...     path = stage.write(stream, "sha256:9f86...", size=4096)
    ...     stage.import_layer(path, LAYER_GZIP, "sha256:5c1e...")
    ...     stage.commit()

Layer: engine. Used by registry (pull, push) and archive (load, save); calls images,
layers and safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from labkit import paths
from labkit.engine import images
from labkit.kernel import safe
from labkit.engine.reference import DIGEST
from labkit.errors import BadContent, NotFound, Unsupported

# Media types (image-spec media-types.md; Docker's manifest v2 schema 2).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)

CHUNK = 1 << 20  # bytes per read while copying and hashing

Progress = Callable[[int], None]  # called with the bytes written so far


@dataclass(frozen=True)
class Blob:
    """A stored blob: its digest, media type, size in bytes and file."""

    digest: str
    media_type: str
    size: int
    path: Path


def check_digest(digest: object, where: str) -> str:
    """``digest`` if it is ``sha256:`` + 64 hex digits; a digest becomes a file name,
    so anything else (``sha256:../../etc``) is refused, naming ``where`` it came from."""
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise BadContent(f"{where}: {digest!r} is not a digest (expected sha256: and 64 hex digits)")
    return digest


def _root() -> Path:
    return paths.images_dir() / "blobs"


def blob_path(digest: str) -> Path:
    return _root() / "sha256" / check_digest(digest, "blob").removeprefix("sha256:")


def _layer_record(diff_id: str) -> Path:
    return _root() / "layers" / f"{check_digest(diff_id, 'layer').removeprefix('sha256:')}.json"


def layer_blob(diff_id: str) -> Blob:
    """The blob layer ``diff_id`` came from. A built-in layer (made by ``rootfs``, never
    downloaded) is made again from its source and checked against its DiffID."""
    try:
        rec = json.loads(_layer_record(diff_id).read_text())
        return Blob(rec["digest"], rec["mediaType"], rec["size"], blob_path(rec["digest"]))
    except FileNotFoundError:
        pass
    from labkit.engine import rootfs

    sources: list[Callable[[], BinaryIO]] = [lambda: _BytesIO(rootfs.busybox_tar())]
    debian = rootfs.cache_dir() / f"debian-{rootfs.DEBIAN_SUITE}-minbase.tar"
    if debian.exists():
        sources.append(lambda: open(debian, "rb"))
    for source in sources:
        with source() as f, Staging() as stage:
            try:
                path = stage.write(f, diff_id)
            except BadContent:
                continue  # not this one
            stage.record_layer(diff_id, diff_id, LAYER_TAR, path.stat().st_size)
            stage.commit()
        return layer_blob(diff_id)
    raise NotFound(f"layer {diff_id} has no blob: it was not pulled or loaded, and no built-in source makes it")


def _referenced(diff_id: str) -> bool:
    """True if a stored image config lists layer ``diff_id``."""
    configs = paths.images_dir() / "configs"
    for path in configs.glob("*.json") if configs.is_dir() else []:
        if diff_id in json.loads(path.read_text()).get("rootfs", {}).get("diff_ids", []):
            return True
    return False


def _BytesIO(data: bytes):  # noqa: N802 (a stand-in for the class)
    import io

    return io.BytesIO(data)


def open_tar(path: Path, media_type: str, where: str) -> BinaryIO:
    """The blob at ``path`` as an uncompressed tar stream: gzip is recognised by its
    magic bytes (some archives call a gzip layer a plain tar), zstd is refused."""
    f = open(path, "rb", buffering=CHUNK)  # a few large reads, not thousands of 8 KiB ones
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd" or media_type.endswith("zstd"):
        f.close()
        raise Unsupported(f"{where} is zstd-compressed; labkit reads plain and gzip layers")
    return f


class Staging:
    """A temporary directory for blobs on their way into the store (see the module doc)."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.blobs: dict[str, Path] = {}
        self.records: dict[str, dict] = {}
        self.new_layers: list[str] = []
        self.committed = False

    def __enter__(self) -> Staging:
        images_dir = paths.images_dir()
        images_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".stage-", dir=images_dir))
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            for diff_id in self.new_layers:  # unpacked by us, referenced by nothing yet
                safe.remove_tree(images._layer_dir(diff_id), within=paths.images_dir())
        if self.dir is not None:
            safe.remove_tree(self.dir, within=paths.images_dir())

    def path(self, digest: str) -> Path:
        assert self.dir is not None, "use Staging as a context manager"
        return self.dir / check_digest(digest, "blob").removeprefix("sha256:")

    def write(self, src: BinaryIO | bytes, digest: str, size: int | None = None,
              progress: Progress | None = None, where: str = "") -> Path:  # fmt: skip
        """Copy ``src`` into the staging directory, hashing as it goes; ``BadContent``
        (and nothing kept) unless its sha256 is ``digest`` and its length ``size``."""
        target = self.path(digest)
        if isinstance(src, bytes):
            src = _BytesIO(src)
        sha, n = hashlib.sha256(), 0
        with open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                n += len(chunk)
                if size is not None and n > size:
                    break
                sha.update(chunk)
                out.write(chunk)
                if progress:
                    progress(n)
        got = "sha256:" + sha.hexdigest()
        if got != digest or (size is not None and n != size):
            target.unlink()
            what = f"{n} bytes" if size is not None and n != size else got
            raise BadContent(f"{where or 'blob ' + digest}: expected {digest}"
                             f"{f' ({size} bytes)' if size is not None else ''}, got {what}")  # fmt: skip
        self.blobs[digest] = target
        return target

    def write_any(self, src: BinaryIO) -> tuple[Path, str]:
        """Copy ``src`` whose digest nobody told us (a layer of an old ``docker save``);
        its path and sha256. What it is gets checked later (``import_layer``)."""
        assert self.dir is not None, "use Staging as a context manager"
        sha = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".in-")
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                sha.update(chunk)
                out.write(chunk)
        digest = "sha256:" + sha.hexdigest()
        os.replace(tmp, self.path(digest))
        self.blobs[digest] = self.path(digest)
        return self.path(digest), digest

    def adopt(self, path: Path, digest: str) -> None:
        """A blob written into ``path(digest)`` by someone else (a resumable download)
        that has already been checked."""
        self.blobs[digest] = path

    def import_layer(self, path: Path, media_type: str, diff_id: str, where: str = "") -> None:
        """Unpack the staged layer blob at ``path`` into the store and check that the
        tar inside it really is ``diff_id`` (the config's word for it)."""
        check_digest(diff_id, where or "layer")
        existed = (images._layer_dir(diff_id) / "layer.json").exists()
        if not existed:
            with open_tar(path, media_type, where or f"layer {diff_id}") as tar:
                got = images.import_layer(tar)
            if got != diff_id:
                if got not in self.new_layers and not _referenced(got):  # ours alone: undo it
                    safe.remove_tree(images._layer_dir(got), within=paths.images_dir())
                raise BadContent(f"{where or 'layer'}: its tar is {got}, but the image config says {diff_id}")
            self.new_layers.append(diff_id)
        digest = "sha256:" + path.name
        self.record_layer(diff_id, digest, media_type, path.stat().st_size)

    def record_layer(self, diff_id: str, digest: str, media_type: str, size: int) -> None:
        self.records[diff_id] = {"digest": digest, "mediaType": media_type, "size": size}

    def commit(self) -> None:
        """Move the staged blobs into the store; from here on nothing is undone."""
        (_root() / "sha256").mkdir(parents=True, exist_ok=True)
        (_root() / "layers").mkdir(parents=True, exist_ok=True)
        for digest, path in self.blobs.items():
            final = blob_path(digest)
            if not final.exists():
                os.replace(path, final)  # same filesystem: atomic
        for diff_id, rec in self.records.items():
            if blob_path(rec["digest"]).exists():
                images._write_atomic(_layer_record(diff_id), json.dumps(rec).encode() + b"\n")
        self.committed = True
