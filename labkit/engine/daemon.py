"""labkitd: labkit's dockerd, a warm process that runs container commands for the CLI.

Why Docker has a daemon, measured: a Python ``labkit run`` spends ~50 ms loading
modules before it touches the kernel, more than a whole ``runc run``. labkitd loads
them once, then serves each command from a fresh fork(2) of itself:

    labkit run ... (client.py)          labkitd (this module)
      connect to labkitd.sock  ------->  accept(); fork() a worker
      send argv, cwd, environ,           worker: take the client's fds as 0, 1, 2,
        and fds 0, 1, 2 (SCM_RIGHTS)       chdir, environ, run the command
      <------- "pid N" ... "exit N"      (the CLI's dispatcher, exactly as in-process)

The fork is the whole trick, the one Android's zygote plays for every app: the child
starts with every module imported and every parser built, and copy-on-write makes that
nearly free. labkitd even forks the next worker before it is needed. What the command
does is unchanged, so its output and exit code are the ones the in-process path gives;
tests run both. The wire protocol is protocol.py.

labkitd is also a child subreaper (PR_SET_CHILD_SUBREAPER, like containerd): the shims
of detached containers, orphaned on purpose, become its children and it reaps them.
It serves only root callers (the socket is 0600 and SO_PEERCRED is checked) and only
callers in its own namespaces (otherwise paths and networks would mean something else).
When labkit's files change on disk it exits within a second (the CLI then runs
in-process; systemd, or ``labkit daemon start``, brings up a fresh one).

labkitd does not know the CLI: ``serve(dispatch=...)`` gets the function that runs one
command (labkit/cli/daemon.py hands in the CLI's dispatcher), as dockerd gets its API
routes registered from outside.

Layer: engine. Speed tricks (preloading, gc.freeze, a spare worker) are at home here.
"""

from __future__ import annotations

import contextlib
import gc
import grp
import importlib
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from labkit import paths, poll
from labkit.engine import protocol
from labkit.errors import NotFound, StateError
from labkit.kernel import cgroups, proc, syscalls

Dispatch = Callable[[list[str]], int]  # runs one command's argv here; its exit code

PROCESS_NAME = "labkitd"
WORKER_NAME = "labkit"
NAMESPACES = ("mnt", "net", "pid", "uts", "ipc", "user", "cgroup")
STALE_CHECK_INTERVAL = 1.0  # seconds between looks at labkit's files (a shared folder is slow)
# what labkitd imports once, for all its workers: everything below the CLI that the served
# commands use (the CLI's own modules are loaded by the warm_up it hands to serve())
PRELOAD = (
    "labkit.runtime.container", "labkit.runtime.init", "labkit.runtime.execute", "labkit.runtime.tty",
    "labkit.engine.images", "labkit.engine.rootfs", "labkit.engine.layers", "labkit.kernel.safe",
    "labkit.engine.reference",  # image names: every run and create parses one (~8 ms to load in a worker)
    "labkit.kernel.cgroups", "labkit.kernel.cgroups.v1", "labkit.kernel.cgroups.v2", "labkit.kernel.overlay",
    "labkit.kernel.namespaces", "labkit.kernel.security", "labkit.kernel.mounts", "json", "argparse",
    # the default network: endpoints, pyroute2's IPRoute (slow to import), libnftables' wrapper
    "labkit.engine.endpoints", "labkit.engine.networks", "labkit.kernel.network", "pyroute2.iproute.linux",
    "labkit.kernel.seccomp", "labkit.kernel.seccomp_cache",  # the binding only on a cache miss
)  # fmt: skip


def socket_path() -> Path:
    return paths.daemon_socket()


def pid_path() -> Path:
    return paths.run_root() / "labkitd.pid"


def log_path() -> Path:
    return paths.run_root() / "labkitd.log"


# -- the daemon ---------------------------------------------------------------------------


