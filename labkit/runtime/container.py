"""A container's lifecycle: create, start, wait, kill, stop, pause, resume, delete.

These are runc's verbs (and youki's: one function per verb, each checking the status
table first, status.py). What each one does to the kernel:

- ``create``: check the spec, make the state directory, the cgroup and exec.fifo, then
  start the shim and init (shim.py); init sets up and blocks on exec.fifo (handshake.py).
- ``start``: open exec.fifo for reading: init's open returns and it execs the command.
- ``kill``: kill(2) on init; ``stop``: SIGTERM, then SIGKILL after a grace period.
- ``pause``/``resume``: the freezer cgroup freezes or thaws every process at once.
- ``delete``: remove the cgroup and the directories, never following a link or a mount.

If labkit (or the shim) is SIGKILLed, what is left is: processes in labkit's cgroups,
directories under the state roots, and no mounts on the host (the rootfs overlay lives
only in the container's mount namespace). ``labkit cleanup`` removes all of those.

Layer: runtime. Used by the CLI (labkit run / runtime), the engine and the notebooks.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from labkit import paths, poll
from labkit.errors import AlreadyExists, InvalidValue, LabkitError, NotFound, StateError, Unsupported
from labkit.kernel import cgroups, proc, safe
from labkit.runtime import handshake, shim, timing
from labkit.runtime.spec import Spec
from labkit.runtime.state import State, all_ids, container_dir, data_dir, locked, update
from labkit.runtime.status import Status, allows, check
from labkit.runtime.stdio import Stdio

__all__ = ["Stdio", "create", "start", "run", "wait", "wait_exit", "exit_fifo", "wait_shim", "kill", "stop", "pause",
           "resume", "delete", "load", "list_states", "spec_of", "log_path", "ids", "cgroup_name", "POSTSTOP"]  # fmt: skip

# Called with the container's id once its directories are gone (at delete, and when a
# create fails): the engine releases the container's network here. The in-process form
# of OCI's poststop hooks, which runc runs as programs; a list the layers above fill in.
POSTSTOP: list[Callable[[str], None]] = []
START_TIMEOUT = 10.0  # seconds `start` waits for init to reach the fifo
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _valid_id(container_id: str) -> str:
    # the id names a cgroup and two directories: keep it to what all three accept
    if not _ID.fullmatch(container_id):
        raise InvalidValue("container id", container_id, "1-64 letters, digits, '_' or '-', e.g. web1")
    return container_id


def cgroup_name(container_id: str) -> str:
    # Every container's group sits in one shared parent, which stays when a container
    # goes (as Docker's own parent does). `labkit cleanup` removes it.
    return f"containers/{container_id}"


# -- create / start -----------------------------------------------------------------------


def create(
    container_id: str,
    spec: Spec,
    *,
    bundle: str | os.PathLike = "",
    name: str = "",
    image: str = "",
    stdio: Stdio | None = None,
    detach: bool = True,
    console: str | None = None,
    pty_master: int | None = None,
    auto_remove: bool = False,
    monitor_here: bool = False,
) -> State:
    """Make the container and leave its init blocked before exec (status ``created``).

    ``stdio`` defaults to /dev/null in and the container's log file out (``logs()``).
    With ``detach=False`` the shim stays the caller's child; ``wait_shim()`` reaps it.
    With ``monitor_here=True`` (foreground, no terminal) there is no shim: this process
    is init's parent, and ``wait_shim()`` waits for init and records its exit.
    Every check runs before anything is created; on failure everything made is removed.
    """
    if monitor_here and (detach or pty_master is not None):
        raise InvalidValue("monitor_here", True, "only for a foreground container without a terminal")
    _valid_id(container_id)
    spec.validate()
    bundle = os.path.abspath(bundle or data_dir(container_id))
    root = str(spec.rootfs_path(bundle))
    if not spec.layers and not os.path.isdir(root):
        raise NotFound(f"root filesystem {root!r} does not exist (root.path in config.json)")
    run_dir, lib_dir = container_dir(container_id), data_dir(container_id)
    if run_dir.exists():
        raise AlreadyExists(f"container id {container_id!r} is already in use")
    if spec.limits is not None:
        cgroups.check_supported(spec.limits)
    run_dir.mkdir(parents=True, mode=0o711)
    made_cgroup = None
    try:
        lib_dir.mkdir(parents=True, exist_ok=True)
        if spec.layers:  # the overlay's mount point, and its two writable dirs
            for d in (root, spec.upper, spec.work):
                os.makedirs(d, exist_ok=True)
            if "user" in spec.namespaces:  # the container's root writes them: it owns them
                for d in (spec.upper, spec.work):
                    os.chown(d, *spec.root_ids())
            for i in range(len(spec.layers) if spec.idmap_layers else 0):  # where init attaches them
                os.makedirs(run_dir / "lower" / str(i))
        os.mkfifo(run_dir / "exec.fifo", 0o622)
        if "user" in spec.namespaces:  # init opens it as the container's root
            os.chown(run_dir / "exec.fifo", *spec.root_ids())
        state = State(container_id, name or container_id[:12], Status.CREATING, bundle, created=time.time(),
                      image=image, command=tuple(spec.args), cgroup=cgroup_name(container_id),
                      detached=detach, auto_remove=auto_remove)  # fmt: skip
        state.save()
        timing.mark("cgroup")
        made_cgroup = _cgroup_for(container_id, spec)
        options = {"detach": detach, "console": console, "pty_master": pty_master, "monitor_here": monitor_here,
                   "remove": delete}  # fmt: skip
        if stdio is not None:
            return shim.launch(state, spec, root, made_cgroup, stdio, **options)
        log = os.open(log_path(container_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return shim.launch(state, spec, root, made_cgroup, Stdio(null, log, log), **options)
        finally:
            os.close(log)
            os.close(null)
    except BaseException:
        _remove_dirs(container_id, made_cgroup)
        raise


def start(container_id: str) -> State:
    """Let a created container's init exec its command (open exec.fifo, read one byte)."""
    state = load(container_id)
    check("start", container_id, state.status)
    fifo = container_dir(container_id) / "exec.fifo"
    if not handshake.release(str(fifo), START_TIMEOUT, lambda: load(container_id).status is Status.STOPPED):
        raise StateError(f"container {container_id[:12]} did not start: its init is gone")
    fifo.unlink(missing_ok=True)
    try:
        return update(container_id, lambda s: s.replace(status=Status.RUNNING, started=time.time())
                      if allows("start", s.status) else s)  # fmt: skip
    except NotFound:  # it ran, ended and was removed (--rm) before we could note the start
        return state.replace(status=Status.STOPPED)


