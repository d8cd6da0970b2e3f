"""Named network namespaces: a network stack of its own that outlives any process.

A network namespace lives as long as something refers to it: a process inside, an open
fd of its ``/proc/PID/ns/net`` file, or a bind mount of that file. ``ip netns add NAME``
keeps one alive by the third: unshare(CLONE_NEWNET), then bind-mount
``/proc/self/ns/net`` onto ``/run/netns/NAME``. labkit does the same with two changes:

- the bind mount lives under labkit's run directory (``paths.netns_dir()``, i.e.
  ``/run/labkit/netns/labkit-NAME``), so it is labkit's live state, moves with
  ``LABKIT_ROOT`` and goes with the other mounts below the state root;
- ``/run/netns/labkit-NAME`` is a symlink to it, so ``ip netns list`` shows it and
  ``ip netns exec labkit-NAME ...`` works (iproute2 opens the path, following the link).

Entering: ``ns.fd`` is an open fd of the namespace, usable with setns(2)
(``labkit.kernel.syscalls.setns(ns.fd, CLONE_NEWNET)``). setns of a network namespace
changes only the calling *thread*, so ``ns.call(fn)`` runs ``fn`` in a short-lived
thread that has joined the namespace: a socket made there belongs to that namespace for
good, even when used from another thread later (this is how links.py talks netlink to
a namespace, without forking).

Man pages: network_namespaces(7), ip-netns(8), setns(2), unshare(2).
Layer: kernel. Used by links.py and nat.py, the engine (one per container), cleanup,
notebook 08 and the tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from labkit import paths
from labkit.errors import AlreadyExists, InvalidValue, NotFound, require_root
from labkit.kernel import mounts, syscalls
from labkit.kernel.syscalls import CloneFlags

T = TypeVar("T")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,47}")


def check_name(name: object) -> str:
    """A namespace name labkit may make: ``labkit-`` and then up to 48 of [a-z0-9_.-]."""
    accepted = f"'{paths.NETNS_PREFIX}' then 1-48 of a-z 0-9 _ . - (e.g. {paths.NETNS_PREFIX}c1)"
    if not isinstance(name, str) or not name.startswith(paths.NETNS_PREFIX):
        raise InvalidValue("network namespace name", name, accepted)
    if not NAME_RE.fullmatch(name[len(paths.NETNS_PREFIX):]):
        raise InvalidValue("network namespace name", name, accepted)
    return name


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a short-lived thread of its own; return its result or raise its
    exception. unshare(CLONE_NEWNET) and setns(2) of a network namespace move only the
    calling thread, so the caller's thread never changes namespace."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    t = threading.Thread(target=body, name="labkit-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def call_in(fd: int, fn: Callable[[], T]) -> T:
    """Run ``fn()`` inside the network namespace ``fd`` (in a thread of its own)."""

    def inside() -> T:
        syscalls.setns(fd, CloneFlags.CLONE_NEWNET)
        return fn()

    return in_thread(inside)


class NetNS:
    """A named network namespace. ``NetNS.create(name)`` makes one, ``NetNS.open(name)``
    finds one; both hold an fd (``.fd``) until ``close()``. ``remove()`` deletes the
    name (the namespace dies once no process or fd still refers to it).

    As a context manager, a namespace made by ``create`` is removed on exit; one found by
    ``open`` is only closed.
    """

    def __init__(self, name: str, fd: int, owned: bool) -> None:
        self.name = name
        self.path = paths.netns_dir() / name
        self.fd = fd
        self._owned = owned

    # -- making and finding -------------------------------------------------------------
    @classmethod
    def create(cls, name: str) -> NetNS:
        """``ip netns add NAME``, kept under labkit's run directory (see the module)."""
        check_name(name)
        require_root("creating a network namespace")
        path = paths.netns_dir() / name
        ip_link = paths.IP_NETNS_DIR / name
        if path.exists() or ip_link.is_symlink() or ip_link.exists():
            raise AlreadyExists(f"network namespace {name!r} exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))  # the mount point
        try:
            def new_stack() -> None:
                syscalls.unshare(CloneFlags.CLONE_NEWNET)  # only this thread moves
                mounts.bind("/proc/thread-self/ns/net", path, recursive=False)

            # ip netns add also makes /run/netns a shared mount, so that a later delete
            # reaches copies in mount namespaces made meanwhile. labkit does not: its
            # containers pivot_root and detach the host's tree, dropping their copies.
            in_thread(new_stack)
            paths.IP_NETNS_DIR.mkdir(parents=True, exist_ok=True)
            os.symlink(path, ip_link)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            _remove_paths(path, ip_link)
            raise
        return cls(name, fd, owned=True)

    @classmethod
    def open(cls, name: str) -> NetNS:
        """An existing labkit namespace, by name (made by this or another labkit root)."""
        check_name(name)
        for path in (paths.netns_dir() / name, paths.IP_NETNS_DIR / name):
            try:
                return cls(name, os.open(path, os.O_RDONLY | os.O_CLOEXEC), owned=False)
            except FileNotFoundError:
                continue
        raise NotFound(f"no network namespace {name!r} (labkit's are listed by network.namespaces())")

    # -- using ---------------------------------------------------------------------------
    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` inside this namespace (in a thread of its own) and return its result."""
        return call_in(self.fd, fn)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """``ip netns delete NAME``: drop the fd, the symlink and the bind mount."""
        self.close()
        _remove_paths(paths.netns_dir() / self.name, paths.IP_NETNS_DIR / self.name)

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self.remove()
        else:
            self.close()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r}, fd={self.fd})"


def _remove_paths(path: os.PathLike, ip_link: os.PathLike) -> None:
    """Undo create(): each step tolerates what is already gone (a cleanup may have run,
    or another process may be removing the same namespace right now: a --rm container's
    shim releasing its network while a new container's labkit sweeps stale leases)."""
    try:
        if os.readlink(ip_link) == os.fspath(path):  # only our own symlink
            os.unlink(ip_link)
    except OSError:
        pass
    if os.path.exists(path):
        try:
            mounts.unmount(path, lazy=True)  # lazy: a process inside keeps it until it exits
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more), or gone
                raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def namespaces() -> list[str]:
    """Names of labkit's network namespaces: under this run root, and in /run/netns."""
    found = set()
    for d in (paths.netns_dir(), paths.IP_NETNS_DIR):
        if d.is_dir():
            found.update(n for n in os.listdir(d) if n.startswith(paths.NETNS_PREFIX))
    return sorted(found)


def remove_all(prefix: str = paths.NETNS_PREFIX) -> list[str]:
    """Remove every namespace whose name starts with ``prefix`` (cleanup's step); return
    one line for each. In /run/netns an entry is labkit's symlink or a real bind mount
    (``ip netns add labkit-x`` by hand): an nsfs mount behind it is unmounted, and the
    entry is unlinked; never a file that is not labkit's own."""
    done = set()
    for d in (paths.IP_NETNS_DIR, paths.netns_dir()):
        if not d.is_dir():
            continue
        for name in sorted(os.listdir(d)):
            if not name.startswith(prefix):
                continue
            entry = d / name
            for m in mounts.mounts_below(entry):  # follows the symlink to the bind mount
                if m.fstype == "nsfs":
                    mounts.unmount(m.mountpoint, lazy=True)
            try:
                os.unlink(entry)
            except FileNotFoundError:
                pass
            done.add(f"removed network namespace {name}")
    return sorted(done)
