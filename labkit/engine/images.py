"""The local image store: what ``docker images`` lists, kept as plain files.

An image is a stack of layers plus a config (OCI image-spec ``config.md``): the
environment, command and working directory a container starts with, and the list
of its layers' DiffIDs (the sha256 of each layer's tar). The image ID is the sha256
of that config file, so the ID names the exact content. The store, under
``paths.images_dir()`` (/var/lib/labkit/images), looks like Docker's own:

    repositories.json        {"busybox:latest": "sha256:3f2a..."}      name -> image ID
    configs/<id>.json        the image config; its sha256 is <id>
    layers/<diff_id>/fs/     the layer's files, ready to be an overlay lowerdir
    layers/<diff_id>/layer.json   {"diff_id", "size", "entries"}

Usage:

    >>> from labkit.engine import images
    >>> img = images.get("busybox")        # built from /bin/busybox on first use  # doctest: +SKIP
    >>> img.name, img.tag, img.short_id    # doctest: +SKIP
    ('busybox', 'latest', '3f2a9c0e11d4')
    >>> img.layers                         # top first: overlay's lowerdir order  # doctest: +SKIP
    [PosixPath('/var/lib/labkit/images/layers/5c1e.../fs')]
    >>> img.config.cmd                     # doctest: +SKIP
    ['sh']
    >>> print(images.format_table(images.list_images()))   # doctest: +SKIP
    REPOSITORY   TAG       IMAGE ID       CREATED         SIZE
    busybox      latest    3f2a9c0e11d4   3 minutes ago   1.98MB

Names: ``busybox`` means ``busybox:latest``; ``debian`` means ``debian:bookworm``;
any other name without a tag means ``NAME:latest``. ``build_base`` makes the two
built-in images (see ``rootfs``); ``create`` stores an image from layer tars (the
hook for builds and pulls).

Layer: engine. Used by the runtime's callers (the CLI, the notebooks) to find a
container's root filesystem; calls rootfs, layers and safe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from labkit import paths

# Unpacking tars and building base images (tarfile, debootstrap) is needed only when an
# image is made; `labkit run` of an image already in the store loads neither module.
# Nor hashlib, tempfile or typing: they are imported where used.
from labkit.errors import LabkitError, NotFound, StateError
from labkit.engine import userns
from labkit.kernel import safe

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import BinaryIO

Progress = Callable[[str], None]  # called with one line of text per build step

# The images labkit can make without a registry, and the tag a bare name means.
BUILTIN = {"busybox": "latest", "debian": "bookworm"}


@dataclass(frozen=True)
class ImageConfig:
    """How a container of this image starts (the ``config`` object of an OCI image
    config, with Python names)."""

    env: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    working_dir: str = "/"
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)  # "80/tcp": what -P publishes
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""  # what `labkit stop` sends first; "" means SIGTERM

    def to_oci(self) -> dict:
        doc = {"Env": self.env, "Cmd": self.cmd, "Entrypoint": self.entrypoint or None,
               "WorkingDir": self.working_dir, "User": self.user}  # fmt: skip
        if self.exposed_ports:  # only when set: the built-in images keep the IDs they had
            doc["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        if self.labels:
            doc["Labels"] = dict(self.labels)
        if self.stop_signal:
            doc["StopSignal"] = self.stop_signal
        return doc

    @classmethod
    def from_oci(cls, doc: dict) -> ImageConfig:
        return cls(env=list(doc.get("Env") or []), cmd=list(doc.get("Cmd") or []),
                   entrypoint=list(doc.get("Entrypoint") or []),
                   working_dir=doc.get("WorkingDir") or "/", user=doc.get("User") or "",
                   exposed_ports=sorted(doc.get("ExposedPorts") or {}), labels=dict(doc.get("Labels") or {}),
                   stop_signal=doc.get("StopSignal") or "")  # fmt: skip


@dataclass(frozen=True)
class Image:
    """An image in the store. ``layers`` lists layer directories top first;
    ``created`` is seconds since the epoch; ``id`` is ``sha256:`` + 64 hex digits."""

    name: str
    tag: str
    id: str
    layers: list[Path]
    config: ImageConfig
    size_bytes: int
    created: float

    @property
    def ref(self) -> str:
        return _key(self.name, self.tag)

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]


def parse_ref(ref: str) -> tuple[str, str]:
    """Split an image reference into its familiar name and tag, filling in the default
    tag (see ``reference``); for ``NAME@sha256:...`` the "tag" is the digest.

    >>> parse_ref("busybox"), parse_ref("debian"), parse_ref("localhost:5000/app:v2")
    (('busybox', 'latest'), ('debian', 'bookworm'), ('localhost:5000/app', 'v2'))
    """
    from labkit.engine import reference

    r = reference.parse(ref, default_tag="")
    return r.name, r.digest or r.tag or BUILTIN.get(r.name, "latest")


def _key(name: str, tag: str) -> str:
    """The store's key for a name: 'busybox:latest', or 'app@sha256:...' for a digest."""
    return f"{name}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"


