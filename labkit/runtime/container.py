"""A container's lifecycle: create, start, wait, kill, pause, resume, delete.

Three processes make one running container, as with Docker's containerd-shim and runc:

    caller (labkit run, or your notebook)
      `-- shim     a small monitor, in the host's namespaces; its child is born in a new PID one
            `-- init   PID 1 of the container: init.py, then the user's command

``create`` forks the shim; the shim forks init as PID 1 of a new PID namespace
(syscalls.fork_as_pid1). On cgroup v2 the shim then puts init into the container's
cgroup and tells it so, while init sets everything up (init.py) and waits for that
word; on v1 init moves itself, which is far cheaper (V1Cgroup.join). Init reports
"created" on a pipe and blocks opening ``exec.fifo`` for writing. ``start`` opens the fifo for
reading: init's open returns and it execs the command. Until then nothing of the user's
code has run (runc does the same).

The shim is there so the exit code is never lost. It waits for init with waitpid(2),
which only a parent can do, and writes the exit status into state.json, then removes the
cgroup. For a detached container it is "double-forked": the caller forks a child that
calls setsid(2) and forks the shim, then exits at once; the caller reaps that child, and
the orphaned shim is adopted by PID 1. So the caller may exit (``labkit run -d`` returns),
or a notebook kernel may run for hours, without zombies, and ``labkit ps`` still learns
the exit code from state.json. A container in the foreground skips the double fork: the
caller waits for the shim itself.

``labkit run`` in the foreground (without -t) and ``labkit runtime run`` go one step
further, as ``runc run`` does: the labkit process lives exactly as long as the container,
so it is the monitor itself (``monitor_here=True``): init is its child, and one fork of
a Python process (~1 ms) and the shim's exit are saved. init gets PR_SET_PDEATHSIG, so
it does not outlive a monitor that is killed. A notebook never does this: its kernel
lives on after the container, and a detached container always has a shim.

If labkit (or the shim) is SIGKILLed, what is left is: processes in labkit's cgroups,
directories under the state roots, and no mounts on the host (the rootfs overlay lives
only in the container's mount namespace). ``labkit cleanup`` removes all of those.

Layer: runtime. Used by the CLI (labkit run / runtime) and the notebooks.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import AlreadyExists, ExecFailed, InvalidValue, LabkitError, NotFound, StateError
from labkit.kernel import syscalls
from labkit.runtime.spec import Spec
from labkit.runtime.state import State, Status, all_ids, check, container_dir, data_dir, start_time

START_TIMEOUT = 10.0  # seconds `start` waits for init to reach the fifo
CREATE_TIMEOUT = 30.0  # seconds `create` waits for init's "created"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # compiled once, at import, not per container


@dataclass(frozen=True)
class Stdio:
    """The container's fds 0, 1 and 2 (already open in the caller)."""

    stdin: int
    stdout: int
    stderr: int


def _valid_id(container_id: str) -> str:
    # the id names a cgroup and two directories: keep it to what all three accept
    if not _ID.fullmatch(container_id):
        raise InvalidValue("container id", container_id, "1-64 letters, digits, '_' or '-', e.g. web1")
    return container_id


