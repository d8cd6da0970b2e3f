"""``labkit load`` and ``labkit save``: images as files, in the formats Docker and OCI use.

Three layouts, all plain files (a directory, or the same files in one tar):

- **OCI image layout** (image-spec ``image-layout.md``): ``oci-layout``, ``index.json``
  (descriptors of manifests, each named by the annotation
  ``org.opencontainers.image.ref.name``) and ``blobs/sha256/<hex>``: every manifest,
  config and layer under its digest. skopeo's ``oci:``, umoci and podman read it.
- **docker-archive, Docker 25 and later**: that same OCI layout, plus Docker's own
  ``manifest.json`` (``[{"Config", "RepoTags", "Layers"}]``, paths into blobs/).
- **docker-archive, older**: ``manifest.json`` pointing at ``<id>/layer.tar`` and
  ``<id>.json``; layers identical to an earlier one may be symlinks to it.

``save`` writes the Docker 25 layout, so one file is a docker-archive *and* an OCI
layout (a tar, or with ``fmt="oci-dir"`` a directory); layers go uncompressed, as
Docker writes them. ``load`` reads all three, from a directory or a tar (gzipped or
not). Every blob is checked: against its digest where the archive names one, and
each layer against the DiffID in its image's config. Paths inside an archive are
archive paths, never host paths: ``..`` or a leading ``/`` is refused. A load is one
``content.Staging``: all of it is stored, or none.

Layer: engine. Used by the CLI (``labkit load``, ``labkit save``); calls content and images.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from labkit.engine import content, images, reference
from labkit.errors import BadContent, InvalidValue, NotFound

MAX_JSON = 4 << 20  # bytes of a manifest, config or index we read at most
FORMATS = ("docker-archive", "oci-archive", "oci-dir")
NAME_ANNOTATION = "io.containerd.image.name"  # Docker 25 and containerd: the full name
REF_ANNOTATION = "org.opencontainers.image.ref.name"  # OCI: the tag (or a full name)


@dataclass(frozen=True)
class Loaded:
    """One image ``load`` stored: ``ref`` is '' for an image the archive gave no name."""

    ref: str
    id: str


# --- reading an archive, as a directory or as a tar ----------------------------


def _clean(name: str, where: str) -> str:
    """An archive path as a relative POSIX path that stays inside the archive."""
    norm = posixpath.normpath(name.removeprefix("./"))
    if name.startswith("/") or norm == ".." or norm.startswith("../") or norm in ("", "."):
        raise BadContent(f"{where}: path {name!r} leaves the archive")
    return norm


class _Dir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def has(self, name: str) -> bool:
        return os.path.lexists(self.root / name)

    def open(self, name: str) -> BinaryIO:
        """A regular file of the directory (no symlink, device or fifo: /dev/zero never ends)."""
        fd = os.open(self.root / _clean(name, str(self.root)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadContent(f"{self.root}: {name} is not a regular file")
        return os.fdopen(fd, "rb")

    def close(self) -> None:
        pass


class _Tar:
    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, "r:*")  # random access; gzip or plain
        except tarfile.TarError as err:
            raise BadContent(f"{path} is not a tar archive: {err}") from None
        self.path = path
        self.members = {}
        for m in self.tar.getmembers():
            try:
                self.members[_clean(m.name, str(path))] = m
            except BadContent:
                continue  # never looked up: our names are all cleaned

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> BinaryIO:
        member = self.members.get(_clean(name, str(self.path)))
        for _ in range(8):  # old docker save links a repeated layer to its first copy
            if member is None or not member.issym():
                break
            target = posixpath.join(posixpath.dirname(member.name.removeprefix("./")), member.linkname)
            member = self.members.get(_clean(target, str(self.path)))
        if member is None or not member.isfile():
            raise BadContent(f"{self.path}: no file {name} in the archive")
        f = self.tar.extractfile(member)
        assert f is not None
        return f  # type: ignore[return-value]

    def close(self) -> None:
        self.tar.close()


def _read_json(src, name: str, where: str):
    with src.open(name) as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise BadContent(f"{where}: {name} is larger than {MAX_JSON} bytes")
    try:
        return json.loads(data), data
    except ValueError:
        raise BadContent(f"{where}: {name} is not JSON") from None


# --- load ------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> list[Loaded]:
    """Store every image of the archive at ``path`` (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"no such file: {path}")
    src = _Dir(path) if path.is_dir() else _Tar(path)
    try:
        with content.Staging() as stage:
            if src.has("manifest.json"):
                found = _load_docker(src, stage, str(path))
            elif src.has("index.json"):
                found = _load_oci(src, stage, str(path))
            else:
                raise BadContent(f"{path}: neither manifest.json (docker-archive) nor index.json (OCI layout)")
            stage.commit()
    finally:
        src.close()
    loaded = []
    for refs, config in found:
        image_id = images.store_config(refs[0], config).id if refs else _store_untagged(config)
        for ref in refs[1:]:
            images.store_config(ref, config)
        loaded += [Loaded(r, image_id) for r in refs] or [Loaded("", image_id)]
    return loaded


