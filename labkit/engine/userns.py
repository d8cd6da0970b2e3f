"""``--userns=auto``: give a container's root a range of host ids that belongs to nobody.

In a user namespace uid 0 inside is an ordinary uid outside (user_namespaces(7)). Where
those outside ids come from is the administrator's choice: ``/etc/subuid`` and
``/etc/subgid`` hand out *subordinate* ranges, one line each, ``NAME:FIRST:COUNT``. labkit
reads the line of the name ``labkit`` (provision.sh writes ``labkit:1000000:1048576``) and
cuts it into slices of 65536 ids, one slice per container, as podman's ``--userns=auto``
does: root in one container is host uid 1000000, in the next 1065536, and no two
containers share an id, so not even a process that escaped its container could touch
another container's files.

The image's files belong to host uid 0, which is no id at all inside such a namespace
(it shows as 65534, "nobody"): root in the container could not write its own /etc. Two
ways out:

- an *idmapped mount* (mount_setattr(2), Linux 5.12) shows a directory with its owners
  shifted, without touching the files; overlayfs accepts idmapped layers from Linux 5.19,
  but only through the new mount API, from outside the container's namespaces;
- a *chowned copy*: every file of a layer copied once, its owner moved up by the slice's
  first id. It costs disk and one copy per layer and slice (cached here, so the second
  container on the same slice starts as fast as any), and works on every kernel and
  filesystem (a tmpfs on kernels before 6.3, as in labkit's small cgroup v2 VM, included).

labkit takes an idmapped mount where this kernel and the image store's filesystem allow
it (``idmapped()``, tried once per boot), and the chowned copy elsewhere. A copy also
renames overlayfs's ``trusted.overlay.opaque`` marks to ``user.overlay.opaque``: inside a
user namespace overlayfs reads only the ``user.`` ones (its ``userxattr`` option). (The
image store writes both marks, so an idmapped layer has its ``user.`` one already.)

Layer: engine. Used by cli/runflags.py; runtime/spec.py carries the maps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import InvalidValue, LabkitError, NotFound, Unsupported
from labkit.kernel import safe
from labkit.runtime.state import data_dir

SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
OWNER = "labkit"  # the name whose subordinate ranges labkit uses
SLICE = 65536  # ids per container: 0..65535 inside, as a whole Linux system has
SUGGESTED = f"{OWNER}:1000000:{16 * SLICE}"  # what provision.sh writes: 16 containers at once
FRESH = 60.0  # seconds a lease counts as taken before its container exists


@dataclass(frozen=True)
class Range:
    """One slice: host ids ``first .. first + size - 1`` are ids 0.. inside."""

    first: int
    size: int = SLICE

    def uid_map(self) -> tuple[tuple[int, int, int], ...]:
        return ((0, self.first, self.size),)


def subordinate(path: str = SUBUID, owner: str = OWNER) -> tuple[int, int]:
    """(first, count) of ``owner``'s line in ``path``; NotFound says which line to add."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    for number, line in enumerate(lines, 1):
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] == owner:
            if not (fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) >= SLICE):
                raise InvalidValue(f"{path} line {number}", line, f"{owner}:FIRST:COUNT with COUNT >= {SLICE}")
            return int(fields[1]), int(fields[2])
    raise NotFound(f"--userns=auto: {path} has no range for {owner!r}: add the line "
                   f"'{SUGGESTED}' (sudo vagrant/provision.sh does)")  # fmt: skip