def cgroup_name(container_id: str) -> str:
    # Every container's group sits in one shared parent, which stays when a container
    # goes (as Docker's own parent does): that saves two mkdir and two rmdir per
    # hierarchy per container. `labkit cleanup` removes it.
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
    from labkit.kernel import cgroups

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
        cgroups._check_supported(spec.limits)
    run_dir.mkdir(parents=True, mode=0o711)
    made_cgroup = None
    try:
        lib_dir.mkdir(parents=True, exist_ok=True)
        if spec.layers:  # the overlay's mount point, and its two writable dirs
            for d in (root, spec.upper, spec.work):
                os.makedirs(d, exist_ok=True)
        os.mkfifo(run_dir / "exec.fifo", 0o622)
        state = State(container_id, name or container_id[:12], Status.CREATING, bundle, created=time.time(),
                      image=image, command=tuple(spec.args), cgroup=cgroup_name(container_id),
                      detached=detach, auto_remove=auto_remove)  # fmt: skip
        state.save()
        made_cgroup = cgroups.create(cgroup_name(container_id), limits=spec.limits)
        if stdio is None:
            log = os.open(lib_dir / "container.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stdio = Stdio(null, log, log)
            try:
                return _fork_container(state, spec, root, made_cgroup, stdio, detach, console, pty_master,
                                       monitor_here)  # fmt: skip
            finally:
                os.close(log)
                os.close(null)
        return _fork_container(state, spec, root, made_cgroup, stdio, detach, console, pty_master, monitor_here)
    except BaseException:
        _remove_dirs(container_id, made_cgroup)
        raise


def _fork_container(state, spec, root, cg, stdio, detach, console, pty_master, monitor_here) -> State:
    sync_r, sync_w = os.pipe()
    go_r, go_w = os.pipe()
    if monitor_here:  # we are the shim: init is our own child
        first = _fork_init(state, spec, root, cg, stdio, (sync_w, go_r, go_w), console, None, inline=True)
        _MONITORED[state.id] = (first, cg, start_time(first))
        _send(sync_w, f"pid {first} {os.getpid()}")
        _move_into_cgroup(first, cg, sync_w, go_w)
    else:
        first = syscalls.fork()
        if first == 0:  # the shim (or, when detached, the child that forks it and leaves)
            try:
                os.close(sync_r)
                if detach:
                    os.setsid()  # no controlling terminal: closing the caller's does not kill it
                    if syscalls.fork() != 0:
                        os._exit(0)
                _shim(state, spec, root, cg, stdio, (sync_w, go_r, go_w), console, pty_master, detach)
            finally:
                os._exit(1)
        os.close(sync_w)
        os.close(go_r)
        os.close(go_w)
    # config.json is for later (`labkit exec`, `inspect`); nothing in the container reads
    # it, so it is written while the shim and init start: ~0.4 ms off the way to "created".
    unsaved = None
    try:
        spec.save(data_dir(state.id))
    except OSError as err:  # (disk full) reported below, once init has answered
        unsaved = err
    if detach:
        os.waitpid(first, 0)  # the double fork's middle child exits at once
    shim_pid = 0 if detach else first
    pid, message = 0, ""
    try:
        for line in _lines(sync_r, time.monotonic() + CREATE_TIMEOUT):
            word, _, rest = line.partition(" ")
            if word == "pid":
                pid, shim_pid = (int(x) for x in rest.split())
            elif word in ("created", "error"):
                message = rest if word == "error" else word
                break
    finally:
        os.close(sync_r)
    if message == "created" and unsaved is None:
        return _update(state.id, lambda s: s.replace(status=Status.CREATED, pid=pid, pid_start=start_time(pid),
                                                     shim_pid=shim_pid) if s.status == Status.CREATING else s)  # fmt: skip
    # init failed (or never answered, or config.json is missing): it has exited or is
    # killed now; the shim cleans up
    if pid:
        _kill_quietly(pid, signal.SIGKILL)
    if monitor_here:
        _monitor(state.id)
    elif not detach:
        os.waitpid(first, 0)
    else:  # let the orphaned shim finish writing before create's caller removes the dirs
        deadline = time.monotonic() + 5.0
        while shim_pid and _shim_alive(state.replace(shim_pid=shim_pid)) and time.monotonic() < deadline:
            time.sleep(0.005)
    if unsaved is not None:
        raise unsaved
    code, _, text = message.partition(" ")
    if code.isdigit():
        raise ExecFailed(text, int(code))
    raise StateError(f"container {state.id[:12]} did not start: init {'gave no answer' if not message else message}")


def _shim(state: State, spec: Spec, root: str, cg, stdio: Stdio, pipes: tuple[int, int, int],
          console: str | None, pty_master: int | None, detach: bool) -> None:  # fmt: skip
    """The monitor: fork init into a new PID namespace, wait for it, record the exit."""

    sync_w, go_r, go_w = pipes
    with open("/proc/self/comm", "w") as comm:  # what prctl(PR_SET_NAME) sets: `ps` shows it
        comm.write("labkit-shim")
    pid = _fork_init(state, spec, root, cg, stdio, pipes, console, pty_master, inline=False)
    # A foreground shim shares the terminal's process group with `labkit run`, so Ctrl-C
    # or a closed terminal signals it too; the default action would end the monitor and
    # lose the exit code. The caller forwards those signals to init; the shim stays.
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _MONITORED[state.id] = (pid, cg, start_time(pid))
    _send(sync_w, f"pid {pid} {os.getpid()}")
    _move_into_cgroup(pid, cg, sync_w, go_w)
    for fd in (stdio.stdin, stdio.stdout, stdio.stderr):
        if fd > 2 and (pty_master is None or fd != pty_master):
            _close_quietly(fd)
    if detach:  # nothing of the caller's terminal may keep the shim attached
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    if pty_master is not None and detach:
        _pump_to_log(pty_master, state.id)
    elif pty_master is not None:
        os.close(pty_master)  # in the foreground the caller relays the terminal
    code = _monitor(state.id)
    if detach and state.auto_remove:
        try:
            delete(state.id)
        except LabkitError:
            pass
    os._exit(code)


# init's pid, cgroup and start time, for each container this process is the monitor of
_MONITORED: dict[str, tuple] = {}


def _fork_init(state: State, spec: Spec, root: str, cg, stdio: Stdio, pipes: tuple[int, int, int],
               console: str | None, pty_master: int | None, inline: bool) -> int:  # fmt: skip
    """Fork init, in a new PID namespace if the spec asks; in the parent, its pid."""
    sync_w, go_r, go_w = pipes
    # Who moves init into the cgroup. On v1 init moves itself (V1Cgroup.join, ~0.1 ms);
    # on v2 a move takes ~10 ms, so the parent does it while init sets up.
    self_join = cg.version == 1
    pid = syscalls.fork_as_pid1() if "pid" in spec.namespaces else syscalls.fork()
    if pid == 0:  # init: PID 1 in the new namespace
        os.close(go_w)
        if inline:  # its monitor is the labkit process: do not outlive it
            syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, signal.SIGKILL)
        if pty_master is not None:
            os.close(pty_master)
        _set_stdio(stdio, console is not None)
        from labkit.runtime import init

        dirs = {"": str(cg.path)} if cg.version == 2 else {c: str(p) for c, p in cg.paths.items()}
        fifo = str(container_dir(state.id) / "exec.fifo")
        if self_join:
            os.close(go_r)
        init.main(init.Context(spec, root, fifo, sync_w, -1 if self_join else go_r, dirs, console,
                               join_cgroup=cg.join if self_join else None))  # fmt: skip
    os.close(go_r)
    return pid