def serve(dispatch: Dispatch, warm_up: Callable[[], None] | None = None, ready_fd: int = -1,
          api: Api | None = None) -> None:
    """Run labkitd in this process until SIGTERM or SIGINT (``labkit daemon run``).

    ``dispatch(argv)`` runs one command in a worker and returns its exit code;
    ``warm_up()`` runs once, before the first fork, to load what it needs. ``ready_fd``,
    if given, gets one byte once the socket accepts connections.

    One worker is always forked ahead, a "spare" blocked in accept(2): a request finds
    its process made and set up already. When the spare takes a connection it says so
    on a pipe, and labkitd forks the next one. Once a second labkitd looks at its own
    files: if they changed, it stops (see the module's docstring).
    """
    _set_name(PROCESS_NAME)
    stamp = code_stamp()
    _preload(warm_up)
    listener = _listen(socket_path())
    pid_path().write_text(f"{os.getpid()}\n")
    syscalls.prctl(syscalls.Prctl.PR_SET_CHILD_SUBREAPER, 1)
    took_r, took_w = os.pipe()  # the spare writes "t" here once it has a connection
    state = {"spare": 0, "stopping": False}

    def stop(_sig, _frame):
        state["stopping"] = True
        os.write(took_w, b"s")  # wake select() below

    def reap(_sig, _frame):
        for pid in _reap():
            if pid == state["spare"]:  # the spare died without taking a connection
                state["spare"] = 0

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, reap)
    gc.freeze()  # the preloaded objects never change: keep the GC off their pages in the workers
    api_listener = _listen(api_socket_path(), group=API_GROUP) if api is not None else None
    if ready_fd >= 0:
        os.write(ready_fd, b"r")
        os.close(ready_fd)
    last_check = time.monotonic()
    try:
        while not state["stopping"]:
            if not state["spare"]:
                state["spare"] = _fork_spare(listener, took_w, dispatch)
            ready = select.select([took_r] + ([api_listener] if api_listener else []), [], [], STALE_CHECK_INTERVAL)[0]
            if took_r in ready and b"t" in os.read(took_r, 64):
                state["spare"] = 0
            if api_listener in ready:
                _fork_api_worker(api_listener, api, [listener.fileno(), took_r, took_w])
            if time.monotonic() - last_check >= STALE_CHECK_INTERVAL:
                last_check = time.monotonic()
                if code_stamp() != stamp:
                    print("labkitd: labkit's files changed on disk: stopping", flush=True)
                    break
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if state["spare"]:  # it waits in accept(): SIGTERM ends it; wait, so that stop() means gone
            _kill_quietly(state["spare"])
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state["spare"], 0)
        listener.close()
        if api_listener is not None:
            api_listener.close()
        if _is_ours():
            socket_path().unlink(missing_ok=True)
            api_socket_path().unlink(missing_ok=True)
            pid_path().unlink(missing_ok=True)


def _fork_spare(listener: socket.socket, took_w: int, dispatch: Dispatch) -> int:
    """Fork the next worker; it waits in accept() and tells labkitd once it has a caller."""
    daemon = os.getpid()
    pid = syscalls.fork()
    if pid:
        return pid
    try:
        # a spare dies with labkitd (a worker, once it has a caller, finishes its work)
        syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != daemon:  # labkitd died before that took effect
            os._exit(0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, as in-process
        syscalls.prctl(syscalls.Prctl.PR_SET_CHILD_SUBREAPER, 0)
        _set_name(WORKER_NAME)
        log = os.dup(2)  # labkitd's log: fd 2 becomes the caller's stderr
        conn, _ = listener.accept()
        syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, 0)
        os.write(took_w, b"t")
        os.close(took_w)
        listener.close()
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        os._exit(1)
    _worker(conn, log, dispatch)  # never returns


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _preload(warm_up: Callable[[], None] | None) -> None:
    """Import, build and warm up now what every worker would otherwise do first."""
    for name in PRELOAD:
        importlib.import_module(name)
    if warm_up is not None:
        warm_up()
    with contextlib.suppress(Exception):
        cgroups.available_controllers()  # finds and caches the hierarchies (mountinfo)


