"""Run something inside another process's namespaces, as nsenter(1) does.

``enter(pid, target)`` opens ``/proc/PID/ns/*`` first (once inside their mount
namespace, /proc/PID may mean something else), forks, and joins them with setns(2):
the user namespace first (it owns the others), the mount namespace late (after it,
paths resolve inside the new root), then takes the process's root and working
directory. A new PID or time namespace applies to children only: it forks once more.

Man pages: setns(2), nsenter(1).
Layer: kernel. Used by the notebooks and the tests (``labkit exec`` is runtime/execute.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Sequence

from labkit.errors import NotFound, require_root
from labkit.kernel import syscalls
from labkit.kernel.namespaces import child as child_
from labkit.kernel.namespaces.child import Completed, Process
from labkit.kernel.namespaces.kinds import Kind, kinds, namespaces_of

# nsenter's order: the user namespace first (it owns the others), mount late (after it,
# paths resolve inside the new root).
_ENTER_ORDER = [Kind.USER, Kind.CGROUP, Kind.IPC, Kind.UTS, Kind.NET, Kind.PID, Kind.MNT, Kind.TIME]


def _open_namespaces(pid: int, wanted: frozenset[Kind]) -> tuple[dict[Kind, int], int, int]:
    """Open /proc/PID/ns/* (and root, cwd with the mount namespace). If the process ends
    meanwhile, close what was opened and say so in one line."""
    opened: list[int] = []

    def get(path: str) -> int:
        opened.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return opened[-1]

    try:
        fds = {k: get(f"/proc/{pid}/ns/{k.value}") for k in wanted}
        root_fd = get(f"/proc/{pid}/root") if Kind.MNT in wanted else -1
        cwd_fd = get(f"/proc/{pid}/cwd") if Kind.MNT in wanted else -1
    except OSError:
        for fd in opened:
            os.close(fd)
        raise NotFound(f"process {pid} ended before its namespaces could be entered") from None
    return fds, root_fd, cwd_fd


def enter(
    pid: int,
    target: Sequence[str] | Callable[[], object],
    kinds_: Iterable[str | Kind] | None = None,
    *,
    timeout: float | None = 30,
    env: dict[str, str] | None = None,
) -> Completed:
    """Run ``target`` inside the namespaces of process ``pid``, like ``nsenter -t PID``.

    ``kinds_`` defaults to every kind in which ``pid`` differs from us. With the mount
    namespace the process also takes ``pid``'s root and working directory.
    """
    require_root("entering another process's namespaces")
    theirs, ours = namespaces_of(pid), namespaces_of()
    wanted = kinds(kinds_) if kinds_ is not None else frozenset(k for k in theirs if theirs[k] != ours.get(k))
    if Kind.USER in wanted and theirs.get(Kind.USER) == ours.get(Kind.USER):
        wanted = wanted - {Kind.USER}  # joining one's own user namespace is EINVAL
    argv = [] if callable(target) else [os.fspath(a) for a in target]

    def start(inp: int, out: int, err: int, res: int) -> Process:
        # Open every namespace file first: once we are in their mount namespace,
        # /proc/PID may mean something else.
        fds, root_fd, cwd_fd = _open_namespaces(pid, wanted)
        rd, wr = os.pipe2(os.O_CLOEXEC)
        child = syscalls.fork()
        if child == 0:
            os.close(rd)
            try:
                syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, signal.SIGKILL)
                for k in _ENTER_ORDER:
                    if k in fds:
                        syscalls.setns(fds[k], k.flag)
                if Kind.USER in fds:  # like nsenter: be root of the namespace we joined
                    os.setresgid(0, 0, 0)
                    os.setresuid(0, 0, 0)
                if root_fd >= 0:
                    os.fchdir(root_fd)
                    os.chroot(".")
                    os.fchdir(cwd_fd)
                if Kind.PID in wanted or Kind.TIME in wanted:
                    child_.fork_into_pid_namespace(wr, signal.SIGKILL)
                child_.exec_target(wr, target, argv, env, [inp, out, err], res)
            except BaseException as e:  # noqa: BLE001
                child_.report(wr, e)
                os._exit(127)
            os._exit(0)
        os.close(wr)
        for fd in [*fds.values(), root_fd, cwd_fd]:
            if fd >= 0:
                os.close(fd)
        return child_.await_child(child, rd)

    return child_.collect(start, timeout)