def _move_into_cgroup(pid: int, cg, sync_w: int, go_w: int) -> None:
    """(v2) Move init into its cgroup and tell it so; v1's init has moved itself."""
    try:
        # The first move into a v2 cgroup waits for an RCU grace period (~10 ms):
        # init sets up its namespaces and mounts in the meantime and waits for the
        # "go" byte only before it reports "created".
        if cg.version != 1:
            cg.add(pid)
            os.write(go_w, b"g")
    except LabkitError as err:
        _send(sync_w, f"error 1 {err.one_line()}")
        os.kill(pid, signal.SIGKILL)
    os.close(go_w)
    os.close(sync_w)


def _monitor(container_id: str) -> int:
    """Wait for init (our child), then record its exit: code, OOM kill, cgroup gone."""
    pid, cg, started = _MONITORED[container_id]
    status = _wait_child(pid)  # (if Ctrl-C interrupts this, delete(force=True) comes back here)
    del _MONITORED[container_id]
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
    oom = False
    try:
        oom = bool(cg.oom_kills())
        # Usually the group is empty now (PID 1's exit killed its namespace) and this is
        # one rmdir per directory; anything left (e.g. no PID namespace) dies with PID 1.
        cg.close(keep_parents=True)
    except LabkitError:
        pass
    _update(container_id, lambda s: s.replace(status=Status.STOPPED, exit_code=code, finished=time.time(),
                                              oom_killed=oom, pid_start=started))  # fmt: skip
    return code


