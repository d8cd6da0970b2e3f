"""The container's monitor: fork init, hand it to the caller, wait for it, record its exit.

Three processes make one running container, as with Docker's containerd-shim and runc:

    caller (labkit run, or your notebook)
      `-- shim     a small monitor, in the host's namespaces; its child is born in a new PID one
            `-- init   PID 1 of the container: init.py, then the user's command

``launch`` forks the shim; the shim forks init as PID 1 of a new PID namespace
(syscalls.fork_as_pid1) and they go through the handshake (handshake.py has the
picture). On cgroup v2 the shim puts init into the container's cgroup while init sets
up; on v1 init moves itself, which is far cheaper (V1Cgroup.join).

The shim is there so the exit code is never lost. It waits for init with waitpid(2),
which only a parent can do, writes the exit status into state.json, then removes the
cgroup. For a detached container it is "double-forked": the caller forks a child that
calls setsid(2) and forks the shim, then exits at once; the caller reaps that child, and
the orphaned shim is adopted by PID 1 (or by labkitd, a child subreaper). So the caller
may exit (``labkit run -d`` returns), or a notebook kernel may run for hours, without
zombies, and ``labkit ps`` still learns the exit code from state.json. A container in
the foreground skips the double fork: the caller waits for the shim itself.

``labkit run`` in the foreground (without -t) and ``labkit runtime run`` go one step
further, as ``runc run`` does: the labkit process lives exactly as long as the container,
so it is the monitor itself (``monitor_here=True``): init is its child, and one fork and
the shim's exit are saved. init gets PR_SET_PDEATHSIG, so it does not outlive a monitor
that is killed. A notebook never does this: its kernel lives on after the container.

Layer: runtime. Used by container.py (create, wait_shim, delete).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator

from labkit import poll
from labkit.errors import ExecFailed, LabkitError, StateError
from labkit.kernel import proc, syscalls
from labkit.runtime import handshake, timing
from labkit.runtime.spec import NAMESPACES, Spec
from labkit.runtime.state import State, container_dir, data_dir, update
from labkit.runtime.status import Status, allows
from labkit.runtime.stdio import Stdio, close_quietly, set_stdio

CREATE_TIMEOUT = 30.0  # seconds create waits for init's "created"

# init's pid, cgroup and start time, for each container this process is the monitor of
MONITORED: dict[str, tuple[int, object, int]] = {}


def launch(state: State, spec: Spec, root: str, cg, stdio: Stdio, *, detach: bool, console: str | None,
           pty_master: int | None, monitor_here: bool, remove: Callable[[str], None]) -> State:  # fmt: skip
    """Start the shim (or be it) and init; return the state once init says "created".

    ``remove`` deletes the container: a detached shim calls it for ``--rm`` once init is gone.
    """
    sync_r, sync_w = os.pipe()
    go_r, go_w = os.pipe()
    if monitor_here:  # we are the shim: init is our own child
        first = _fork_init(state, spec, root, cg, stdio, (sync_w, go_r, go_w), console, None, inline=True)
        MONITORED[state.id] = (first, cg, proc.start_time(first))
        # no "pid" line: we know the pid, and init may say "created" before we could write it
        _hand_over(first, spec, cg, sync_w, go_w)
    else:
        timing.mark("shim")
        first = syscalls.fork()
        if first == 0:  # the shim (or, when detached, the child that forks it and leaves)
            try:
                os.close(sync_r)
                if detach:
                    os.setsid()  # no controlling terminal: closing the caller's does not kill it
                    if syscalls.fork() != 0:
                        os._exit(0)
                _shim(state, spec, root, cg, stdio, (sync_w, go_r, go_w), console, pty_master, detach, remove)
            finally:
                os._exit(1)
        os.close(sync_w)
        os.close(go_r)
        os.close(go_w)
    # config.json is for later (`labkit exec`, `inspect`); nothing in the container reads
    # it, so it is written while the shim and init start.
    unsaved = None
    try:
        spec.save(data_dir(state.id))
    except OSError as err:  # (disk full) reported below, once init has answered
        unsaved = err
    if detach:
        os.waitpid(first, 0)  # the double fork's middle child exits at once
    pid, shim_pid = (first, os.getpid()) if monitor_here else (0, 0 if detach else first)
    message = ""
    try:
        # On v1 init waits for nobody, so its "created" may come before the shim's "pid"
        # line: read until both are here (or the pipe closes).
        for line in handshake.lines(sync_r, time.monotonic() + CREATE_TIMEOUT):
            word, _, rest = line.partition(" ")
            if word == "pid":
                pid, shim_pid = (int(x) for x in rest.split())
            elif word in ("created", "error") and not message:
                message = rest if word == "error" else word
            if message and pid:
                break
    finally:
        os.close(sync_r)
    if message == "created" and pid and unsaved is None:
        return update(state.id, lambda s: s.replace(status=Status.CREATED, pid=pid, pid_start=proc.start_time(pid),
                                                    shim_pid=shim_pid) if allows("create", s.status) else s)  # fmt: skip
    # init failed (or never answered, or config.json is missing): it has exited or is
    # killed now; the shim cleans up
    if pid:
        kill_quietly(pid, signal.SIGKILL)
    if monitor_here:
        monitor(state.id)
    elif not detach:
        os.waitpid(first, 0)
    elif shim_pid:  # let the orphaned shim finish writing before create's caller removes the dirs
        poll.until(lambda: not proc.alive(shim_pid), 5.0, first=0.005, most=0.005)
    if unsaved is not None:
        raise unsaved
    code, _, text = message.partition(" ")
    if code.isdigit():
        raise ExecFailed(text, int(code))
    raise StateError(f"container {state.id[:12]} did not start: init {'gave no answer' if not message else message}")


def _shim(state: State, spec: Spec, root: str, cg, stdio: Stdio, pipes: tuple[int, int, int],
          console: str | None, pty_master: int | None, detach: bool, remove: Callable[[str], None]) -> None:  # fmt: skip
    """The monitor: fork init into a new PID namespace, wait for it, record the exit."""
    sync_w, go_r, go_w = pipes
    with open("/proc/self/comm", "w") as comm:  # what prctl(PR_SET_NAME) sets: `ps` shows it
        comm.write("labkit-shim")
    try:
        pid = _fork_init(state, spec, root, cg, stdio, pipes, console, pty_master, inline=False)
    except LabkitError as err:  # (no init: e.g. the system allows no user namespace)
        handshake.send(sync_w, f"error 1 {err.one_line()}")
        os._exit(1)
    # A foreground shim shares the terminal's process group with `labkit run`, so Ctrl-C
    # or a closed terminal signals it too; the default action would end the monitor and
    # lose the exit code. The caller forwards those signals to init; the shim stays.
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    MONITORED[state.id] = (pid, cg, proc.start_time(pid))
    handshake.send(sync_w, f"pid {pid} {os.getpid()}")
    _hand_over(pid, spec, cg, sync_w, go_w)
    for fd in (stdio.stdin, stdio.stdout, stdio.stderr):
        if fd > 2 and (pty_master is None or fd != pty_master):
            close_quietly(fd)
    if detach:  # nothing of the caller's terminal may keep the shim attached
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    if pty_master is not None and detach:
        _pump_to_log(pty_master, data_dir(state.id) / "container.log")
    elif pty_master is not None:
        os.close(pty_master)  # in the foreground the caller relays the terminal
    code = monitor(state.id)
    if detach and state.auto_remove:
        try:
            remove(state.id)
        except LabkitError:
            pass
    os._exit(code)


def _fork_init(state: State, spec: Spec, root: str, cg, stdio: Stdio, pipes: tuple[int, int, int],
               console: str | None, pty_master: int | None, inline: bool) -> int:  # fmt: skip
    """Fork init, in a new PID namespace if the spec asks; in the parent, its pid."""
    sync_w, go_r, go_w = pipes
    self_join = _joins_itself(spec, cg)
    # paths now: born in a user namespace, init is nobody until its maps are written, and
    # for nobody paths.py would pick a rootless state root
    fifo = str(container_dir(state.id) / "exec.fifo")
    dirs = {"": str(cg.path)} if cg.version == 2 else {c: str(p) for c, p in cg.paths.items()}
    timing.mark("namespaces")  # a new PID namespace is made by this fork
    program, lowers = None, []
    if "user" in spec.namespaces:  # a user namespace too: both made by one clone(2)
        if spec.seccomp is not None:  # init, root of nothing on the host, cannot reach the cache
            from labkit.kernel import seccomp_cache

            program = seccomp_cache.program(spec.seccomp)
        if spec.idmap_layers:
            lowers = _idmapped_layers(spec)
        pid = -1
        try:
            with _joined(spec.namespace_paths):
                pid = syscalls.fork_into_user_namespace(pid_namespace="pid" in spec.namespaces)
        finally:
            for fd in lowers if pid != 0 else ():  # (only init needs them, to attach them)
                os.close(fd)
    else:
        pid = syscalls.fork_as_pid1() if "pid" in spec.namespaces else syscalls.fork()
    if pid == 0:  # init: PID 1 in the new namespace
        os.close(go_w)
        if inline:  # its monitor is the labkit process: do not outlive it
            syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, signal.SIGKILL)
        if pty_master is not None:
            os.close(pty_master)
        if state.detached and console is None:
            # A session of its own, inside its PID namespace, as runc's init has: the
            # shim's session lies outside it, and criu checkpoints only a process tree
            # that holds its session leader (checkpoint.py). With a terminal, set_stdio
            # makes the session.
            os.setsid()
        set_stdio(stdio, console is not None)
        # init's modules load here, in the child, while the shim moves it into its cgroup:
        # instead of in the parent before the fork, where `labkit run` would wait for them
        # (tests/test_runtime.py: test_runtime_run_loads_only_what_it_needs)
        from labkit.runtime import init

        if self_join:
            os.close(go_r)
        init.main(init.Context(spec, root, fifo, sync_w, -1 if self_join else go_r, dirs, console,
                               join_cgroup=cg.join if self_join else None, seccomp_filter=program,
                               lower_fds=lowers))  # fmt: skip
    os.close(go_r)
    return pid


def _idmapped_layers(spec: Spec) -> list[int]:
    """The image's layers as idmapped mounts, not attached anywhere yet (kernel/idmap.py):
    fds init inherits and attaches in its own mount namespace."""
    from labkit.kernel import idmap  # (only here: only --userns=auto needs it)

    holder = idmap.map_holder(spec.uid_map, spec.gid_map)
    fds: list[int] = []
    try:
        for layer in spec.layers:
            fds.append(idmap.idmapped_tree(layer, holder))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(holder)
    return fds


@contextlib.contextmanager
def _joined(paths: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Be in the namespaces ``paths`` names (a bridge's network, say) while init is cloned.

    init is born in its own user namespace, where it has no right over a namespace the
    host's user namespace owns: it could not setns(2) into one. So we, root on the host,
    step into each for the moment of the clone (the child is born in them), then back."""
    own, parent = [], os.getpid()
    try:
        for ns_type, path in paths:
            kind = NAMESPACES[ns_type]
            own.append((kind, os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                syscalls.setns(fd)
            finally:
                os.close(fd)
        yield
    finally:
        for _kind, fd in reversed(own):
            if os.getpid() == parent:  # (the clone returns here in the child too: it stays)
                syscalls.setns(fd)
            os.close(fd)


def _joins_itself(spec: Spec, cg) -> bool:
    """Who moves init into the cgroup. On v1 init moves itself (V1Cgroup.join, cheap); on
    v2 a first move waits for an RCU grace period, so the parent does it while init sets
    up. In a new user namespace init may not write the host's cgroup files: the parent."""
    return cg.version == 1 and "user" not in spec.namespaces


def _hand_over(pid: int, spec: Spec, cg, sync_w: int, go_w: int) -> None:
    """Give init what only its parent can: the id maps of its new user namespace, and
    (v2, or any user namespace) its cgroup; then say go. v1's init has moved itself."""
    try:
        if "user" in spec.namespaces:
            # (only here: most containers have no user namespace, and start without this module)
            from labkit.kernel.namespaces.unshare import write_id_maps

            write_id_maps(pid, spec.uid_map, spec.gid_map, allow_setgroups=True, helpers=os.geteuid() != 0)
        if not _joins_itself(spec, cg):
            cg.add(pid)
            handshake.say_go(go_w)
    except (LabkitError, OSError) as err:
        line = err.one_line() if isinstance(err, LabkitError) else f"{type(err).__name__}: {err}"
        handshake.send(sync_w, f"error 1 {line}")
        os.kill(pid, signal.SIGKILL)
    os.close(go_w)
    os.close(sync_w)


def monitor(container_id: str) -> int:
    """Wait for init (our child), then record its exit: code, OOM kill, cgroup gone."""
    pid, cg, started = MONITORED[container_id]
    status = wait_child(pid)  # (if Ctrl-C interrupts this, delete(force=True) comes back here)
    timing.mark("teardown")
    del MONITORED[container_id]
    code = proc.exit_code(status)
    oom = False
    try:
        oom = bool(cg.oom_kills())
        # Usually the group is empty now (PID 1's exit killed its namespace) and this is
        # one rmdir per directory; anything left (e.g. no PID namespace) dies with PID 1.
        cg.close(keep_parents=True)
    except LabkitError:
        pass
    update(container_id, lambda s: s.replace(status=Status.STOPPED, exit_code=code, finished=time.time(),
                                             oom_killed=oom, pid_start=started))  # fmt: skip
    tell_waiters(container_id, code)
    return code


def tell_waiters(container_id: str, code: int) -> None:
    """Write the exit code into every waiter's fifo (``container.exit_fifo``), before a
    --rm container's directories, state.json included, are removed."""
    waiters = container_dir(container_id) / "waiters"
    try:
        names = os.listdir(waiters)
    except FileNotFoundError:
        return
    for name in names:
        try:
            fd = os.open(waiters / name, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: its reader left
        except OSError:
            continue
        try:
            os.write(fd, f"{code}\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)


def wait_child(pid: int, timeout: float | None = None) -> int:
    """waitpid(2) for our child ``pid``, at most ``timeout`` seconds; its wait status."""
    if timeout is None:
        return os.waitpid(pid, 0)[1]
    statuses = []

    def reaped() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses.append(status)
        return bool(done)

    if not poll.until(reaped, timeout, first=0.01, most=0.01):
        raise StateError(f"process {pid} still runs after {timeout} s")
    return statuses[0]


def _pump_to_log(master: int, log_path) -> None:
    """Detached with a terminal: copy what the pty shows into the log until it closes."""
    with open(log_path, "ab", buffering=0) as log:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave fd is closed
                break
            if not data:
                break
            log.write(data)
    os.close(master)


def kill_quietly(pid: int, sig: int) -> None:
    try:
        if pid:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
