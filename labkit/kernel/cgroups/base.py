"""The Cgroup interface that v1.py and v2.py implement, and what they share.

A cgroup is a directory in a cgroup filesystem. Everything labkit does to one is a
mkdir, a rmdir, or a write of one short string to one file in it: ``echo 20 >
pids.max``, ``echo $pid > cgroup.procs``. This module holds those two operations
(``read``/``write``, which turn an OSError into a CgroupError naming the file and the
value), the result types, and the verbs whose logic is the same on both versions:
waiting, killing by signals, removing children first.

Where v1 and v2 differ, the method's docstring says so.
Kernel docs: Documentation/admin-guide/cgroup-v2.rst; cgroups(7).
Layer: kernel. Used by v1.py and v2.py; the runtime holds Cgroup objects.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL, SIGTERM

from labkit import paths, poll
from labkit.errors import CgroupError, InvalidValue, LabkitError, StateError

from .detect import check_supported
from .limits import Limits

_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_NAME_FORM = "letters, digits, '-' and '_', nested with '/', e.g. containers/abc123"


def check_name(name: str) -> str:
    """A cgroup name is one or more path parts; never '..', never absolute."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if not all(_NAME_PART.match(p) for p in parts) or len(parts) > 8:
        raise InvalidValue("cgroup name", name, _NAME_FORM)
    return name


def read(path: Path) -> str:
    """The contents of a cgroup file, or a CgroupError naming it."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as err:
        raise CgroupError(err.errno or errno.EIO, str(path), "read") from None


def write(path: Path, value: str | int) -> None:
    """One write(2) of ``value`` to a cgroup file.

    The kernel parses each write as a whole, so the value goes out in a single call,
    unbuffered; an error (EINVAL for a bad number, EBUSY, ESRCH for a dead pid) comes
    back from that call and is raised as a CgroupError with the file and value.
    """
    text = str(value)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError(err.errno or errno.EIO, str(path), "write", text) from None


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file ('nr_periods 12\\nnr_throttled 3') as a dict of ints."""
    out: dict[str, int] = {}
    for line in read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


@dataclass(frozen=True)
class IoStat:
    """Bytes and operations one cgroup moved to and from one block device."""

    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


@dataclass(frozen=True)
class CgroupStats:
    """The accounting of one cgroup, with the same fields on v1 and v2.

    A field is None when this kernel or version does not count it:
    memory_peak (v2 before 5.19 has no memory.peak), oom_kills (v1 before 4.13),
    pids_refused (pids.events is missing on old kernels). memory_limit and
    pids_limit are None when unlimited. io maps "major:minor" to an IoStat.
    """

    cpu_usage_ns: int | None
    cpu_user_ns: int | None
    cpu_system_ns: int | None
    nr_periods: int | None
    nr_throttled: int | None
    throttled_ns: int | None
    memory_current: int | None
    memory_peak: int | None
    memory_limit: int | None
    oom_kills: int | None
    pids_current: int | None
    pids_limit: int | None
    pids_refused: int | None
    io: dict[str, IoStat] = field(default_factory=dict)