def start(container_id: str) -> State:
    """Let a created container's init exec its command (open exec.fifo, read one byte)."""
    state = load(container_id)
    check("start", container_id, state.status)
    fifo_path = container_dir(container_id) / "exec.fifo"
    fd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(100):
            if time.monotonic() > deadline or load(container_id).status == Status.STOPPED:
                raise StateError(f"container {container_id[:12]} did not start: its init is gone")
        os.read(fd, 1)
    finally:
        os.close(fd)
    fifo_path.unlink(missing_ok=True)
    return _update(container_id, lambda s: s.replace(status=Status.RUNNING, started=time.time())
                   if s.status == Status.CREATED else s)  # fmt: skip


def run(container_id: str, spec: Spec, **create_args) -> int:
    """create + start + wait, in the foreground: the command's exit code."""
    state = create(container_id, spec, detach=False, **create_args)
    start(container_id)
    return wait_shim(state.id)


def wait_shim(container_id: str, timeout: float | None = None) -> int:
    """For a container created with detach=False: reap its shim, return the exit code."""
    if container_id in _MONITORED:  # monitor_here: no shim, we wait for init ourselves
        return _monitor(container_id)
    shim = _recorded(container_id).shim_pid
    status = _wait_child(shim, timeout)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def wait(container_id: str, timeout: float | None = None) -> int:
    """Wait until the container has stopped and its exit code is recorded (any process)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.002
    state = load(container_id)
    while True:
        # ask about the shim before reading the state: if it was gone first, the state
        # read after it holds everything the shim will ever write
        shim_alive = _shim_alive(state)
        state = load(container_id)
        if state.status == Status.STOPPED and (state.exit_code is not None or not shim_alive):
            return state.exit_code if state.exit_code is not None else 255
        if deadline is not None and time.monotonic() > deadline:
            raise StateError(f"container {container_id[:12]} still {state.status.value} after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# -- signals, freezing --------------------------------------------------------------------


def kill(container_id: str, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the container's init (PID 1 ignores signals it has no handler for)."""
    state = load(container_id)
    check("kill", container_id, state.status)
    try:
        os.kill(state.pid, sig)
    except ProcessLookupError:  # it exited after load() looked
        raise StateError(f"cannot kill container {container_id[:12]}: it is stopped") from None
    if state.status == Status.PAUSED and sig == signal.SIGKILL:
        resume(container_id)  # a frozen task only dies once thawed


def stop(container_id: str, timeout: float = 10.0) -> int:
    """docker stop: SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code."""
    state = load(container_id)
    if state.status == Status.STOPPED:
        return wait(container_id, 5.0)
    if state.status != Status.PAUSED:
        _kill_quietly(state.pid, signal.SIGTERM)
        try:
            return wait(container_id, timeout)
        except StateError:
            pass
    kill(container_id, signal.SIGKILL)
    return wait(container_id, 10.0)


def pause(container_id: str) -> State:
    """Freeze every process of the container (freezer cgroup)."""
    from labkit.kernel import cgroups

    state = load(container_id)
    check("pause", container_id, state.status)
    cgroups.open(state.cgroup).freeze()
    return _update(container_id, lambda s: s.replace(status=Status.PAUSED))


