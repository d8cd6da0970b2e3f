"""The build context, and the layers COPY and ADD make from it.

``docker build DIR`` first sends DIR, the *context*, to the daemon, leaving out what
``DIR/.dockerignore`` names; every COPY and ADD then takes its files from that one
snapshot. ``Context`` is labkit's snapshot: the tree is walked once, each file's
sha256 computed at most once. The sums are what makes the layer cache right: Docker's
classic builder keys a COPY on the content, mode and owner of the files it copies, not
on their mtime (moby ``builder/dockerfile/copy.go``), and so does ``Copy.checksum``.

``layer_tar`` writes the layer of one COPY or ADD: the destination's parent
directories (with the metadata they already have in the image, so a COPY into /etc
does not change /etc's mode), then the files. ADD of a local tar (plain, gzip, bzip2,
xz) unpacks its members under the destination instead.

Layer: engine. Used by build; calls dockerfile (patterns) and runtime.filesystem
(resolving paths inside a stage without following links out of it).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from labkit.engine import dockerfile
from labkit.errors import InvalidValue, NotFound


@dataclass(frozen=True)
class Source:
    """One file to copy: where it is on the host, where it goes in the image (relative
    to /), and the owner it gets there (None: keep the file's own)."""

    path: str
    dest: str
    owner: tuple[int, int] | None = (0, 0)


class Context:
    """A build context directory, walked once (see the module doc)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotFound(f"build context {str(root)!r} is not a directory")
        ignore = self.root / ".dockerignore"
        rules = dockerfile.ignore_rules(ignore.read_text()) if ignore.is_file() else []
        has_exceptions = any(negate for negate, _ in rules)
        self.entries: dict[str, os.stat_result] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(dirnames + filenames):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if rules and dockerfile.ignored(rules, rel):
                    if name in dirnames and not has_exceptions:
                        dirnames.remove(name)  # nothing below it can come back
                    continue
                self.entries[rel] = os.lstat(os.path.join(dirpath, name))
        self._sums: dict[str, str] = {}

    def match(self, pattern: str, where: dockerfile.Instruction) -> list[str]:
        """Context paths (relative) that ``pattern`` names: a path or a glob."""
        norm = posixpath.normpath(pattern).lstrip("/")
        if norm == ".." or norm.startswith("../"):
            raise where.error(f"a source inside the build context, not {pattern!r}")
        if norm == ".":
            return ["."]
        if any(c in norm for c in "*?["):
            found = [p for p in self.entries if dockerfile.glob_match(norm, p)]
        else:
            found = [norm] if norm in self.entries else []
        if not found:
            raise NotFound(f"Dockerfile line {where.line}: {where.keyword} failed: {pattern!r} is not in the "
                           "build context (or .dockerignore leaves it out)")  # fmt: skip
        return sorted(found)

    def below(self, rel: str) -> list[str]:
        """``rel`` and every context path under it, parents first."""
        if rel == ".":
            return sorted(self.entries)
        return [rel] + sorted(p for p in self.entries if p.startswith(rel + "/"))

    def sum(self, rel: str) -> str:
        """sha256 of a file's content (a link's target), computed once per build."""
        if rel not in self._sums:
            self._sums[rel] = file_sum(str(self.root / rel))
        return self._sums[rel]


def file_sum(path: str) -> str:
    st = os.lstat(path)
    sha = hashlib.sha256()
    if stat.S_ISLNK(st.st_mode):
        sha.update(os.readlink(path).encode())
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()


def destination(dest: str, workdir: str, many: bool, ins: dockerfile.Instruction) -> tuple[str, bool]:
    """The destination relative to /, and whether it names a directory (a trailing
    ``/``, or several sources, as Docker requires)."""
    if not dest:
        raise ins.error(f"{ins.keyword} SRC... DEST")
    as_dir = dest.endswith("/") or dest in (".", "..") or many
    full = posixpath.normpath(posixpath.join(workdir or "/", dest))
    return full.lstrip("/"), as_dir


def plan(sources: list[tuple[str, str]], dest: str, as_dir: bool, top_is_dir) -> list[tuple[str, str]]:
    """(host path, image path) pairs for sources given as (host path, name): a
    directory's *contents* go into ``dest``; a file goes to ``dest/name`` or ``dest``."""
    pairs = []
    for host, name in sources:
        if top_is_dir(host):
            for dirpath, dirnames, filenames in os.walk(host):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, host)
                for entry in sorted(dirnames + filenames):
                    rel = entry if rel_dir == "." else f"{rel_dir}/{entry}"
                    pairs.append((os.path.join(dirpath, entry), posixpath.join(dest, rel)))
        else:
            pairs.append((host, posixpath.join(dest, posixpath.basename(name)) if as_dir else dest))
    return pairs


