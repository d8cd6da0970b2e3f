"""A directory of changes becomes a layer: the reverse of ``layers.unpack``.

When a container changes its root filesystem, overlayfs writes every change into the
container's *upper* directory (kernel doc ``Documentation/filesystems/overlayfs.rst``).
``docker commit`` and every ``RUN`` of ``docker build`` turn that directory into a new
image layer, "when you change an image a new layer is created". This module does it:

- each file, directory, symlink and hard link becomes a tar member, in sorted order,
  owner and mode kept (the owner *names* are left out: they mean nothing in another
  image);
- an overlay *whiteout* (a character device 0/0 named NAME) becomes the OCI whiteout
  ``.wh.NAME``, an empty file (image-spec ``layer.md``);
- an *opaque* directory (xattr ``trusted.overlay.opaque=y``) becomes the directory plus
  ``DIR/.wh..wh..opq``;
- other device nodes and sockets are left out, as the runtime makes /dev itself.

``store`` then puts the tar into the content store as a blob *and* unpacks it as a layer
(``content.Staging``), so a committed or built image can be pushed and saved like a
pulled one.

    >>> tar = changes.pack("/var/lib/labkit/containers/ID/upper", out)   # doctest: +SKIP
    >>> diff_id = changes.store(tar)                                       # doctest: +SKIP

Layer: engine. Used by build (RUN, COPY, ADD) and the CLI's ``commit``; calls content,
layers and the kernel's overlay helpers.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from labkit.engine import content
from labkit.engine.layers import OPAQUE_MARKER, WHITEOUT_PREFIX
from labkit.kernel import overlay

# Directories the runtime mounts over in every container: a RUN that finds them
# missing makes empty mount points, which are no change of the image.
MOUNT_POINTS = ("dev", "proc", "sys")
# Files the engine bind-mounts over in a networked container (engine/endpoints.py). Where
# the image lacks them, the runtime leaves an empty file in the upper directory as the
# mount point; what the container writes to them goes to the bind mount's source. Docker
# keeps these stubs in a separate "init" layer that `docker commit` leaves out; so does
# this, by skipping them while they are empty.
MOUNT_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")


def _plain(info: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    info.name = name
    info.uname = info.gname = ""
    return info


def _inside(host_id: int, rows) -> int:
    """``host_id`` as a user namespace with map ``rows`` shows it (no map: the same; not
    mapped: 65534, the kernel's overflow id)."""
    if not rows:
        return host_id
    return next((inside + host_id - host for inside, host, n in rows if host <= host_id < host + n), 65534)


def _empty(name: str, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = int(mtime)
    info.mode = 0o644
    return info


def pack(upper: str | os.PathLike[str], out: BinaryIO, skip_mount_points: bool = False,
         maps: tuple = ((), ())) -> int:  # fmt: skip
    """Write the changes in directory ``upper`` to ``out`` as a layer tar; the number of
    members written. ``skip_mount_points`` leaves out /dev, /proc and /sys when they are
    empty directories, and the empty mount points of MOUNT_FILES (what a container's
    runtime made, not what its command did). ``maps`` (uid map, gid map: rows of inside,
    host, count) turns the host's owners back into the container's, as it saw them."""
    top = Path(upper)
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(top)
            if skip_mount_points and rel_dir == Path("."):
                for name in MOUNT_POINTS:
                    path = top / name
                    if name in dirnames and not os.listdir(path) and not overlay.is_opaque(path):
                        dirnames.remove(name)
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                arc = str(rel_dir / name) if rel_dir != Path(".") else name
                st = os.lstat(full)
                if skip_mount_points and arc in MOUNT_FILES and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    continue
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # an overlay whiteout
                    parent = str(rel_dir) + "/" if rel_dir != Path(".") else ""
                    tar.addfile(_empty(f"{parent}{WHITEOUT_PREFIX}{name}", st.st_mtime))
                    count += 1
                    continue
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)
                        or stat.S_ISFIFO(st.st_mode)):  # fmt: skip
                    continue  # devices and sockets: the runtime's business, not the image's
                info = _plain(tar.gettarinfo(str(full), arcname=arc), arc)
                info.uid, info.gid = _inside(info.uid, maps[0]), _inside(info.gid, maps[1])
                if info.isreg():
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                count += 1
                if info.isdir() and overlay.is_opaque(full):
                    tar.addfile(_empty(f"{arc}/{OPAQUE_MARKER}", st.st_mtime))
                    count += 1
    return count


def store(tar_path: str | os.PathLike[str]) -> str:
    """Keep the uncompressed layer tar at ``tar_path`` as a blob and unpack it as a layer;
    its DiffID (for an uncompressed tar, also the blob's digest)."""
    with open(tar_path, "rb") as f, content.Staging() as stage:
        path, digest = stage.write_any(f)
        stage.import_layer(path, content.LAYER_TAR, digest)
        stage.commit()
    return digest