# --- the files of the store -----------------------------------------------------


def _store() -> Path:
    return paths.images_dir()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise writers (two notebook cells, two `labkit run`s) on one flock."""
    _store().mkdir(parents=True, exist_ok=True)
    with open(_store() / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a new file, then rename it over the old: readers see one or the other."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _repositories() -> dict[str, str]:
    try:
        return json.loads((_store() / "repositories.json").read_text())
    except FileNotFoundError:
        return {}


def _layer_dir(diff_id: str) -> Path:
    return _store() / "layers" / diff_id.removeprefix("sha256:")


def _load(ref: str, image_id: str) -> Image:
    doc = json.loads((_store() / "configs" / f"{image_id.removeprefix('sha256:')}.json").read_text())
    diff_ids = doc["rootfs"]["diff_ids"]
    size = sum(json.loads((_layer_dir(d) / "layer.json").read_text())["size"] for d in diff_ids)
    name, tag = ref.split("@") if "@" in ref else ref.rsplit(":", 1)
    return Image(
        name=name, tag=tag, id=image_id,
        layers=[_layer_dir(d) / "fs" for d in reversed(diff_ids)],  # OCI lists bottom first
        config=ImageConfig.from_oci(doc.get("config", {})),
        size_bytes=size, created=_epoch(doc.get("created")),
    )  # fmt: skip


def _epoch(rfc3339: str | None) -> float:
    if not rfc3339:
        return 0.0
    return datetime.fromisoformat(rfc3339).timestamp()  # 3.11+ reads the "Z"


# --- storing layers and images ----------------------------------------------------


def import_layer(tar: BinaryIO | bytes | str | os.PathLike[str]) -> str:
    """Unpack a layer tar into the store; returns its DiffID. A layer already
    stored (same DiffID) is kept and the new copy dropped."""
    import tempfile

    layers_dir = _store() / "layers"
    layers_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".new-", dir=layers_dir))
    try:
        work.chmod(0o755)  # mkdtemp makes it 0700; a layer must be readable by all
        (work / "fs").mkdir(mode=0o755)
        source = io.BytesIO(tar) if isinstance(tar, bytes) else tar
        from labkit.engine import layers as _layers

        result = _layers.unpack(source, work / "fs")
        meta = {"diff_id": result.diff_id, "size": result.size_bytes, "entries": result.entries}
        (work / "layer.json").write_text(json.dumps(meta) + "\n")
        final = _layer_dir(result.diff_id)
        if not final.exists():
            try:
                os.rename(work, final)  # same directory: atomic, the layer appears whole
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # not "stored meanwhile"
                    raise
        return result.diff_id
    finally:
        safe.remove_tree(work, within=layers_dir)  # gone already if it was renamed


def create(ref: str, diff_ids: Sequence[str], config: ImageConfig, created_by: str = "") -> Image:
    """Store an image made of already imported layers (bottom first, as OCI lists
    them) and point ``ref`` at it."""
    now = time.time()
    doc = {
        "architecture": _oci_arch(), "os": "linux",
        "created": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
        "config": config.to_oci(),
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": created_by or "labkit"}],
    }  # fmt: skip
    return store_config(ref, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")


def store_config(ref: str, data: bytes) -> Image:
    """Store the image config ``data`` byte for byte (its sha256 is the image ID, so a
    pulled or loaded image keeps the ID it had elsewhere) and point ``ref`` at it.
    Every layer it lists must be imported already."""
    name, tag = parse_ref(ref)
    image_id = store_untagged(data)
    with _locked():
        repos = _repositories()
        repos[_key(name, tag)] = image_id
        _write_atomic(_store() / "repositories.json", json.dumps(repos, indent=2, sort_keys=True).encode())
    return _load(_key(name, tag), image_id)


def store_untagged(data: bytes) -> str:
    """Store an image config under its ID with no name (a build's intermediate image,
    an archive's unnamed one); its ID. Every layer it lists must be imported already."""
    import hashlib

    for diff_id in json.loads(data)["rootfs"]["diff_ids"]:
        if not (_layer_dir(diff_id) / "layer.json").exists():
            raise NotFound(f"no layer {diff_id} in {_store() / 'layers'}")
    image_id = "sha256:" + hashlib.sha256(data).hexdigest()
    with _locked():
        _write_atomic(_store() / "configs" / f"{image_id.removeprefix('sha256:')}.json", data)
    return image_id


def config_doc(image_id: str) -> dict:
    """The whole image config of ``image_id`` (history, author, rootfs and all)."""
    path = _store() / "configs" / f"{image_id.removeprefix('sha256:')}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no image {image_id} in {_store() / 'configs'}") from None