def _store_untagged(config: bytes) -> str:
    import hashlib

    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    images._write_atomic(images._store() / "configs" / f"{image_id.removeprefix('sha256:')}.json", config)
    return image_id


def _layers(src, stage: content.Staging, paths_or_descs: list, config: bytes, where: str) -> None:
    """Stage and unpack the layers of one image, checking each against the config."""
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise BadContent(f"{where}: the image config has no rootfs.diff_ids") from None
    if len(diff_ids) != len(paths_or_descs):
        raise BadContent(f"{where}: the config lists {len(diff_ids)} layers, the manifest {len(paths_or_descs)}")
    for item, diff_id in zip(paths_or_descs, diff_ids):
        if isinstance(item, dict):  # an OCI descriptor: the digest is known
            name = f"blobs/sha256/{content.check_digest(item.get('digest'), where).removeprefix('sha256:')}"
            with src.open(name) as f:
                blob = stage.write(f, item["digest"], item.get("size"), where=f"{where}: {name}")
            media_type = item.get("mediaType", content.LAYER_TAR)
        else:
            name = item
            with src.open(name) as f:
                blob, digest = stage.write_any(f)
            if name.startswith("blobs/sha256/") and digest != "sha256:" + posixpath.basename(name):
                raise BadContent(f"{where}: {name} does not match its name (its sha256 is {digest})")
            media_type = content.LAYER_TAR
        stage.import_layer(blob, media_type, content.check_digest(diff_id, where), where=f"{where}: {name}")


def _load_docker(src, stage: content.Staging, where: str) -> list[tuple[list[str], bytes]]:
    doc, _ = _read_json(src, "manifest.json", where)
    if not isinstance(doc, list):
        raise BadContent(f"{where}: manifest.json is not a list of images")
    found = []
    for entry in doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise BadContent(f"{where}: an entry of manifest.json has no Config")
        _, config = _read_json(src, entry["Config"], where)
        layer_paths = [_clean(p, where) for p in entry.get("Layers") or []]
        _layers(src, stage, layer_paths, config, f"{where}: {entry['Config']}")
        refs = [_name(t, where) for t in entry.get("RepoTags") or []]
        found.append((refs, config))
    return found


def _load_oci(src, stage: content.Staging, where: str) -> list[tuple[list[str], bytes]]:
    index, _ = _read_json(src, "index.json", where)
    found = []
    for desc in (index.get("manifests") if isinstance(index, dict) else None) or []:
        name = (desc.get("annotations") or {}).get(NAME_ANNOTATION) or (desc.get("annotations") or {}).get(REF_ANNOTATION, "")
        manifest, _ = _blob_json(src, stage, desc, where)
        if manifest.get("mediaType") in content.INDEXES or "manifests" in manifest:  # a multi-platform image
            from labkit.engine.pull import _choose

            digest = _choose(manifest, where)
            desc = next(d for d in manifest["manifests"] if d.get("digest") == digest)
            manifest, _ = _blob_json(src, stage, desc, where)
        _, config = _blob_json(src, stage, manifest.get("config") or {}, where)
        _layers(src, stage, list(manifest.get("layers") or []), config, f"{where}: {desc['digest']}")
        # A name with a repository is an image name; a bare tag (skopeo's, umoci's) names none.
        found.append(([_name(name, where)] if "/" in name or ":" in name else [], config))
    return found


def _blob_json(src, stage: content.Staging, desc: dict, where: str) -> tuple[dict, bytes]:
    """A JSON blob (manifest, config) checked against its descriptor: (document, bytes)."""
    digest = content.check_digest(desc.get("digest"), where)
    name = f"blobs/sha256/{digest.removeprefix('sha256:')}"
    if not isinstance(desc.get("size"), int) or desc["size"] > MAX_JSON:
        raise BadContent(f"{where}: the descriptor of {name} has no size, or one above {MAX_JSON} bytes")
    with src.open(name) as f:
        path = stage.write(f, digest, desc["size"], where=f"{where}: {name}")
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadContent(f"{where}: {name} is not JSON") from None
    if not isinstance(doc, dict):
        raise BadContent(f"{where}: {name} is not a JSON object")
    return doc, raw