def allocate(container_id: str) -> Range:
    """The first slice of labkit's range that no container holds, leased to ``container_id``.

    A lease is a file ``leases/ID`` holding the slice's first id; it lasts as long as the
    container's directory (until ``labkit rm``), or FRESH seconds before that exists.
    /etc/subuid and /etc/subgid must give labkit the same range (provision.sh does).
    """
    first, count = subordinate(SUBUID)
    if subordinate(SUBGID) != (first, count):
        raise InvalidValue(f"{OWNER}'s range in {SUBGID}", subordinate(SUBGID), f"the same as in {SUBUID}: {first}:{count}")
    slices = [first + i * SLICE for i in range(count // SLICE)]
    leases = _dir() / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    with _locked(_dir() / ".lock"):
        taken = set()
        for lease in leases.iterdir():
            try:
                base = int(lease.read_text())
                age = time.time() - lease.stat().st_mtime
            except (OSError, ValueError):
                continue
            if _container_exists(lease.name) or age < FRESH:
                taken.add(base)
            else:
                lease.unlink(missing_ok=True)  # its container was removed
        free = [s for s in slices if s not in taken]
        if not free:
            raise LabkitError(f"--userns=auto: all {len(slices)} ranges of {OWNER} in {SUBUID} are in use "
                              f"(one per container): remove a container, or give {OWNER} a larger range")  # fmt: skip
        (leases / container_id).write_text(str(free[0]))
    return Range(free[0])


def check_reachable(path: Path, ids: Range) -> None:
    """The container's root, an ordinary host uid, must pass through every directory
    above its layers and upper dir: one line naming the first one it could not."""
    for d in [path, *path.parents]:
        try:
            mode = d.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            raise LabkitError(f"--userns=auto: {d} is closed to other users (mode {stat.S_IMODE(mode):o}), and "
                              f"the container's root is host uid {ids.first}: chmod o+x {d}, or use another state root")  # fmt: skip


def release(container_id: str) -> None:
    """Give the slice back now (a container that could not be created)."""
    (_dir() / "leases" / container_id).unlink(missing_ok=True)


def idmapped() -> bool:
    """May this machine show the layers through idmapped mounts (kernel/idmap.py)? Tried
    for real once per boot and kernel; the answer is kept in the run root."""
    from labkit.kernel import idmap  # (only --userns=auto needs it)

    note = paths.run_root() / "idmap-probe"
    key = f"{os.uname().release} {paths.images_dir()}"
    try:
        seen, _, answer = note.read_text().rpartition(" ")
        if seen == key:
            return answer == "yes"
    except OSError:
        pass
    paths.images_dir().mkdir(parents=True, exist_ok=True)
    ok = idmap.supported(str(paths.images_dir()))
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(f"{key} {'yes' if ok else 'no'}")
    return ok


def shifted_layers(layers: list[Path], ids: Range) -> list[Path]:
    """Each layer as a copy owned by the slice's ids (made once, then reused)."""
    check_reachable(_dir(), ids)
    check_reachable(data_dir("x").parent, ids)  # where the upper and work dirs go
    return [shifted(layer, ids) for layer in layers]


def shifted(layer: Path, ids: Range) -> Path:
    """``layer``'s chowned copy for ``ids``: ``userns/FIRST/LAYER-ID/diff``."""
    target = _dir() / str(ids.first) / layer.parent.name / layer.name
    if target.is_dir():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(target.parent.parent, 0o711)  # the container's root must pass through, not list
    with _locked(target.parent.parent / f".{layer.parent.name}.lock"):
        if target.is_dir():
            return target
        scratch = target.parent.with_name(f".new-{layer.parent.name}")
        if scratch.exists():
            safe.remove_tree(scratch, within=_dir())  # a copy that was interrupted
        (scratch).mkdir(mode=0o711)
        copy_shifted(layer, scratch / layer.name, ids.first)
        os.rename(scratch, target.parent)
    return target


def copy_shifted(src: Path, dst: Path, offset: int) -> int:
    """Copy the tree ``src`` to ``dst`` with every owner moved up by ``offset``; the
    number of entries copied. Hard links stay hard links, whiteouts stay whiteouts."""
    seen: dict[tuple[int, int], str] = {}
    count = 0
    for here, dirs, files in os.walk(src):
        rel = os.path.relpath(here, src)
        out = os.path.normpath(os.path.join(dst, rel))
        _copy_entry(here, out, offset, seen, is_dir=True)
        for name in dirs:  # symlinks to directories are listed here, but are links
            if os.path.islink(os.path.join(here, name)):
                _copy_entry(os.path.join(here, name), os.path.join(out, name), offset, seen, is_dir=False)
        for name in files:
            _copy_entry(os.path.join(here, name), os.path.join(out, name), offset, seen, is_dir=False)
        count += 1 + len(files)
    return count


def _copy_entry(src: str, dst: str, offset: int, seen: dict, is_dir: bool) -> None:
    st = os.lstat(src)
    mode = stat.S_IMODE(st.st_mode)
    if is_dir:
        if not os.path.isdir(dst):
            os.mkdir(dst)
        if _is_opaque(src):
            try:
                os.setxattr(dst, "user.overlay.opaque", b"y")
            except OSError as err:
                raise Unsupported(f"--userns=auto: {src} is an opaque directory, and {dst} cannot carry "
                                  f"overlayfs's user.overlay.opaque mark ({err.strerror}: a tmpfs before "
                                  "Linux 6.6 has no user.* xattrs): keep the image store elsewhere") from None
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
        os.link(seen[(st.st_dev, st.st_ino)], dst)
        return
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst, follow_symlinks=False)  # the contents only (sendfile(2))
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        os.mknod(dst, st.st_mode, st.st_rdev)  # a 0/0 character device: an overlay whiteout
    else:
        return  # sockets: nothing an image needs
    if st.st_nlink > 1 and not is_dir:
        seen[(st.st_dev, st.st_ino)] = dst
    os.lchown(dst, st.st_uid + offset, st.st_gid + offset)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, mode)  # after chown, which clears the setuid and setgid bits
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _is_opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name) == b"y":
                return True
    return False


def original_of(path: Path) -> Path:
    """The layer a chowned copy was made from (any other path: itself)."""
    try:
        rel = path.relative_to(_dir())
    except ValueError:
        return path
    return paths.images_dir() / "layers" / rel.parts[1] / rel.parts[2] if len(rel.parts) == 3 else path


def remove_copies(layer: Path) -> None:
    """Delete every slice's copy of ``layer`` (the image store removed the layer)."""
    if not _dir().is_dir():
        return
    for slice_dir in _dir().iterdir():
        copy = slice_dir / layer.parent.name
        if slice_dir.name.isdigit() and copy.is_dir():
            safe.remove_tree(copy, within=_dir())


def _dir() -> Path:
    return paths.images_dir() / "userns"


def _container_exists(container_id: str) -> bool:
    return data_dir(container_id).exists()


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
