"""overlayfs: one merged directory made of read-only layers plus one writable layer.

    mount -t overlay overlay -o lowerdir=TOP:...:BOTTOM,upperdir=UP,workdir=WORK MERGED

- Reads fall through: a name is looked up in the upper layer, then in each lower layer
  from the top down; the first hit wins.
- Writing to a file of a lower layer first *copies it up* into the upper layer.
- Deleting a lower file leaves a *whiteout* in the upper layer: a character device with
  device number 0/0 that hides the name.
- Removing a lower directory and making it again leaves an *opaque* directory: the xattr
  ``trusted.overlay.opaque=y`` says "hide everything below me in the lower layers".
- The work directory is overlayfs's scratch space for atomic copy-ups; it must be empty
  and on the same filesystem as the upper layer.

This is how Docker runs a container from an image: the image's layers are the lower
directories (lowerdir lists the TOP layer first), a fresh empty upper directory takes
the container's changes.

Kernel doc: Documentation/filesystems/overlayfs.rst. Layer: kernel. Used by the runtime
(the container's rootfs), the engine (layer diffs) and notebook 05.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import InvalidValue, SyscallError, require_root
from labkit.kernel import syscalls

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def options(lowers: Iterable[str | os.PathLike], upper: str | os.PathLike | None, work: str | os.PathLike | None) -> str:
    """The mount option string for these layers (``lowers`` top layer first).

    Without upper and work the overlay is read-only: just the lower layers merged.
    """
    lows = [os.path.abspath(p) for p in lowers]
    if not lows:
        raise InvalidValue("overlay lower layers", [], "at least one lower directory")
    for p in lows:
        if ":" in p or "," in p:
            raise InvalidValue("overlay layer path", p, "a path without ':' or ','")
    opts = "lowerdir=" + ":".join(lows)
    if (upper is None) != (work is None):
        raise InvalidValue("overlay upper/work", (upper, work), "both upperdir and workdir, or neither")
    if upper is not None:
        up, wk = os.path.abspath(upper), os.path.abspath(work)  # type: ignore[arg-type]
        for p in (up, wk):
            if "," in p:  # a comma would end the option and start a new one
                raise InvalidValue("overlay layer path", p, "a path without ','")
        opts += f",upperdir={up},workdir={wk}"
    return opts


class Overlay:
    """A mounted overlay. Use it as a context manager, or call ``unmount()``."""

    def __init__(self, target: Path, opts: str, lowers: list[Path], upper: Path | None, work: Path | None):
        self.target = target
        self.options = opts
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            syscalls.umount2(self.target)
            self.mounted = False

    def changes(self) -> list[Change]:
        """What the upper layer holds so far (see ``inspect``)."""
        if self.upper is None:
            return []
        return inspect(self.upper, self.lowers)

    def __enter__(self) -> Path:
        return self.target

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def __repr__(self) -> str:
        return f"<Overlay {self.target} {'mounted' if self.mounted else 'unmounted'}>"


def mount(
    lowers: Iterable[str | os.PathLike],
    upper: str | os.PathLike | None,
    work: str | os.PathLike | None,
    target: str | os.PathLike,
    *,
    create: bool = True,
) -> Overlay:
    """Mount an overlay of ``lowers`` (top first) + ``upper`` at ``target``.

    >>> with overlay.mount([image], upper, work, merged) as root:  # doctest: +SKIP
    ...     (root / "hello").write_text("hi")   # lands in upper; image stays untouched
    """
    require_root("mounting an overlay")
    lows = [Path(p).resolve() for p in lowers]
    for p in lows:
        if not p.is_dir():
            raise InvalidValue("overlay lower layer", str(p), "an existing directory")
    opts = options(lows, upper, work)  # every value is checked before a directory is made
    made: list[Path] = []
    if create:
        for d in (Path(p).absolute() for p in (upper, work, target) if p is not None):
            missing = [a for a in (d, *d.parents) if not a.exists()]
            d.mkdir(parents=True, exist_ok=True)
            made += reversed(missing)  # parents before children
    try:
        syscalls.mount("overlay", target, "overlay", 0, opts)
    except SyscallError as e:
        for d in reversed(made):  # a failed mount leaves nothing behind
            os.rmdir(d)
        if e.errno == 22 and upper is not None:
            e.hint = ("the upper and work directories must be on one filesystem that supports "
                      "overlay upper layers (tmpfs or ext4, not another overlay), and work must be empty")
        raise
    return Overlay(Path(target), opts, lows, Path(upper) if upper else None, Path(work) if work else None)


# --- Reading an upper layer --------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One entry of an upper layer. ``kind`` is one of:

    - ``"new"``: created in the overlay, absent from every lower layer;
    - ``"copied_up"``: a lower file that was written to (or chmod-ed), so copied up;
    - ``"whiteout"``: a lower file or directory that was deleted;
    - ``"opaque"``: a directory made again after deleting it: lower contents hidden.
    """

    path: str  # relative to the layer's root, starting with "/"
    kind: str


def is_whiteout(path: str | os.PathLike) -> bool:
    """overlayfs marks a deleted name with a character device numbered 0/0."""
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str | os.PathLike) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def inspect(upper: str | os.PathLike, lowers: Iterable[str | os.PathLike] | None = None) -> list[Change]:
    """List what an upper layer records, sorted by path.

    Without ``lowers``, every file that is neither a whiteout nor an opaque directory is
    reported as ``"copied_up"`` when it cannot be told apart from a new one.
    """
    top = Path(upper)
    lows = [Path(p) for p in (lowers or [])]
    out: list[Change] = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = "/" + str(full.relative_to(top))
            if is_whiteout(full):
                out.append(Change(rel, "whiteout"))
            elif full.is_dir() and not full.is_symlink():
                if is_opaque(full):
                    out.append(Change(rel, "opaque"))
                elif lows and not _in_lowers(rel, lows):
                    out.append(Change(rel, "new"))
                # a plain directory that exists below only holds the entries listed below it
            else:
                kind = "copied_up" if (not lows or _in_lowers(rel, lows)) else "new"
                out.append(Change(rel, kind))
    return sorted(out, key=lambda c: c.path)


def _in_lowers(rel: str, lowers: list[Path]) -> bool:
    return any(os.path.lexists(str(low) + rel) for low in lowers)