class Cgroup(abc.ABC):
    """One cgroup that labkit made, on either version.

    ``paths`` maps each controller to its directory: on v2 they are all the same
    directory; on v1 each controller is a separate tree, so there is one per
    hierarchy. ``version`` is 1 or 2. Use as a context manager to have the group's
    processes killed and the group removed at the end of the block.
    """

    version: int = 0
    POLL_S = 0.002  # first sleep while waiting for the kernel; doubles up to 50 ms

    def __init__(self, name: str, paths: dict[str, Path]) -> None:
        self.name = name
        self.paths = paths

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} v{self.version} {self.path}>"

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- where it is ----------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The directory to show a student: memory's on v1, the only one on v2."""
        return self.paths.get("memory") or next(iter(self.paths.values()))

    def dirs(self) -> list[Path]:
        """Each distinct directory of this group (v1: one per hierarchy)."""
        return sorted(set(self.paths.values()))

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs())

    # -- the verbs each version implements --------------------------------------------
    @abc.abstractmethod
    def apply(self, limits: Limits) -> None:
        """Write every limit that is set (None fields are left alone)."""

    @abc.abstractmethod
    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every process, and return once the kernel reports them all stopped.

        v1 writes FROZEN to freezer.state and waits while it reads FREEZING; v2 writes
        1 to cgroup.freeze and waits for "frozen 1" in cgroup.events.
        """

    @abc.abstractmethod
    def thaw(self, timeout: float = 5.0) -> None:
        """Let the processes run again, and return once none is frozen."""

    @property
    @abc.abstractmethod
    def is_frozen(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """A snapshot of the accounting files (see CgroupStats for what each maps to)."""

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer ended in the group: ``stats().oom_kills``,
        from its one file (v1 memory.oom_control, v2 memory.events) instead of all 14."""
        return self.stats().oom_kills

    # -- the verbs both versions share ---------------------------------------------------
    def set(self, **limits: object) -> Limits:
        """Change limits on a live group, Docker-style: ``cg.set(memory="128m", pids=50)``.

        Everything is validated first; the kernel then applies each file on its own
        (lowering memory below what is in use makes the kernel reclaim or OOM-kill).
        """
        parsed = Limits.parse(**limits)
        check_supported(parsed)
        self.apply(parsed)
        return parsed

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group: write the pid to cgroup.procs.

        On v1 it is written in every hierarchy. pid 0 means the calling process.
        """
        for d in self.dirs():
            write(d / "cgroup.procs", pid)

    def join(self) -> None:
        """Move the calling process into the group (``add(0)``).

        Any write to cgroup.procs takes a kernel-wide lock whose first writer waits for
        an RCU grace period (a few timer ticks). cgroup v1 overrides this with a way
        around it.
        """
        self.add(0)

    def procs(self, recursive: bool = False) -> list[int]:
        """The pids in the group (from cgroup.procs; every hierarchy on v1).

        With recursive=True, the pids of nested groups too.
        """
        pids: set[int] = set()
        for d in self.dirs():
            for sub in _walk(d) if recursive else [d]:
                try:
                    pids.update(int(p) for p in read(sub / "cgroup.procs").split())
                except CgroupError as err:
                    if err.errno != errno.ENOENT:  # a nested group removed meanwhile
                        raise
        return sorted(pids)

    def signal(self, sig: int = SIGTERM) -> int:
        """Send a signal once to every process in the group and below; how many got it."""
        sent = 0
        for pid in self.procs(recursive=True):
            try:
                os.kill(pid, sig)
                sent += 1
            except ProcessLookupError:
                pass
        return sent

    def kill(self, sig: int = SIGKILL, timeout: float = 5.0) -> None:
        """Kill every process in the group and below.

        For SIGKILL, it repeats until the group is empty, because a process may fork
        between reading cgroup.procs and the signal arriving. v2 first writes
        cgroup.kill (Linux 5.14+), which the kernel does atomically. Other signals are
        sent once. Only a parent can reap its children: a process labkit started
        still needs waitpid() by whoever started it.
        """
        if sig != SIGKILL:
            self.signal(sig)
            return
        # A frozen process acts on no signal, SIGKILL included, until it is thawed (v1's
        # freezer; v2 lets fatal signals through): thaw first, as `docker rm -f` of a
        # paused container does, or the loop below waits out its timeout.
        with contextlib.suppress(LabkitError, OSError):
            if self.is_frozen:
                self.thaw(timeout)
        self._kill_all()
        if not poll.until(lambda: not (self.signal(SIGKILL) or self.procs(recursive=True)), timeout,
                          first=self.POLL_S):  # fmt: skip
            left = self.procs(recursive=True)
            raise StateError(f"cgroup {self.name} still holds {left} after {timeout} s of SIGKILL")

    def _kill_all(self) -> None:
        """The version's fast path for SIGKILL (v2 cgroup.kill); nothing by default."""
        return None  # the signal loop in kill() does the work

    def close(self, keep_parents: bool = False) -> None:
        """Kill what is left in the group, then remove it: what leaving ``with`` does."""
        if self._rmdir_each(keep_parents):
            return
        if self.exists():
            self.kill()
            self.remove(keep_parents=keep_parents)

    def remove(self, timeout: float = 5.0, keep_parents: bool = False) -> None:
        """Remove the group and its nested groups, children first.

        It kills nothing: it waits up to ``timeout`` seconds for the processes to
        leave (exit, or be moved), then rmdirs. A still-busy group raises StateError.
        Empty parents up to and including the ``labkit`` directory go too, unless
        ``keep_parents`` (the runtime keeps ``labkit/containers`` for the next container).
        """
        if self._rmdir_each(keep_parents):
            return
        deadline = time.monotonic() + timeout
        if not poll.until(lambda: not self.procs(recursive=True), timeout, first=self.POLL_S):
            left = self.procs(recursive=True)
            raise StateError(f"cannot remove cgroup {self.name}: processes {left} are still in it "
                             "(kill() them or wait for them to exit)")
        for d in self.dirs():
            for sub in reversed(list(_walk(d))):  # deepest first: rmdir needs no children
                _rmdir(sub, deadline)
            if not keep_parents:
                _prune_parents(d)

    def _rmdir_each(self, keep_parents: bool) -> bool:
        """The quick way out: one rmdir(2) per directory. The kernel refuses (EBUSY)
        while a process or a nested group is left, so it is safe to try first; False
        means something is left (the directories that went stay gone)."""
        for d in self.dirs():
            if not _try_rmdir(d):
                return False
        if not keep_parents:
            for d in self.dirs():
                _prune_parents(d)
        return True

    def watch(self, interval: float = 0.2, duration: float | None = None) -> Iterator[Sample]:
        """Samples of CPU %, memory and pids every ``interval`` s (see watch.py)."""
        return watch(self, interval=interval, duration=duration)


