"""A layer is a tar archive; this module unpacks one into a directory, safely.

An image layer (OCI image-spec ``layer.md``) is a tar of the files that layer adds
or changes. Two special names record deletions, and overlayfs has its own way to
say the same thing (Documentation/filesystems/overlayfs.rst), so unpacking
translates them:

- ``dir/.wh.NAME`` (NAME was deleted) becomes a character device 0/0 named NAME:
  overlayfs's *whiteout*, which hides NAME in the lower layers;
- ``dir/.wh..wh..opq`` (dir replaces the lower one entirely) becomes the xattr
  ``trusted.overlay.opaque=y`` on dir: an *opaque directory*.

A root filesystem holds absolute symlinks (``/bin/sh -> dash`` style links are
fine, but so is a hostile ``etc -> /etc`` followed by a member ``etc/passwd``).
Python's ``tarfile`` ``filter='data'`` refuses absolute symlinks, so it cannot
unpack a real image, and plain ``extractall`` follows them. ``unpack`` therefore
creates every entry relative to a directory fd (openat(2), mkdirat(2),
symlinkat(2), linkat(2)) reached with ``O_NOFOLLOW`` from the destination: no
member can write outside it, whatever its name or the links before it.
Device nodes are skipped (a container gets its /dev from the runtime). A whiteout
must name a plain entry (``.wh..`` would hide the directory itself), and a hard link
must point at a file written earlier in the same layer. Any member that breaks a rule,
or a tar cut short, raises one ``InvalidValue``/``BadContent`` line naming the member;
the caller (``images.import_layer``) then deletes the half-written directory.

Layer: engine. Used by images (to store base images and, later, pulled layers).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from labkit.errors import BadContent, InvalidValue, LabkitError
from labkit.kernel import safe

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Unpacked:
    """What ``unpack`` wrote. ``diff_id`` is the sha256 of the uncompressed tar
    (the OCI DiffID); ``size_bytes`` counts file contents, each hard link once."""

    diff_id: str
    entries: int
    size_bytes: int
    skipped: tuple[str, ...]


class _HashingReader:
    """Wraps a binary stream and hashes every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        # tar ends with zero blocks that tarfile may not read; the DiffID covers them.
        while self.read(1 << 20):
            pass


def _parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidValue("layer member", name, "a path that stays inside the layer (no '..')")
    return parts


