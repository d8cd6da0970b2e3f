"""Scratch namespaces for check cells: run a student's function where a mistake cannot
reach the machine, and report what it left behind for its caller.

A student's exercise code runs as root. Some plausible mistakes change the host itself:
``make_private("/")`` *before* ``unshare(CLONE_NEWNS)`` turns the caller's shared ``/``
private (in the course VM systemd's ``/`` is shared, so every later lesson would see
it); ``sethostname`` before ``unshare(CLONE_NEWUTS)`` renames the machine. The checks of
those exercises do not run the function in a plain fork of the notebook. They fork a
*caller* first, give it namespaces of its own, set them up the way a host looks
(mount_namespaces(7), "SHARED SUBTREES": a tree of shared mounts, like systemd's), and
only then let the caller fork the child that runs the student's function. Whatever the
child does to its caller happens in the scratch namespaces, which die with the caller.

``read_only_host`` is for exercises that write through a directory (05's merged
overlay): a path that starts with ``/`` makes ``root / "/etc/motd"`` the host's own
``/etc/motd``. The function runs in a mount namespace of its own in which ``/`` is
read-only, so such a write fails with EROFS and the check can say where it went.

Layer: lab. Uses labkit.kernel (namespaces, mounts, syscalls); called by check cells.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labkit.kernel import mounts, namespaces, syscalls
from labkit.kernel.syscalls import CloneFlags, MountFlags


@dataclass(frozen=True)
class Outcome:
    """What the student's function did, seen from its scratch caller."""

    value: Any  # what the function returned (None when it raised)
    error: str  # the last line of its traceback, "" when it returned
    before: str  # the caller's state before (propagation of /, or the hostname)
    after: str  # the same, after the function's child exited
    leaked: bool  # did a mount of the child's show up in the caller's table?

    def result(self) -> Any:
        """The function's return value; re-raise in one line what it raised (a stub's
        NotImplementedError stays one, so the check says "not done yet")."""
        if self.error.startswith("NotImplementedError"):
            raise NotImplementedError(self.error.partition(": ")[2])
        if self.error:
            raise AssertionError(f"in the child: {self.error}")
        return self.value


def _child_result(done: namespaces.Completed) -> tuple[Any, str]:
    if done.returncode == 0:
        return done.value, ""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return None, lines[-1] if lines else f"the child exited with status {done.returncode}"


def _root_propagation() -> str:
    return next(m.propagation for m in mounts.mountinfo() if m.mountpoint == "/")


def mount_caller(func: Callable[[os.PathLike], Any], target: os.PathLike) -> Outcome:
    """Run ``func(target)`` in a plain fork of a scratch caller whose mounts are all
    *shared*, as systemd leaves a host; report the caller's ``/`` before and after, and
    whether ``target`` became a mount point in the caller's namespace.

    ``target`` must be an existing directory. Nothing here touches the real host's mount
    table: the caller unshares first and cuts its copy off (private) before it makes its
    tree shared again, in peer groups of its own."""

    def caller() -> Outcome:
        syscalls.unshare(CloneFlags.CLONE_NEWNS)
        mounts.make_private("/")  # cut off from the host: nothing below reaches it
        syscalls.mount(None, "/", None, MountFlags.MS_REC | MountFlags.MS_SHARED)  # a host-like tree
        before = _root_propagation()
        value, error = _child_result(namespaces.run(lambda: func(target), timeout=20))
        return Outcome(value, error, before, _root_propagation(), mounts.is_mountpoint(target))

    done = namespaces.run(caller, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"the scratch namespace could not be set up: {_child_result(done)[1]}")
    return done.value


def uts_caller(func: Callable[[], Any], hostname: str = "scratch-host") -> tuple[Outcome, dict]:
    """Run ``func()`` in a plain fork of a caller that has a UTS namespace of its own,
    named ``hostname``; report the caller's hostname before and after, and the caller's
    namespaces (to compare with what the function returned)."""

    def caller() -> tuple[Outcome, dict]:
        mine = namespaces.namespaces_of("self")
        before = socket.gethostname()
        value, error = _child_result(namespaces.run(func, timeout=20))
        return Outcome(value, error, before, socket.gethostname(), False), mine

    done = namespaces.run(caller, new={"uts"}, hostname=hostname, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"the scratch namespace could not be set up: {_child_result(done)[1]}")
    return done.value


def read_only_host(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` in a child whose ``/`` is a read-only copy of the host's: a write
    that misses its directory and lands on the root filesystem fails with EROFS instead
    of changing the host. Other mounts (an overlay's merged directory, /tmp on tmpfs)
    stay writable. Returns what ``func`` returned; re-raises in one line what it raised."""

    def child() -> Any:
        mounts.make_private("/")  # our remount below must not propagate to the host
        syscalls.mount(None, "/", None, MountFlags.MS_REMOUNT | MountFlags.MS_BIND | MountFlags.MS_RDONLY)
        return func(*args)

    done = namespaces.run(child, new={"mnt"}, timeout=30)
    value, error = _child_result(done)
    if error.startswith("NotImplementedError"):
        raise NotImplementedError(error.partition(": ")[2])
    if "Read-only file system" in error:
        raise AssertionError(f"it wrote outside the directory it was given, onto the host's root filesystem: {error}")
    if error:
        raise AssertionError(f"in the child: {error}")
    return value