def _walk(d: Path) -> Iterator[Path]:
    """d, then every cgroup directory below it (parents before children)."""
    yield d
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))


def _rmdir(d: Path, deadline: float) -> None:
    # Right after the last process exits the kernel may still count it (v2 updates
    # "populated" asynchronously; v1 memory needs a moment), and rmdir says EBUSY.
    def removed() -> bool:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise CgroupError(err.errno or errno.EIO, str(d), "rmdir") from None
            return False
        return True

    if not poll.until(removed, max(0.0, deadline - time.monotonic()), first=Cgroup.POLL_S):
        raise CgroupError(errno.EBUSY, str(d), "rmdir")


def undo_mkdirs(made: list[Path]) -> None:
    """Remove the fresh, still empty leaves a failed create() made, and their parents."""
    for d in made:
        _try_rmdir(d)
        _prune_parents(d)


def _prune_parents(d: Path) -> None:
    """rmdir empty parents of d up to the ``labkit`` directory; stop at the first busy one."""
    here = d.parent
    for _ in range(10):  # names nest at most 8 deep, see check_name
        if here.name == paths.CGROUP_PARENT:
            _try_rmdir(here)
            return
        if paths.CGROUP_PARENT not in here.parts or not _try_rmdir(here):
            return
        here = here.parent


def _try_rmdir(d: Path) -> bool:
    try:
        os.rmdir(d)
        return True
    except FileNotFoundError:
        return True
    except OSError:  # EBUSY/ENOTEMPTY: another group or a process still uses it
        return False


# At the end: watch.py builds on Cgroup, which must exist before it is imported.
from .watch import Sample, watch  # noqa: E402
