"""Deleting a directory tree without ever leaving it.

A container's root filesystem is full of things that point elsewhere: absolute
symlinks (``/etc/localtime -> /usr/share/zoneinfo/UTC``, or a hostile
``/data -> /``), and, while the container lives, mount points (``/proc``, a bind
mount of a host directory). ``shutil.rmtree`` walks paths, so a symlink swapped in
at the wrong moment or a forgotten bind mount sends it into the host's files.

``remove_tree`` walks file descriptors instead, the way the kernel's ``*at()`` calls
allow (openat(2), unlinkat(2), fstatat(2)):

- every directory is opened relative to its parent's fd with ``O_NOFOLLOW``, so a
  symlink is removed as a link and never entered;
- before anything is deleted, /proc/self/mountinfo is searched for a mount point at
  or below the tree (proc(5)); if there is one, nothing is deleted and the error
  names it: unmounting is the caller's job;
- while walking, every directory must sit on the same device (``st_dev``) as the
  top of the tree, a second guard against a mount appearing half-way;
- the tree must lie inside ``within`` (labkit's state root by default).

    >>> from labkit.kernel import safe
    >>> safe.remove_tree("/var/lib/labkit/containers/abc")    # doctest: +SKIP
    1234

Man pages: openat(2), unlinkat(2), fstatat(2), proc(5) "/proc/pid/mountinfo".
Layer: kernel. Used by the engine (removing layers and image trees), the runtime
(removing container directories) and cleanup.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from labkit import paths
from labkit.errors import InvalidValue, NotFound, StateError, SyscallError
from labkit.kernel import mounts

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def mounts_below(path: str | os.PathLike[str]) -> list[Path]:
    """Mount points at ``path`` or anywhere inside it. ``path`` is compared as given,
    not resolved: a symlink to /proc is a link to delete, not a mount point."""
    # compared as strings: a Path per mount costs more than reading mountinfo does
    top = str(Path(path))
    below = "/" if top == "/" else top + "/"
    return [Path(p) for p in (m.mountpoint for m in mounts.mountinfo()) if p == top or p.startswith(below)]


def _check_inside(path: Path, within: Path) -> tuple[Path, Path]:
    """Resolve ``path``'s parent (not ``path`` itself: it may be a symlink we must
    delete as a link) and make sure the result lies strictly inside ``within``.
    Returns (the real ``within``, the target relative to it)."""
    real_within = Path(os.path.realpath(within))
    target = Path(os.path.realpath(path.parent)) / path.name
    if path.name in ("", ".", "..") or real_within not in target.parents:
        raise InvalidValue("path to delete", str(path), f"a path inside {within}")
    return real_within, target.relative_to(real_within)


def _open_parent(real_within: Path, rel: Path) -> int:
    """An fd for the directory holding ``rel``, reached component by component from
    ``within`` with O_NOFOLLOW: a symlink anywhere on the way stops the walk."""
    try:
        fd = os.open(real_within, _DIR_FLAGS)
    except FileNotFoundError:
        raise NotFound(f"cannot delete {real_within / rel}: {real_within} does not exist") from None
    try:
        for part in rel.parent.parts:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError as err:
        os.close(fd)
        if err.errno == errno.ENOENT:
            raise NotFound(
                f"cannot delete {real_within / rel}: {real_within / rel.parent} does not exist"
            ) from None
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StateError(
                f"refusing to delete {real_within / rel}: a symlink or file sits on the way to it"
            ) from None
        raise
    return fd


def remove_tree(path: str | os.PathLike[str], within: str | os.PathLike[str] | None = None) -> int:
    """Delete ``path`` and everything below it; return how many entries went.

    ``within`` (default: labkit's ``paths.lib_root()``) is the directory the tree must
    lie strictly inside; anything else raises ``InvalidValue`` before a byte is touched.
    A symlink (at the top or anywhere below) is unlinked, never followed. A mount
    point at or below ``path`` raises ``StateError`` and nothing is deleted. A path
    that does not exist is not an error: it returns 0, so deleting twice is harmless.
    """
    within = Path(within) if within is not None else paths.lib_root()
    if not Path(path).is_absolute():  # relative to what? the cwd is no anchor for deleting
        raise InvalidValue("path to delete", str(path), f"an absolute path inside {within}")
    real_within, rel = _check_inside(Path(os.path.abspath(path)), within)
    target = real_within / rel
    busy = mounts_below(target)
    if busy:
        where = ", ".join(str(p) for p in busy[:3]) + (" ..." if len(busy) > 3 else "")
        raise StateError(
            f"refusing to delete {target}: {where} is mounted inside it; unmount first (nothing was deleted)"
        )
    try:
        parent_fd = _open_parent(real_within, rel)
    except NotFound:
        return 0
    try:
        try:
            st = os.lstat(rel.name, dir_fd=parent_fd)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(rel.name, dir_fd=parent_fd)
            return 1
        return _remove_dir(parent_fd, rel.name, st.st_dev, target)
    finally:
        os.close(parent_fd)


def remove_at(dir_fd: int, name: str) -> int:
    """Delete entry ``name`` of the directory open as ``dir_fd`` (a tree or not),
    with the same rules as ``remove_tree`` except the mountinfo search: the caller
    owns ``dir_fd`` and knows nothing is mounted there. Returns the entries deleted."""
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return 1
    return _remove_dir(dir_fd, name, st.st_dev, Path(name))


def _remove_dir(parent_fd: int, name: str, dev: int, shown: Path) -> int:
    """Empty directory ``name`` (relative to ``parent_fd``), then rmdir it.

    An entry that is gone already is no error: another process may be deleting the same
    tree (``labkit rm -f`` of a ``--rm`` container races with its shim's own removal).
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return 0
    except PermissionError:
        # Not root, and a directory we own but may not read (overlayfs leaves its work/work
        # at mode 000): its owner may give the permission back, then open it
        os.chmod(name, 0o700, dir_fd=parent_fd, follow_symlinks=False)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    count = 0
    try:
        if os.fstat(fd).st_dev != dev:
            # A different filesystem: something got mounted here after our check.
            raise StateError(
                f"refusing to delete {shown}: another filesystem is mounted there; unmount first"
            )
        for entry in os.listdir(fd):
            try:
                st = os.lstat(entry, dir_fd=fd)
                if stat.S_ISDIR(st.st_mode):
                    count += _remove_dir(fd, entry, dev, shown / entry)
                else:
                    # unlinkat on a symlink removes the link itself: its target is untouched.
                    os.unlink(entry, dir_fd=fd)
                    count += 1
            except FileNotFoundError:
                pass  # removed by the other deleter meanwhile
    except SyscallError:
        raise
    except OSError as err:
        raise SyscallError(
            err.errno or errno.EIO, "unlinkat", f"{str(shown)!r}/{err.filename or ''}"
        ) from None
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return count
    except OSError as err:
        raise SyscallError(err.errno or errno.EIO, "rmdir", repr(str(shown))) from None
    return count + 1
