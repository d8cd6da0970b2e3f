"""The kinds of namespace, and which namespaces a process is in.

Every process has one namespace of each kind; ``/proc/PID/ns/KIND`` names it, and two
processes share a namespace exactly when those files have the same inode.

- ``Kind``: the eight kinds, each with its CLONE_NEW* flag.
- ``namespaces_of(pid)`` and ``compare(a, b)``: which namespaces a process is in.

Man pages: namespaces(7). Layer: kernel. Used by the rest of this package, the
notebooks and the tests.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass

from labkit.errors import InvalidValue, NotFound
from labkit.kernel.syscalls import CloneFlags


class Kind(enum.Enum):
    """The kinds of namespace; the value is the file name in /proc/PID/ns."""

    UTS = "uts"  # hostname and domain name
    IPC = "ipc"  # System V IPC objects, POSIX message queues
    PID = "pid"  # process ids: the first process inside is PID 1
    MNT = "mnt"  # the mount table
    NET = "net"  # interfaces, addresses, routes, ports, firewall
    USER = "user"  # user and group ids, and the capabilities that go with them
    CGROUP = "cgroup"  # the root of the cgroup tree a process sees
    TIME = "time"  # the boot-time and monotonic clocks' offsets

    @property
    def flag(self) -> CloneFlags:
        return _FLAGS[self]

    @classmethod
    def parse(cls, value: str | Kind) -> Kind:
        if isinstance(value, Kind):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise InvalidValue("namespace kind", value, f"one of {names}") from None


_FLAGS = {
    Kind.UTS: CloneFlags.CLONE_NEWUTS,
    Kind.IPC: CloneFlags.CLONE_NEWIPC,
    Kind.PID: CloneFlags.CLONE_NEWPID,
    Kind.MNT: CloneFlags.CLONE_NEWNS,
    Kind.NET: CloneFlags.CLONE_NEWNET,
    Kind.USER: CloneFlags.CLONE_NEWUSER,
    Kind.CGROUP: CloneFlags.CLONE_NEWCGROUP,
    Kind.TIME: CloneFlags.CLONE_NEWTIME,
}


def kinds(values: Iterable[str | Kind]) -> frozenset[Kind]:
    """A set of Kinds from names or Kinds: ``kinds({"uts", "pid"})``."""
    if isinstance(values, (str, Kind)):
        values = [values]
    return frozenset(Kind.parse(v) for v in values)


def namespaces_of(pid: int | str = "self") -> dict[Kind, int]:
    """The inode number of each of ``pid``'s namespaces (kinds this kernel lacks are left out)."""
    result = {}
    for kind in Kind:
        try:
            result[kind] = os.stat(f"/proc/{pid}/ns/{kind.value}").st_ino
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise NotFound(f"no process with pid {pid}") from None
    return result


@dataclass(frozen=True)
class Comparison:
    """Which namespaces two processes share and which they each have on their own."""

    shared: frozenset[Kind]
    separate: frozenset[Kind]

    def __str__(self) -> str:
        s = " ".join(sorted(k.value for k in self.shared)) or "-"
        d = " ".join(sorted(k.value for k in self.separate)) or "-"
        return f"shared: {s}; separate: {d}"


def compare(pid_a: int | str, pid_b: int | str = "self") -> Comparison:
    a, b = namespaces_of(pid_a), namespaces_of(pid_b)
    common = a.keys() & b.keys()
    return Comparison(
        shared=frozenset(k for k in common if a[k] == b[k]),
        separate=frozenset(k for k in common if a[k] != b[k]),
    )