def _listen(path: Path, group: str = "") -> socket.socket:
    """Bind the socket under a temporary name, make it 0600 (0660 for ``group``, if that
    group exists), then rename it into place: a client never sees a socket that is not
    ready or that anyone may use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    gid = _group_id(group)
    if gid is not None:
        os.chown(tmp, 0, gid)
    os.chmod(tmp, 0o600 if gid is None else 0o660)
    listener.listen(64)
    os.replace(tmp, path)
    return listener


def _is_ours() -> bool:
    """The pid file names us (a newer labkitd may have replaced the files meanwhile)."""
    try:
        return int(pid_path().read_text()) == os.getpid()
    except (OSError, ValueError):
        return False


def _reap() -> list[int]:
    """Collect every child that has ended (workers, and shims orphaned to us); their pids."""
    done = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append(pid)


# -- the Engine API: one worker per connection ---------------------------------------------
API_GROUP = "labkit"  # like the docker group: its members may use the API (root always may)
Api = Callable[[socket.socket, Callable[[str], None]], None]  # answers one connection


def api_socket_path() -> Path:
    return paths.api_socket()


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid if name else None
    except KeyError:
        return None


def _fork_api_worker(api_listener: socket.socket, api: Api, close: list[int]) -> None:
    """Accept one API connection and answer it in a forked worker, as dockerd runs each
    request in a goroutine: a long ``docker attach`` holds only its own process."""
    try:
        conn, _ = api_listener.accept()
    except OSError:
        return
    pid = syscalls.fork()
    if pid:
        conn.close()
        return
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        syscalls.prctl(syscalls.Prctl.PR_SET_CHILD_SUBREAPER, 0)
        _set_name("labkit-api")
        api_listener.close()
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid, uid, _ = struct.unpack("3i", creds)
        if uid != 0 and _group_id(API_GROUP) not in proc.groups(peer_pid):
            conn.sendall(_forbidden(uid))
            os._exit(0)
        api(conn, lambda line: print(f"labkitd: api {os.getpid()}: {line}", flush=True))
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        with contextlib.suppress(OSError):
            os.write(2, traceback.format_exc().encode())  # labkitd's log
        os._exit(1)
    os._exit(0)


def _forbidden(uid: int) -> bytes:
    body = f'{{"message": "permission denied: the Engine API is for root and the labkit group (uid {uid})"}}\n'.encode()
    return b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


# -- one request --------------------------------------------------------------------------


def _worker(conn: socket.socket, log: int, dispatch: Dispatch) -> None:
    """In the spare, now with a caller: receive the request, become the caller, run it."""
    try:
        request = _receive(conn)
        if request is None:
            os._exit(1)
        argv, cwd, env, fds, peer = request
        reason = _decline(peer)
        if reason:
            conn.sendall(protocol.reply("fallback", reason))
            os._exit(0)
        line = f"labkitd: worker {os.getpid()} for caller {peer[0]}: labkit {' '.join(argv)}\n"
        os.write(log, line.encode())
        _become(cwd, env, fds)
        conn.sendall(protocol.reply("pid", os.getpid()))
        try:
            code = dispatch(argv)
        except SystemExit as done:  # argparse: --help, or a usage error (already printed)
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        try:
            conn.sendall(protocol.reply("exit", code))
        except OSError:  # the caller was killed meanwhile: nobody to tell
            pass
    except BaseException:  # noqa: BLE001 - nothing may escape a forked worker
        os.write(log, f"labkitd worker {os.getpid()}: {traceback.format_exc()}".encode())
        os._exit(1)
    os._exit(0)


def _receive(conn: socket.socket):
    fd_space = socket.CMSG_SPACE(3 * 4)
    data, ancdata, _, _ = conn.recvmsg(65536, fd_space)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
    size = protocol.request_size(data)
    if size < 0 or len(fds) != 3:
        return None
    body = data[8:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    args, cwd, env = protocol.decode_request(body)
    argv = [os.fsdecode(a) for a in args]
    peer = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return argv, cwd, env, fds, peer


def _decline(peer: tuple[int, int, int]) -> str:
    """Why this request should run in the caller's process instead; "" to serve it."""
    pid, uid, _ = peer
    if uid != os.geteuid():
        return "not-root"
    for ns in NAMESPACES:
        try:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                return f"other-{ns}-namespace"
        except OSError:
            return "caller-gone"
    return ""