def has_layers(doc: dict) -> bool:
    """Whether every layer ``doc`` lists is in the store (a cached step may outlive them)."""
    return all((_layer_dir(d) / "layer.json").exists() for d in doc.get("rootfs", {}).get("diff_ids", []))


def tag(source: str, target: str) -> Image:
    """Point ``target`` at the image ``source`` names, as ``docker tag`` does."""
    image = get(source)
    return store_config(target, (_store() / "configs" / f"{image.id.removeprefix('sha256:')}.json").read_bytes())


def _oci_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# --- the public verbs -------------------------------------------------------------------


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_base(name: str, progress: Progress | None = None) -> Image:
    """Make a built-in image (``busybox`` or ``debian``) unless it is in the store.

    ``progress`` gets one line per build step; the default prints them on stderr.
    Building an image that exists returns it untouched (idempotent).
    """
    repo, tag = parse_ref(name)
    if BUILTIN.get(repo) != tag:
        raise NotFound(f"no built-in image {name!r}; labkit builds 'busybox' and 'debian' itself")
    ref = _key(repo, tag)
    say = progress or _stderr
    existing = _repositories().get(ref)
    if existing:
        return _load(ref, existing)
    from labkit.engine import rootfs

    if repo == "busybox":
        diff_id = import_layer(rootfs.busybox_tar())
        config = ImageConfig(env=[rootfs.PATH_ENV], cmd=["sh"])
        return create(ref, [diff_id], config, f"labkit: {rootfs.busybox_version()} from {rootfs.BUSYBOX}")
    tar = rootfs.debian_tar(say, suite=tag)
    say(f"unpacking {tar} into the image store")
    diff_id = import_layer(tar)
    config = ImageConfig(env=[rootfs.PATH_ENV], cmd=["bash"])
    return create(ref, [diff_id], config, f"labkit: debootstrap --variant=minbase {tag}")


def get(ref: str, progress: Progress | None = None) -> Image:
    """The image ``ref`` names: a name[:tag], or an id (``sha256:...`` or a unique
    prefix of its hex digits, as ``docker images`` shows it); a built-in one is built
    on first use."""
    by_id = _by_id(ref)
    if by_id is not None:
        return by_id
    name, tag = parse_ref(ref)
    image_id = _repositories().get(_key(name, tag))
    if image_id:
        return _load(_key(name, tag), image_id)
    if BUILTIN.get(name) == tag:
        return build_base(f"{name}:{tag}", progress)
    raise NotFound(f"no such image {ref!r}; labkit images lists them, 'busybox' and 'debian' are built in")


def _by_id(ref: str) -> Image | None:
    digits = ref.removeprefix("sha256:")
    if len(digits) < 12 or not all(c in "0123456789abcdef" for c in digits):
        return None
    found = {(r, i) for r, i in _repositories().items() if i.removeprefix("sha256:").startswith(digits)}
    if len({i for _, i in found}) != 1:
        return None
    return _load(*min(found))


def list_images() -> list[Image]:
    """Every tagged image, newest first (as ``docker images`` orders them)."""
    found = [_load(ref, image_id) for ref, image_id in _repositories().items()]
    return sorted(found, key=lambda img: (-img.created, img.ref))