def run(container_id: str, spec: Spec, **create_args) -> int:
    """create + start + wait, in the foreground: the command's exit code."""
    state = create(container_id, spec, detach=False, **create_args)
    start(container_id)
    return wait_shim(state.id)


def wait_shim(container_id: str, timeout: float | None = None) -> int:
    """For a container created with detach=False: reap its shim, return the exit code."""
    if container_id in shim.MONITORED:  # monitor_here: no shim, we wait for init ourselves
        return shim.monitor(container_id)
    return proc.exit_code(shim.wait_child(_recorded(container_id).shim_pid, timeout))


def wait_exit(container_id: str, timeout: float | None = None, listening: Callable[[], None] | None = None) -> int:
    """Wait for the container's exit code, even when --rm removes the container the
    moment it exits (what ``docker wait`` and the Engine API's wait need): it comes
    through an exit fifo (``exit_fifo``). ``listening()`` is called once the fifo is
    there: from then on no exit is missed."""
    with exit_fifo(container_id) as fd:  # NotFound: the container went before we came
        if listening is not None:
            listening()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = load(container_id)  # NotFound: it is gone, and no code came (removed by rm)
            if state.status is Status.STOPPED and state.exit_code is not None:
                return state.exit_code
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise StateError(f"container {container_id[:12]} still {state.status.value} after {timeout} s")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 64).strip()
                if data.isdigit():
                    return int(data)
                time.sleep(0.05)  # a writer came and went without a word: the fifo stays readable


@contextlib.contextmanager
def exit_fifo(container_id: str) -> Iterator[int]:
    """A fifo of our own in the container's state directory, open for reading: the shim
    writes the exit code into every such fifo (shim.tell_waiters) before a --rm
    container's directories go, so the fd becomes readable at the exit, whatever comes
    after it. NotFound if the container is gone already."""
    waiters = container_dir(container_id) / "waiters"
    fifo = waiters / f"{os.getpid()}-{secrets.token_hex(4)}"
    with locked(container_id):
        waiters.mkdir(exist_ok=True)
        os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader now: the shim's write finds us
    try:
        yield fd
    finally:
        os.close(fd)
        with contextlib.suppress(NotFound), locked(container_id):
            fifo.unlink(missing_ok=True)


def wait(container_id: str, timeout: float | None = None) -> int:
    """Wait until the container has stopped and its exit code is recorded (any process)."""
    last = [load(container_id)]

    def stopped() -> bool:
        # ask about the shim before reading the state: if it was gone first, the state
        # read after it holds everything the shim will ever write
        shim_alive = proc.alive(last[0].shim_pid)
        last[0] = state = load(container_id)
        return state.status is Status.STOPPED and (state.exit_code is not None or not shim_alive)

    if not poll.until(stopped, timeout, first=0.002):
        raise StateError(f"container {container_id[:12]} still {last[0].status.value} after {timeout} s")
    code = last[0].exit_code
    return code if code is not None else 255


# -- signals, freezing --------------------------------------------------------------------


