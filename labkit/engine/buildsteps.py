"""The two build steps that touch files: RUN (in a container) and COPY/ADD.

``run`` starts a labkit container the way ``labkit run --network none IMAGE CMD`` does:
the image's layers as overlay lowerdirs, a fresh upper directory, Docker's default
mounts, capabilities and namespaces, the image's Env, WorkingDir and User. Its output
goes through a pipe to ``progress`` line by line, as ``docker build`` shows it. When the
command exits 0, its upper directory is packed into the layer tar (``changes.pack``);
the container is deleted either way.

``copy_plan`` works out what a COPY or ADD copies: the sources (context paths, globs,
or paths inside another stage for ``COPY --from``), the destination (relative to
WORKDIR; a directory if it ends in ``/``), the owner (``--chown``), and the text the
cache compares (``buildcontext.checksum``). Another stage's files are read through a
read-only overlay of its layers, mounted only while the step runs.

Layer: engine. Used by build; calls buildcontext, changes, the kernel's overlay and
the runtime's container, spec and filesystem.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from labkit import paths
from labkit.engine import buildcontext, changes, dockerfile
from labkit.engine.buildcontext import Source
from labkit.errors import InvalidValue, LabkitError, NotFound, Unsupported
from labkit.runtime.spec import DEFAULT_PATH, Spec

RUN_TIMEOUT = 3600.0  # seconds one RUN may take before it is killed
__all__ = ["DEFAULT_PATH", "copy_plan", "run", "write_layer"]


class RunFailed(LabkitError):
    """A RUN command exited with a non-zero code."""


# --- RUN ------------------------------------------------------------------------------


def user_ids(text: str, layers: list[Path]) -> tuple[int, int]:
    """USER and --chown: UID[:GID] as numbers, or names from the image's passwd/group."""
    if not text:
        return 0, 0
    name, _, group = text.partition(":")

    def lookup(file: str, key: str, field_no: int) -> int | None:
        for layer in layers:  # top first: the first file found is the one the image shows
            path = layer / "etc" / file
            if path.is_file() and not path.is_symlink():
                for line in path.read_text(errors="replace").splitlines():
                    fields = line.split(":")
                    if len(fields) > field_no and fields[0] == key and fields[field_no].isdigit():
                        return int(fields[field_no])
                return None
        return None

    uid = int(name) if name.isdigit() else lookup("passwd", name, 2)
    if uid is None:
        raise InvalidValue("user", text, "UID[:GID] as numbers, or names from the image's /etc/passwd and /etc/group")
    if not group:
        gid = uid if name.isdigit() else lookup("passwd", name, 3)
    else:
        gid = int(group) if group.isdigit() else lookup("group", group, 2)
    if gid is None:
        raise InvalidValue("group", text, "UID[:GID] as numbers, or names from the image's /etc/passwd and /etc/group")
    return uid, gid