class _Tree:
    """Directory fds below the destination, opened without following symlinks."""

    def __init__(self, dest: Path) -> None:
        self.fds: dict[tuple[str, ...], int] = {(): os.open(dest, _DIR_FLAGS)}
        self.last: str | None = None  # the member being written, for error messages

    def dir(self, parts: list[str] | tuple[str, ...], member: str) -> int:
        """The fd of directory ``parts``, making missing directories (mode 0755)."""
        key = tuple(parts)
        if key in self.fds:
            return self.fds[key]
        parent = self.dir(key[:-1], member)
        try:
            fd = os.open(key[-1], _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(key[-1], 0o755, dir_fd=parent)
            fd = os.open(key[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise InvalidValue(
                    "layer member", member, "a path whose directories are not symlinks or files"
                ) from None
            raise
        self.fds[key] = fd
        return fd

    def forget(self, parts: tuple[str, ...]) -> None:
        """Drop cached fds at or below ``parts`` (that entry is being replaced)."""
        for key in [k for k in self.fds if k[: len(parts)] == parts and k]:
            os.close(self.fds.pop(key))

    def clear(self, parent_fd: int, parts: tuple[str, ...], keep_dir: bool) -> bool:
        """Make room for a new entry; returns True if a directory stays there."""
        try:
            st = os.lstat(parts[-1], dir_fd=parent_fd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.forget(parts)
            safe.remove_at(parent_fd, parts[-1])
        else:
            os.unlink(parts[-1], dir_fd=parent_fd)
        return False

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def unpack(source: BinaryIO | str | os.PathLike[str], dest: str | os.PathLike[str]) -> Unpacked:
    """Unpack the tar ``source`` (a path or a readable binary stream) into ``dest``.

    ``dest`` must be an existing directory. Raises ``InvalidValue`` for a member
    that tries to leave it (``..`` or a path through a symlink).
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return unpack(f, dest)
    reader = _HashingReader(source)
    tree = _Tree(Path(dest))
    try:
        return _unpack(reader, tree)
    except (tarfile.TarError, EOFError, zlib.error) as err:  # cut short, or not a (gzip) tar at all
        raise BadContent(f"layer is not a valid tar{_after(tree.last)}: {err}") from None
    except OSError as err:
        if isinstance(err, LabkitError):
            raise
        raise BadContent(f"layer member {tree.last!r}: {err.strerror or err}") from None
    finally:
        tree.close()


def _after(name: str | None) -> str:
    return f" after member {name!r}" if name else ""


def _whiteout_target(base: str, member: str) -> str:
    """The name a whiteout ``.wh.NAME`` hides: a plain name, never '', '.' or '..'."""
    hidden = base[len(WHITEOUT_PREFIX) :]
    if hidden in ("", ".", ".."):
        raise InvalidValue("layer member", member, "a whiteout .wh.NAME that names an entry of its directory")
    return hidden


def _hard_link(tree: _Tree, member: tarfile.TarInfo, parent: int, base: str) -> None:
    """A hard link to an earlier file of this layer, found without following symlinks."""
    target = _parts(member.linkname)
    if not target:
        raise InvalidValue("hard link", member.linkname, "a file inside the layer")
    src_dir = tree.dir(target[:-1], member.linkname)
    try:
        os.link(target[-1], base, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):  # EPERM: a link to a directory
        raise InvalidValue(
            "layer member", member.name, f"a hard link to a file earlier in the layer (not {member.linkname!r})"
        ) from None


def _unpack(reader: _HashingReader, tree: _Tree) -> Unpacked:
    dir_times: list[tuple[tuple[str, ...], float]] = []
    entries = size = 0
    skipped: list[str] = []
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            tree.last = member.name
            parts = tuple(_parts(member.name))
            if not parts:
                continue  # the archive's "./" itself: dest already exists
            base = parts[-1]
            parent = tree.dir(parts[:-1], member.name)
            if base == OPAQUE_MARKER:
                # trusted.* for overlayfs mounted by root; user.* for one mounted inside a
                # user namespace (--userns=auto, rootless), which may read only those
                if os.geteuid() == 0:
                    os.setxattr(parent, OPAQUE_XATTR, b"y")
                try:
                    os.setxattr(parent, "user.overlay.opaque", b"y")
                except OSError as err:  # a tmpfs before Linux 6.6 has no user.* xattrs
                    if err.errno != errno.EOPNOTSUPP or os.geteuid() != 0:
                        raise
                continue
            if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                skipped.append(member.name)  # aufs's own bookkeeping (.wh..wh.plnk ...)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                hidden = parts[:-1] + (_whiteout_target(base, member.name),)
                tree.clear(parent, hidden, keep_dir=False)
                os.mknod(hidden[-1], stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
                continue
            if member.isdev():
                skipped.append(member.name)
                continue
            # A directory already there keeps its children (a later layer or a
            # repeated entry only changes its metadata); anything else is replaced.
            kept_dir = tree.clear(parent, parts, keep_dir=member.isdir())
            entries += 1
            if member.isdir():
                if not kept_dir:
                    os.mkdir(base, 0o700, dir_fd=parent)
                fd = tree.dir(parts, member.name)
                _chown(fd, member.uid, member.gid)
                os.chmod(fd, member.mode & 0o7777)
                dir_times.append((parts, member.mtime))
            elif member.issym():
                # The target is stored as written, never resolved: it only means
                # something once the layer is the container's root.
                os.symlink(member.linkname, base, dir_fd=parent)
                _chown(base, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
                os.utime(base, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)
            elif member.islnk():
                _hard_link(tree, member, parent, base)
            elif member.isfifo():
                os.mkfifo(base, member.mode & 0o777, dir_fd=parent)
                _chown(base, member.uid, member.gid, dir_fd=parent)
            elif member.isreg():
                size += _write_file(tar, member, parent, base)
            else:
                skipped.append(member.name)
        reader.drain()
    # Directory times last: creating their children changed them.
    for parts, mtime in dir_times:
        fd = tree.dir(parts, "/".join(parts))
        os.utime(fd, (mtime, mtime))
    return Unpacked("sha256:" + reader.sha.hexdigest(), entries, size, tuple(skipped))


def _chown(target, uid: int, gid: int, **where) -> None:
    """The member's owner. Rootless there is no other owner to give: every file stays the
    user's, and in the container's user namespace the user's uid is root (0); a trusted.*
    xattr is root's too, so an opaque directory is marked with user.overlay.opaque."""
    if os.geteuid() == 0:
        os.chown(target, uid, gid, **where)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int, base: str) -> int:
    fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent)
    try:
        src = tar.extractfile(member)
        assert src is not None  # a regular member always has data
        with open(fd, "wb", closefd=False) as out:
            shutil.copyfileobj(src, out, 1 << 20)
        # chown clears set-uid bits, so the mode goes on after it.
        _chown(fd, member.uid, member.gid)
        os.chmod(fd, member.mode & 0o7777)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)
    return member.size