def remove(ref: str) -> None:
    """Untag ``ref``; delete its config and the layers no other image uses.

    Refuses (``StateError``) while a mounted overlay uses one of its layers: deleting
    a lowerdir under a running container would pull its files away.
    """
    name, tag = parse_ref(ref)
    with _locked():
        repos = _repositories()
        image_id = repos.get(_key(name, tag))
        if image_id is None:
            raise NotFound(f"no such image {ref!r}; labkit images lists them")
        image = _load(_key(name, tag), image_id)
        busy = _layers_in_use(image.layers)
        if busy:
            raise StateError(
                f"image {ref!r} is in use: {busy[0]} is a lowerdir of a mounted overlay "
                "or of a container that has not stopped"
            )
        del repos[_key(name, tag)]
        _write_atomic(_store() / "repositories.json", json.dumps(repos, indent=2, sort_keys=True).encode())
        if image_id in repos.values():
            return  # another tag still names this image
        still_used = {p for other in set(repos.items()) for p in _load(*other).layers} | _container_layers()
        (_store() / "configs" / f"{image_id.removeprefix('sha256:')}.json").unlink(missing_ok=True)
        for layer in image.layers:
            if layer not in still_used:
                userns.remove_copies(layer)  # --userns=auto's chowned copies of it
                safe.remove_tree(layer.parent, within=_store())


def _container_layers() -> set[Path]:
    """The layer dirs of every container until ``rm``, stopped ones too: a stopped
    container can still be committed or inspected, so its layers stay."""
    from labkit.runtime import container

    found = set()
    for state in container.list_states():
        try:
            found |= {userns.original_of(Path(p)) for p in container.spec_of(state.id).layers}
        except LabkitError:  # removed meanwhile
            continue
    return found


def _layers_in_use(layer_dirs: list[Path]) -> list[Path]:
    """Layer dirs named in the options of a mounted overlay (/proc/self/mountinfo
    shows overlay's lowerdir=... among the super options), or in the spec of a
    container that has not stopped: the runtime mounts a container's overlay inside
    the container's own mount namespace, so our mountinfo never lists that one."""
    from labkit.kernel import mounts
    from labkit.runtime import container
    from labkit.runtime.status import Status

    overlays = [m.super_options for m in mounts.mountinfo() if m.fstype == "overlay"]
    for state in container.list_states():
        if state.status is not Status.STOPPED:
            try:
                overlays.append(":".join(str(userns.original_of(Path(p))) for p in container.spec_of(state.id).layers))
            except LabkitError:  # removed meanwhile
                continue
    return [d for d in layer_dirs if any(str(d) in opts for opts in overlays)]


# --- the listing ----------------------------------------------------------------------


def human_size(n: int) -> str:
    """Docker's sizes: decimal units, three significant digits.

    >>> human_size(2_144_000), human_size(975_000), human_size(117_000_000)
    ('2.14MB', '975kB', '117MB')
    """
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g}{unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """How long ago, as Docker says it (``docker ps``, ``docker images``): 'Less than a
    second', '1 second', '42 seconds', 'About a minute', '3 minutes', ... 'N years'.

    >>> human_age(1.5), human_age(90), human_age(3 * 86400)
    ('1 second', 'About a minute', '3 days')
    """
    s = max(0.0, seconds)
    minutes, hours, days = s / 60, s / 3600, s / 86400
    if s < 1:
        return "Less than a second"
    if s < 60:
        return "1 second" if int(s) == 1 else f"{int(s)} seconds"
    if minutes < 2:
        return "About a minute"
    if minutes < 60:
        return f"{int(minutes)} minutes"
    if hours < 2:
        return "About an hour"
    if hours < 48:
        return f"{int(hours)} hours"
    if days < 14:
        return f"{int(days)} days"
    if days < 7 * 8:
        return f"{int(days / 7)} weeks"
    if days < 365 * 2:
        return f"{int(days / 30)} months"
    return f"{int(days / 365)} years"


def format_table(imgs: Sequence[Image], now: float | None = None) -> str:
    """The ``labkit images`` table: REPOSITORY TAG IMAGE ID CREATED SIZE."""
    now = time.time() if now is None else now
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    rows += [
        (i.name, "<none>" if i.tag.startswith("sha256:") else i.tag, i.short_id, human_age(now - i.created) + " ago", human_size(i.size_bytes))
        for i in imgs
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("   ".join(r[c].ljust(widths[c]) for c in range(4)) + "   " + r[4] for r in rows)


__all__ = [
    "Image", "ImageConfig", "build_base", "create", "format_table", "get",
    "human_age", "human_size", "import_layer", "list_images", "parse_ref", "remove", "store_config", "tag",
    "config_doc", "has_layers", "store_untagged",
]  # fmt: skip