def _become(cwd: bytes, env: dict[bytes, bytes], fds: list[int]) -> None:
    """Take the caller's stdin/stdout/stderr, working directory and environment."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environb.update(env)
    sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)
    line = 1 if os.isatty(1) else -1  # buffering=1: a line at a time, as Python does for a terminal
    sys.stdout = open(1, "w", line, encoding="utf-8", errors="surrogateescape", closefd=False)
    sys.stderr = open(2, "w", 1, encoding="utf-8", errors="backslashreplace", closefd=False)


def code_stamp() -> int:
    """A number that changes when any of labkit's own .py files changes (mtime or size)."""
    seen = []
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stack = [package]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                    stack.append(entry.path)
                elif entry.name.endswith(".py"):
                    st = entry.stat()
                    seen.append((entry.path, st.st_mtime_ns, st.st_size))
    return hash(tuple(sorted(seen)))


def _set_name(name: str) -> None:
    with open("/proc/self/comm", "w") as comm:  # what prctl(PR_SET_NAME) sets: `ps` shows it
        comm.write(name)


# -- start, stop, status (labkit daemon ...) ------------------------------------------------


def running_pid() -> int | None:
    """labkitd's pid for this state root, if it runs (checked in /proc, not only the file)."""
    try:
        pid = int(pid_path().read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    """pid is a labkitd that has not ended (a zombie has)."""
    try:
        return proc.name(pid) == PROCESS_NAME and proc.alive(pid)
    except OSError:
        return False


def start(dispatch: Dispatch, warm_up: Callable[[], None] | None = None, timeout: float = 30.0,
          api: Api | None = None) -> int:
    """Start labkitd in the background (double fork, own session); its pid once it listens.
    ``dispatch``, ``warm_up`` and ``api`` as for serve()."""
    pid = running_pid()
    if pid:
        return pid
    paths.run_root().mkdir(parents=True, exist_ok=True)
    ready_r, ready_w = os.pipe()
    first = syscalls.fork()
    if first == 0:
        try:
            os.close(ready_r)
            os.setsid()
            if syscalls.fork() != 0:
                os._exit(0)
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            # fork(2) keeps every fd, close-on-exec or not: drop the caller's (a pipe
            # held open here would keep `labkit daemon start | cat` waiting forever)
            os.closerange(3, ready_w)
            os.closerange(ready_w + 1, os.sysconf("SC_OPEN_MAX"))
            # and Python's own streams write to the log too (the caller's may be gone: a
            # test runner's capture file was among the fds just closed)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            serve(dispatch, warm_up, ready_w, api)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.waitpid(first, 0)
    try:
        if not select.select([ready_r], [], [], timeout)[0] or os.read(ready_r, 1) != b"r":
            raise StateError(f"labkitd did not start (hint: see {log_path()})")
    finally:
        os.close(ready_r)
    pid = running_pid()
    if pid is None:
        raise StateError(f"labkitd did not start (hint: see {log_path()})")
    return pid


def stop(timeout: float = 10.0) -> int:
    """Stop labkitd (SIGTERM) and wait until it has gone; its pid. Containers keep running."""
    pid = running_pid()
    if pid is None:
        raise NotFound(f"labkitd is not running (no live pid in {pid_path()})")
    os.kill(pid, signal.SIGTERM)
    # the process, not its pid file: that goes a moment before the exit
    if not poll.until(lambda: not _alive(pid), timeout, first=0.01, most=0.01):
        os.kill(pid, signal.SIGKILL)
    for path in (socket_path(), api_socket_path(), pid_path()):
        path.unlink(missing_ok=True)
    return pid
