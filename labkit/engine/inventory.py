"""Reading and tidying the image store: ``history``, ``inspect``, ``commit``, ``prune``.

- ``history`` pairs the image config's ``history`` list with its layers, as ``docker
  history`` does: every entry that is not an ``empty_layer`` made the next DiffID of
  ``rootfs.diff_ids``. It is all in the config, which anyone who pulls the image gets:
  a password set with ENV is there for good, and a file removed by a later RUN is still
  in the earlier layer (notebook 10's lesson on secrets).
- ``commit`` turns a container's overlay upper directory into a new layer on top of its
  image (``changes.pack``), as ``docker commit`` does.
- ``prune`` removes every untagged image (a build's intermediate ones too) and then every
  layer and layer blob no image lists, except a layer some container still uses.

Layer: engine. Used by the CLI (``history``, ``image inspect``, ``commit``, ``image
prune``); calls images, changes, content and the runtime's container state.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from labkit.engine import changes, images
from labkit.kernel import safe


@dataclass(frozen=True)
class HistoryEntry:
    """One line of ``labkit history``: ``size`` is the layer's bytes (0 for an empty layer)."""

    created: float
    created_by: str
    size: int
    comment: str
    empty_layer: bool


def history(ref: str) -> tuple[images.Image, list[HistoryEntry]]:
    """The image ``ref`` names and its history, newest first."""
    image = images.get(ref)
    doc = images.config_doc(image.id)
    diff_ids = list(doc["rootfs"]["diff_ids"])
    entries = []
    for item in doc.get("history") or []:
        empty = bool(item.get("empty_layer"))
        size = 0
        if not empty and diff_ids:
            meta = images._layer_dir(diff_ids.pop(0)) / "layer.json"
            size = json.loads(meta.read_text())["size"] if meta.exists() else 0
        entries.append(HistoryEntry(images._epoch(item.get("created")), item.get("created_by", ""), size,
                                    item.get("comment", ""), empty))  # fmt: skip
    return image, entries[::-1]


def inspect(ref: str) -> dict:
    """``docker image inspect``'s fields that labkit has."""
    image = images.get(ref)
    doc = images.config_doc(image.id)
    tags = [r for r, i in images._repositories().items() if i == image.id]
    return {"Id": image.id, "RepoTags": sorted(tags), "Created": doc.get("created", ""),
            "Author": doc.get("author", ""), "Architecture": doc.get("architecture", ""), "Os": doc.get("os", ""),
            "Config": image.config.to_oci(), "Size": image.size_bytes,
            "RootFS": {"Type": "layers", "Layers": doc["rootfs"]["diff_ids"]},
            "History": doc.get("history", [])}  # fmt: skip


def commit(upper: str | os.PathLike[str], base_ref: str, ref: str, author: str = "", comment: str = "",
           created_by: str = "", maps: tuple = ((), ())) -> str:  # fmt: skip
    """A new image: ``base_ref``'s layers plus the changes in ``upper``; its ID. With
    ``ref`` '' the image is stored untagged. ``maps``: the container's uid and gid maps,
    if it had a user namespace (its root's files are host uid 1000000's on disk, 0's in
    the image)."""
    base = images.get(base_ref)
    doc = images.config_doc(base.id)
    fd, tar = tempfile.mkstemp(prefix=".commit-", suffix=".tar", dir=images._store())
    try:
        with os.fdopen(fd, "wb") as out:
            changes.pack(upper, out, skip_mount_points=True, maps=maps)
        diff_id = changes.store(tar)
    finally:
        os.unlink(tar)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    doc["created"] = now
    doc["rootfs"]["diff_ids"].append(diff_id)
    entry = {"created": now, "created_by": created_by or "labkit commit", "comment": comment}
    if author:
        doc["author"] = entry["author"] = author
    doc.setdefault("history", []).append(entry)
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    return images.store_config(ref, data).id if ref else images.store_untagged(data)


@dataclass(frozen=True)
class Pruned:
    images: tuple[str, ...]
    layers: tuple[str, ...]
    reclaimed: int


def _layers_containers_use() -> set[str]:
    """DiffIDs of layers that a container (running or not, until ``rm``) is made of."""
    from labkit.errors import LabkitError
    from labkit.runtime import container

    used = set()
    for state in container.list_states():
        try:
            for layer in container.spec_of(state.id).layers:
                used.add("sha256:" + Path(layer).parent.name)
        except LabkitError:
            continue
    return used


def prune() -> Pruned:
    """Remove untagged images, then unreferenced layers and their blobs (module doc)."""
    from labkit.engine import build, content

    store = images._store()
    removed_images, removed_layers, reclaimed = [], [], 0
    with images._locked():
        tagged = set(images._repositories().values())
        configs = store / "configs"
        for path in sorted(configs.glob("*.json")) if configs.is_dir() else []:
            if "sha256:" + path.stem not in tagged:
                path.unlink()
                removed_images.append("sha256:" + path.stem)
        listed = {d for p in configs.glob("*.json") for d in json.loads(p.read_text())["rootfs"]["diff_ids"]}
        keep = listed | _layers_containers_use()
        layers_dir = store / "layers"
        for layer in sorted(layers_dir.iterdir()) if layers_dir.is_dir() else []:
            diff_id = "sha256:" + layer.name
            if layer.name.startswith(".") or diff_id in keep:
                continue
            meta = layer / "layer.json"
            reclaimed += json.loads(meta.read_text())["size"] if meta.exists() else 0
            safe.remove_tree(layer, within=store)
            removed_layers.append(diff_id)
        records = store / "blobs" / "layers"
        recs = {rec: json.loads(rec.read_text())["digest"] for rec in records.glob("*.json")} if records.is_dir() else {}
        kept_blobs = {digest for rec, digest in recs.items() if "sha256:" + rec.stem in keep}
        for rec, digest in recs.items():
            if "sha256:" + rec.stem not in keep:
                rec.unlink()
                blob = content.blob_path(digest)
                if digest not in kept_blobs:
                    blob.unlink(missing_ok=True)
        cache = build._cache_file()
        if cache.exists():
            table = {k: v for k, v in json.loads(cache.read_text()).items() if v not in removed_images}
            images._write_atomic(cache, json.dumps(table, indent=1, sort_keys=True).encode())
    return Pruned(tuple(removed_images), tuple(removed_layers), reclaimed)