def _name(text: str, where: str) -> str:
    try:
        r = reference.parse(text)
    except InvalidValue:
        raise BadContent(f"{where}: {text!r} is not an image name") from None
    return f"{r.name}:{r.tag}" if r.tag else f"{r.name}@{r.digest}"


# --- save ------------------------------------------------------------------------


def save(refs: list[str], out: str | os.PathLike[str], fmt: str = "docker-archive") -> Path:
    """Write the images ``refs`` to ``out``: a tar (``docker-archive``, ``oci-archive``:
    the same file) or a directory (``oci-dir``). Written beside ``out``, then renamed."""
    if fmt not in FORMATS:
        raise InvalidValue("archive format", fmt, " or ".join(FORMATS))
    if not refs:
        raise InvalidValue("image list", "", "at least one image, e.g. labkit save -o bb.tar busybox")
    out = Path(out)
    if fmt == "oci-dir" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidValue("output directory", str(out), "a new or empty directory")
    chosen = [images.get(r) for r in refs]  # every name checked before a byte is written
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_layout(chosen, work)
        if fmt == "oci-dir":
            if out.exists():
                out.rmdir()
            os.rename(work, out)
            return out
        partial = work / "archive.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(work)):
                if name != "archive.tar":
                    tar.add(work / name, arcname=name, filter=_plain)
        os.replace(partial, out)
        return out
    finally:
        if work.exists():
            import shutil

            shutil.rmtree(work)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_layout(chosen: list[images.Image], root: Path) -> None:
    """The Docker 25 layout of ``chosen`` in the empty directory ``root``."""
    import hashlib

    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    index, docker, repositories = [], [], {}
    for image in chosen:
        config = (images._store() / "configs" / f"{image.id.removeprefix('sha256:')}.json").read_bytes()
        put(config)
        layers = []
        for diff_id in json.loads(config)["rootfs"]["diff_ids"]:
            target = blobs / diff_id.removeprefix("sha256:")
            if not target.exists():
                _uncompressed(content.layer_blob(diff_id), diff_id, target)
            layers.append({"mediaType": content.LAYER_TAR, "digest": diff_id, "size": target.stat().st_size})
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": content.OCI_MANIFEST,
            "config": {"mediaType": content.OCI_CONFIG, "digest": image.id, "size": len(config)},
            "layers": layers,
        }, indent=2).encode()  # fmt: skip
        r = reference.parse(image.ref, default_tag="")
        full = f"{r.domain}/{r.path}" + (f":{r.tag}" if r.tag else f"@{r.digest}")
        annotations = {NAME_ANNOTATION: full}
        if r.tag:
            annotations[REF_ANNOTATION] = r.tag
        index.append({"mediaType": content.OCI_MANIFEST, "digest": put(manifest), "size": len(manifest),
                      "annotations": annotations})  # fmt: skip
        docker.append({"Config": f"blobs/sha256/{image.id.removeprefix('sha256:')}",
                       "RepoTags": [image.ref] if r.tag else [],
                       "Layers": [f"blobs/sha256/{x['digest'].removeprefix('sha256:')}" for x in layers]})  # fmt: skip
        if r.tag and layers:
            repositories.setdefault(r.name, {})[r.tag] = layers[-1]["digest"].removeprefix("sha256:")
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": content.OCI_INDEX,
                                                 "manifests": index}))  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(docker))
    (root / "repositories").write_text(json.dumps(repositories))


def _uncompressed(blob: content.Blob, diff_id: str, target: Path) -> None:
    """Write the layer's tar, uncompressed, to ``target`` and check it is ``diff_id``."""
    import hashlib

    sha = hashlib.sha256()
    with content.open_tar(blob.path, blob.media_type, f"layer {diff_id}") as src, open(target, "wb") as out:
        while chunk := src.read(content.CHUNK):
            sha.update(chunk)
            out.write(chunk)
    if "sha256:" + sha.hexdigest() != diff_id:
        raise BadContent(f"the stored blob of layer {diff_id} unpacks to sha256:{sha.hexdigest()}")