def _relay(fd: int, progress) -> threading.Thread:
    def pump() -> None:
        with os.fdopen(fd, "rb") as f:
            for line in f:
                progress(line.decode(errors="replace").rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def run(ins: dockerfile.Instruction, argv: list[str], env: list[str], config: dict, layers: list[Path],
        tar: Path, progress) -> None:  # fmt: skip
    """Run ``argv`` in a container on ``layers``; write its changes to ``tar``."""
    from labkit.runtime import container
    from labkit.runtime import state as st
    from labkit.runtime.stdio import Stdio

    if not layers:
        raise RunFailed(f"Dockerfile line {ins.line}: RUN needs an image with a shell; this stage is FROM scratch")
    cid = os.urandom(32).hex()
    uid, gid = user_ids(config.get("User") or "", layers)
    lib = st.data_dir(cid)
    spec = Spec.docker(argv, env=tuple(env), cwd=config.get("WorkingDir") or "/", uid=uid, gid=gid,
                       hostname=cid[:12], rootfs=str(st.container_dir(cid) / "rootfs"),
                       layers=tuple(str(p) for p in layers), upper=str(lib / "upper"), work=str(lib / "work"),
                       namespaces=("mount", "network", "uts", "pid", "ipc")).validate()  # fmt: skip
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    thread = None
    try:
        try:
            container.create(cid, spec, name=f"build-{cid[:12]}", image="(build)",
                             stdio=Stdio(null, write_end, write_end), detach=False, monitor_here=True)  # fmt: skip
        finally:
            os.close(write_end)  # the container holds its own copy: EOF comes when it exits
        thread = _relay(read_end, progress)
        read_end = -1
        container.start(cid)
        code = container.wait_shim(cid)
        thread.join(10.0)
        if code != 0:
            raise RunFailed(f"Dockerfile line {ins.line}: the command {argv!r} returned a non-zero code: {code}")
        with open(tar, "wb") as out:
            changes.pack(lib / "upper", out, skip_mount_points=True)
    finally:
        os.close(null)
        if read_end >= 0:
            os.close(read_end)
        with contextlib.suppress(LabkitError):
            container.delete(cid, force=True)


# --- COPY and ADD ---------------------------------------------------------------------


@dataclass(frozen=True)
class CopyPlan:
    """What one COPY or ADD writes: plain files, and archives ADD unpacks."""

    files: list[Source]
    archives: list[tuple[str, str, tuple[int, int] | None]] = field(default_factory=list)
    description: str = ""
    chmod: int | None = None


@contextlib.contextmanager
def _stage_root(layers: list[Path]) -> Iterator[Path]:
    """Another stage's files as one directory: its only layer, or an overlay of them."""
    from labkit.kernel import overlay

    if not layers:
        raise NotFound("COPY --from a stage that has no files (FROM scratch, nothing copied)")
    if len(layers) == 1:
        yield layers[0]
        return
    paths.mounts_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-from-", dir=paths.mounts_dir()) as tmp:
        with overlay.mount(layers, None, None, tmp, create=False) as root:
            yield root


@contextlib.contextmanager
def copy_plan(ins: dockerfile.Instruction, ctx: buildcontext.Context, from_layers: list[Path] | None,
              scope: dict[str, str], workdir: str, lowers: list[Path]) -> Iterator[CopyPlan]:  # fmt: skip
    """The plan of one COPY or ADD (see the module doc); other stages stay mounted
    while it is used."""
    from labkit.runtime.filesystem import secure_join

    items = dockerfile.words(ins.args, scope) if ins.exec_form is None else list(ins.exec_form)
    if len(items) < 2:
        raise ins.error(f"{ins.keyword} [--chown=USER:GROUP] SRC... DEST")
    *srcs, dest = items
    chown = ins.flag("chown")
    owner = user_ids(dockerfile.expand(chown, scope), lowers) if chown else None
    chmod = None
    if ins.flag("chmod") is not None:
        try:
            chmod = int(ins.flag("chmod") or "", 8)
        except ValueError:
            raise ins.error("--chmod=MODE in octal, e.g. 755") from None
    if any(s.startswith(("http://", "https://")) for s in srcs):
        raise Unsupported(f"Dockerfile line {ins.line}: ADD from a URL: labkit builds offline; "
                          "download the file into the context and ADD it from there")  # fmt: skip
    with contextlib.ExitStack() as stack:
        if from_layers is not None:
            root = stack.enter_context(_stage_root(from_layers))
            found = []
            for src in srcs:
                host = secure_join(str(root), posixpath.dirname(src.rstrip("/") or "/"))
                path = os.path.join(host, posixpath.basename(src.rstrip("/")))
                if not os.path.lexists(path):
                    raise NotFound(f"Dockerfile line {ins.line}: COPY --from failed: {src!r} is not in that stage")
                found.append((path, src))
            default_owner = owner  # files of another stage keep their owner unless --chown
            sum_of = lambda s: buildcontext.file_sum(s.path)  # noqa: E731
        else:
            found = [(str(ctx.root / rel), rel) for src in srcs for rel in ctx.match(src, ins)]
            default_owner = owner or (0, 0)
            rels = {str(ctx.root / rel): rel for rel in ctx.entries}
            sum_of = lambda s: ctx.sum(rels[s.path]) if s.path in rels else buildcontext.file_sum(s.path)  # noqa: E731
        target, as_dir = buildcontext.destination(dest, workdir, len(found) > 1, ins)
        archives = []
        if ins.keyword == "ADD":
            archives = [(p, target, owner) for p, _ in found if buildcontext.is_archive(p)]
            found = [(p, n) for p, n in found if not buildcontext.is_archive(p)]
        pairs = buildcontext.plan(found, target, as_dir, lambda p: os.path.isdir(p) and not os.path.islink(p))
        files = [Source(host, image_path, default_owner) for host, image_path in pairs]
        if ctx is not None and from_layers is None:
            files = [f for f in files if _in_context(ctx, f.path)]
        if ins.keyword == "ADD" and not files and not archives:
            raise NotFound(f"Dockerfile line {ins.line}: ADD found nothing to add")
        total = buildcontext.checksum(files, sum_of)
        for path, _, _ in archives:
            total += ":" + buildcontext.file_sum(path)
        kind = "dir" if len(files) > 1 or archives else "file"
        flags = "".join(f"--{k}={v} " for k, v in ins.flags)
        yield CopyPlan(files, archives, f"{flags}{kind}:{total[:64]} in /{target}", chmod)


def _in_context(ctx: buildcontext.Context, path: str) -> bool:
    """A file under a copied directory is copied only if .dockerignore keeps it."""
    rel = os.path.relpath(path, ctx.root)
    return rel in ctx.entries


def write_layer(plan: CopyPlan, lowers: list[Path], out: BinaryIO) -> None:
    """The layer tar of ``plan``: its files, then each archive's members."""
    if not plan.archives:
        buildcontext.layer_tar(plan.files, lowers, out, plan.chmod)
        return
    # Several pieces in one layer: write each to its own tar, then join their members.
    import tarfile

    with tempfile.TemporaryDirectory(dir=paths.images_dir()) as tmp:
        pieces = []
        first = os.path.join(tmp, "files.tar")
        with open(first, "wb") as f:
            buildcontext.layer_tar(plan.files, lowers, f, plan.chmod)
        pieces.append(first)
        for n, (path, dest, owner) in enumerate(plan.archives):
            piece = os.path.join(tmp, f"{n}.tar")
            with open(piece, "wb") as f:
                buildcontext.unpacked_tar(path, dest, owner, lowers, f)
            pieces.append(piece)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as joined:
            for piece in pieces:
                with tarfile.open(piece, "r:") as part:
                    for member in part:
                        joined.addfile(member, part.extractfile(member) if member.isreg() else None)