def kill(container_id: str, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the container's init (PID 1 ignores signals it has no handler for)."""
    state = load(container_id)
    check("kill", container_id, state.status)
    try:
        os.kill(state.pid, sig)
    except ProcessLookupError:  # it exited after load() looked
        raise StateError(f"cannot kill container {container_id[:12]}: it is stopped") from None
    if state.status is Status.PAUSED and sig == signal.SIGKILL:
        resume(container_id)  # a frozen task only dies once thawed


def stop(container_id: str, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """docker stop: ``sig`` (the image's StopSignal; SIGTERM by default), then SIGKILL
    after ``timeout`` seconds; the exit code."""
    state = load(container_id)
    check("stop", container_id, state.status)
    if state.status is Status.STOPPED:
        return wait(container_id, 5.0)
    if state.status is not Status.PAUSED:  # a frozen process cannot act on SIGTERM
        shim.kill_quietly(state.pid, sig)
        try:
            return wait(container_id, timeout)
        except StateError:
            pass
    kill(container_id, signal.SIGKILL)
    return wait(container_id, 10.0)


def pause(container_id: str) -> State:
    """Freeze every process of the container (freezer cgroup)."""
    state = load(container_id)
    check("pause", container_id, state.status)
    cgroups.open(state.cgroup).freeze()
    return update(container_id, lambda s: s.replace(status=Status.PAUSED) if allows("pause", s.status) else s)


def resume(container_id: str) -> State:
    """Thaw a paused container."""
    state = load(container_id)
    check("resume", container_id, state.status)
    cgroups.open(state.cgroup).thaw()
    return update(container_id, lambda s: s.replace(status=Status.RUNNING) if allows("resume", s.status) else s)


# -- delete -------------------------------------------------------------------------------


def delete(container_id: str, force: bool = False) -> None:
    """Remove a stopped (or, with ``force``, any) container and everything it made."""
    state = load(container_id)
    try:
        _delete(state, force)
    except NotFound:
        if not force:
            raise
        # the shim of a --rm container removed it meanwhile: what was asked for is done


def _delete(state: State, force: bool) -> None:
    container_id = state.id
    if force and container_id in shim.MONITORED:  # we are its monitor (interrupted): reap it here
        if state.status is Status.PAUSED:
            resume(container_id)
        shim.kill_quietly(state.pid, signal.SIGKILL)
        shim.monitor(container_id)
        state = load(container_id)
    if force and state.status is not Status.STOPPED:
        if state.status is Status.PAUSED:
            resume(container_id)
        shim.kill_quietly(state.pid, signal.SIGKILL)
        wait(container_id, 10.0)
        state = load(container_id)
    check("delete", container_id, state.status)
    if state.status is Status.CREATED:
        shim.kill_quietly(state.pid, signal.SIGKILL)
        wait(container_id, 10.0)
    # let the shim finish recording the exit before the dir goes (unless we are the shim,
    # removing a --rm container)
    if state.shim_pid != os.getpid():
        poll.until(lambda: not proc.alive(state.shim_pid), 5.0, first=0.005, most=0.005)
    try:
        cg = cgroups.open(state.cgroup)
    except LabkitError:
        cg = None
    _remove_dirs(container_id, cg)


def _cgroup_for(container_id: str, spec: Spec):
    """The container's cgroup; rootless, where none may be made, a NoCgroup (and limits
    are refused in one line)."""
    if cgroups.may_create():
        return cgroups.create(cgroup_name(container_id), limits=spec.limits)
    if spec.limits is not None:
        raise Unsupported("resource limits (-m, --cpus, --pids-limit ...) are not available rootless here: "
                          + ("cgroup v1 is never delegated to a user" if cgroups.version() == 1 else
                             "no cgroup v2 subtree is delegated to you (systemd: Delegate=yes)"))  # fmt: skip
    return cgroups.NoCgroup()


def _remove_dirs(container_id: str, cg) -> None:
    """Undo create: the cgroup, then the two directories, never following a link or mount."""
    if cg is not None:
        cg.close(keep_parents=True)
    with contextlib.suppress(NotFound), locked(container_id):  # no state.json written meanwhile
        safe.remove_tree(container_dir(container_id), within=paths.run_root())
    if data_dir(container_id).exists():
        safe.remove_tree(data_dir(container_id), within=paths.lib_root())
    for hook in POSTSTOP:
        hook(container_id)


# -- state --------------------------------------------------------------------------------


def load(container_id: str) -> State:
    """The container's state, checked against the kernel (see State.refresh)."""
    return _recorded(container_id).refresh()


def _recorded(container_id: str) -> State:
    """state.json as written, without asking the kernel (for fields that never change)."""
    try:
        return State.load(container_id)
    except FileNotFoundError:
        raise NotFound(f"no such container: {container_id}") from None


def list_states() -> list[State]:
    out = []
    for cid in all_ids():
        try:
            out.append(load(cid))
        except (NotFound, ValueError, KeyError):
            continue  # removed meanwhile, or half-written by a crash
    return sorted(out, key=lambda s: s.created)


def spec_of(container_id: str) -> Spec:
    return Spec.load(data_dir(container_id))


def log_path(container_id: str) -> Path:
    return data_dir(container_id) / "container.log"


def ids() -> list[str]:
    return all_ids()