def resume(container_id: str) -> State:
    from labkit.kernel import cgroups

    state = load(container_id)
    check("resume", container_id, state.status)
    cgroups.open(state.cgroup).thaw()
    return _update(container_id, lambda s: s.replace(status=Status.RUNNING) if s.status != Status.STOPPED else s)


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
    if force and container_id in _MONITORED:  # we are its monitor (interrupted): reap it here
        if state.status == Status.PAUSED:
            resume(container_id)
        _kill_quietly(state.pid, signal.SIGKILL)
        _monitor(container_id)
        state = load(container_id)
    if force and state.status != Status.STOPPED:
        if state.status == Status.PAUSED:
            resume(container_id)
        _kill_quietly(state.pid, signal.SIGKILL)
        wait(container_id, 10.0)
        state = load(container_id)
    check("delete", container_id, state.status)
    if state.status == Status.CREATED:
        _kill_quietly(state.pid, signal.SIGKILL)
        wait(container_id, 10.0)
    deadline = time.monotonic() + 5.0
    # let the shim finish recording the exit before the dir goes (unless we are the shim,
    # removing a --rm container)
    while state.shim_pid != os.getpid() and _shim_alive(state) and time.monotonic() < deadline:
        time.sleep(0.005)
    from labkit.kernel import cgroups

    try:
        cg = cgroups.open(state.cgroup)
    except LabkitError:
        cg = None
    _remove_dirs(container_id, cg)


def _remove_dirs(container_id: str, cg) -> None:
    """Undo create: the cgroup, then the two directories, never following a link or mount."""
    from labkit.engine import safe

    if cg is not None:
        cg.close(keep_parents=True)
    for d, within in ((container_dir(container_id), paths.run_root()), (data_dir(container_id), paths.lib_root())):
        if d.exists():
            safe.remove_tree(d, within=within)


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


def _update(container_id: str, change) -> State:
    """Read-modify-write state.json under flock(2) on the container's directory, so the
    caller and the shim never overwrite each other's change."""
    fd = os.open(container_dir(container_id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        new = change(State.load(container_id))
        new.save()
    finally:
        os.close(fd)
    return new


# -- small helpers ------------------------------------------------------------------------


def _set_stdio(stdio: Stdio, terminal: bool) -> None:
    fds = (stdio.stdin, stdio.stdout, stdio.stderr)
    safe = [os.dup(fd) for fd in fds]  # dup first: stdio.stdout may be fd 0, and so on
    for target, fd in enumerate(safe):
        os.dup2(fd, target)  # dup2 makes the copy inheritable: execve keeps 0, 1, 2
        os.close(fd)
    if terminal:
        import termios

        os.setsid()  # a new session, so the pty can become its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _pump_to_log(master: int, container_id: str) -> None:
    """Detached with a terminal: copy what the pty shows into the log until it closes."""
    with open(log_path(container_id), "ab", buffering=0) as log:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave fd is closed
                break
            if not data:
                break
            log.write(data)
    os.close(master)


def _wait_child(pid: int, timeout: float | None = None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if deadline is None:
                return os.waitpid(pid, 0)[1]
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            if time.monotonic() > deadline:
                raise StateError(f"process {pid} still runs after {timeout} s")
            time.sleep(0.01)
        except InterruptedError:
            continue


def _shim_alive(state: State) -> bool:
    if not state.shim_pid:
        return False
    try:
        with open(f"/proc/{state.shim_pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        if pid:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _lines(fd: int, deadline: float):
    """The lines written on pipe ``fd`` until EOF or ``deadline`` (time.monotonic()).

    Raw reads, each after select(2): a buffered file could hold a line already read
    from the pipe while select, which only sees the pipe, waits for more."""
    pending = b""
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        *done, pending = (pending + chunk).split(b"\n")
        yield from (line.decode(errors="replace").strip() for line in done)


def _send(fd: int, line: str) -> None:
    """One line on the sync pipe to create()'s caller; one that stopped listening is no error."""
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass


def ids() -> list[str]:
    return all_ids()