def checksum(files: list[Source], sum_of) -> str:
    """What the cache compares: each file's destination, mode, owner and content."""
    sha = hashlib.sha256()
    for src in files:
        st = os.lstat(src.path)
        owner = src.owner or (st.st_uid, st.st_gid)
        body = sum_of(src) if not stat.S_ISDIR(st.st_mode) else ""
        sha.update(f"{src.dest}\0{st.st_mode:o}\0{owner[0]}:{owner[1]}\0{body}\n".encode())
    return sha.hexdigest()


def _parent_infos(dest: str, lowers: list[Path], seen: set[str]) -> list[tarfile.TarInfo]:
    """Tar entries for the directories above ``dest``: as the image has them, or new."""
    out = []
    parts = [p for p in dest.split("/") if p][:-1]
    for n in range(1, len(parts) + 1):
        rel = "/".join(parts[:n])
        if rel in seen:
            continue
        seen.add(rel)
        info = tarfile.TarInfo(rel)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        for layer in lowers:  # top first: the first one found is the one the image shows
            try:
                st = os.lstat(layer / rel)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                info.mode, info.uid, info.gid, info.mtime = st.st_mode & 0o7777, st.st_uid, st.st_gid, int(st.st_mtime)
            break
        out.append(info)
    return out


def layer_tar(files: list[Source], lowers: list[Path], out: BinaryIO, chmod: int | None = None) -> None:
    """Write the layer for ``files`` (see the module doc) to ``out``."""
    seen: set[str] = set()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for src in files:
            for info in _parent_infos(src.dest, lowers, seen):
                tar.addfile(info)
            info = tar.gettarinfo(src.path, arcname=src.dest)
            info.uname = info.gname = ""
            if src.owner is not None:
                info.uid, info.gid = src.owner
            if chmod is not None and not info.issym():
                info.mode = chmod
            seen.add(src.dest)
            if info.isreg():
                with open(src.path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)


def is_archive(path: str) -> bool:
    """ADD unpacks a local file that tarfile can read (plain, gz, bz2, xz)."""
    return os.path.isfile(path) and not os.path.islink(path) and tarfile.is_tarfile(path)


def unpacked_tar(archive: str, dest: str, owner: tuple[int, int] | None, lowers: list[Path], out: BinaryIO) -> None:
    """The layer of ``ADD archive.tar dest/``: its members under ``dest``."""
    seen: set[str] = set()
    with tarfile.open(archive, "r:*") as src, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info in _parent_infos(dest + "/x", lowers, seen):
            tar.addfile(info)
        for member in src:
            name = posixpath.normpath(member.name.lstrip("/"))
            if name == ".." or name.startswith("../"):
                raise InvalidValue("member of " + os.path.basename(archive), member.name, "a path inside the archive")
            member.name = dest if name == "." else posixpath.join(dest, name)
            if member.islnk():
                member.linkname = posixpath.join(dest, posixpath.normpath(member.linkname.lstrip("/")))
            if owner is not None:
                member.uid, member.gid = owner
            member.uname = member.gname = ""
            tar.addfile(member, src.extractfile(member) if member.isreg() else None)
