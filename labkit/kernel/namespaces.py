"""Linux namespaces: give a process its own view of one kind of kernel resource.

A namespace wraps a global resource (the hostname, the process ids, the mount table,
the network stack, the user ids...) so that the processes inside see their own copy.
Every process has one namespace of each kind; ``/proc/PID/ns/KIND`` names it, and two
processes share a namespace exactly when those files have the same inode.

- ``namespaces_of(pid)`` and ``compare(a, b)``: which namespaces a process is in.
- ``spawn(...)``: start a process in new namespaces (fork, then unshare(2) in the child).
- ``run(...)``: the same, wait for it, and return what it printed (for notebooks).
- ``enter(pid, ...)``: run something inside another process's namespaces, as nsenter(1) does.

Man pages: namespaces(7), unshare(2), setns(2), pid_namespaces(7), user_namespaces(7).
Layer: kernel. Used by the runtime, the notebooks and the tests.
"""

from __future__ import annotations

import enum
import os
import pickle
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from labkit.errors import InvalidValue, LabkitError, NotFound, require_root
from labkit.kernel import syscalls
from labkit.kernel.syscalls import CloneFlags, MountFlags


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
# nsenter's order: the user namespace first (it owns the others), mount late (after it,
# paths resolve inside the new root).
_ENTER_ORDER = [Kind.USER, Kind.CGROUP, Kind.IPC, Kind.UTS, Kind.NET, Kind.PID, Kind.MNT, Kind.TIME]


def kinds(values: Iterable[str | Kind]) -> frozenset[Kind]:
    """A set of Kinds from names or Kinds: ``kinds({"uts", "pid"})``."""
    if isinstance(values, (str, Kind)):
        values = [values]
    return frozenset(Kind.parse(v) for v in values)


# --- Which namespaces is a process in? --------------------------------------------------


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


# --- The parent <-> child channel -------------------------------------------------------
# The child reports over a close-on-exec pipe: "U" (user namespace made, waiting for its
# id maps), "P" (the pid that runs the target), "E" (a pickled exception). When exec
# succeeds the pipe closes by itself, so the parent reads until EOF and knows.


def _send(fd: int, tag: bytes, payload: bytes = b"") -> None:
    os.write(fd, tag + struct.pack("I", len(payload)) + payload)


def _recv(fd: int) -> tuple[bytes, bytes] | None:
    head = _read_exact(fd, 5)
    if not head:
        return None
    (size,) = struct.unpack("I", head[1:])
    return head[:1], _read_exact(fd, size)


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


# --- Process: a handle on a child started in new namespaces ------------------------------


class Process:
    """A process labkit started. ``pid`` is its pid as seen from the host.

    A process never changes its own PID namespace, so with a new one labkit's child is
    born PID 1 there (see ``syscalls.fork_as_pid1``). With a user or time namespace as well, the
    child makes those first and forks the process that becomes PID 1: then there are two
    processes, ``wait()`` reaps the first, which waits for the second and passes its
    exit status on.
    """

    def __init__(self, child: int, pid: int) -> None:
        self._child = child
        self.pid = pid
        self.returncode: int | None = None
        # A pidfd tells when the process in the namespace is gone, though it is not
        # our child (its parent is the in-between process).
        self._pidfd = -1
        if pid != child:
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:  # it has already ended
                pass

    def _reaped(self, code: int) -> int:
        if self._pidfd >= 0:
            # If the in-between process was killed, PID 1 inside dies by PR_SET_PDEATHSIG
            # a moment later: wait for that too, so nothing outlives the handle.
            select.select([self._pidfd], [], [], 5.0)
            os.close(self._pidfd)
            self._pidfd = -1
        self.returncode = code
        return code

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self._child, os.WNOHANG)
            if done:
                self._reaped(os.waitstatus_to_exitcode(status))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end; its exit code, or -N when signal N killed it."""
        if timeout is None:
            if self.returncode is None:
                self._reaped(os.waitstatus_to_exitcode(os.waitpid(self._child, 0)[1]))
            return self.returncode  # type: ignore[return-value]
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode  # type: ignore[return-value]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``. PID 1 of a namespace ignores signals it has no handler for,
        except SIGKILL and SIGSTOP: that protects a container's init from its host."""
        if self.returncode is None:
            # Only the process inside: the in-between one of a PID namespace reaps it and
            # dies of the same signal. Killing that one instead would orphan PID 1 inside.
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.poll() is None:
            self.kill()
        self.wait()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<Process pid={self.pid} {state}>"


@dataclass(frozen=True)
class Completed:
    """What ``run()`` and ``enter()`` return: like subprocess.CompletedProcess, plus the
    return value of a Python callable run in the child."""

    returncode: int
    stdout: str
    stderr: str
    value: Any = None


# --- spawn: fork, unshare, set up, exec -------------------------------------------------

IdMap = Sequence[tuple[int, int, int]]


def _id_map(value: str | IdMap | None, own_id: int) -> list[tuple[int, int, int]] | None:
    """'root' maps id 0 inside to the caller's id; or a list of (inside, outside, count)."""
    if value is None:
        return None
    if value == "root":
        return [(0, own_id, 1)]
    try:
        rows = [(int(a), int(b), int(c)) for a, b, c in value]  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidValue("id map", value, "'root' or a list of (inside, outside, count)") from None
    if not rows or any(n <= 0 or a < 0 or b < 0 for a, b, n in rows):
        raise InvalidValue("id map", value, "non-negative ids and a positive count")
    return rows


def spawn(
    target: Sequence[str] | Callable[[], Any],
    new: Iterable[str | Kind] = (),
    *,
    hostname: str | None = None,
    root: str | os.PathLike | None = None,
    mount_proc: bool | None = None,
    uid_map: str | IdMap | None = None,
    gid_map: str | IdMap | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    time_offsets: dict[str, float] | None = None,
    pdeathsig: int | None = signal.SIGKILL,
    _result_fd: int | None = None,
) -> Process:
    """Start ``target`` (an argv list, or a Python callable) in new namespaces.

    >>> with spawn(["hostname"], new={"uts"}, hostname="box") as p:  # doctest: +SKIP
    ...     p.wait()

    ``mount_proc`` defaults to True when both the PID and the mount namespace are new:
    /proc shows the processes of the PID namespace of whoever mounted it, so a process
    in a new PID namespace still sees the host's processes until /proc is mounted again.

    ``time_offsets`` (with a new time namespace) shifts the clocks inside, e.g.
    ``{"boottime": 86400}`` makes the machine look a day older; "monotonic" works too.
    """
    new_kinds = kinds(new)
    if not callable(target):
        argv = [os.fspath(a) for a in target]
        if not argv:
            raise InvalidValue("command", target, "a non-empty list like ['sh', '-c', 'echo hi']")
    else:
        argv = []
    if hostname is not None and Kind.UTS not in new_kinds:
        raise InvalidValue("option hostname", hostname, "new={'uts', ...}: a new UTS namespace")
    if root is not None and Kind.MNT not in new_kinds:
        raise InvalidValue("option root", root, "new={'mnt', ...}: pivot_root needs a mount namespace")
    if mount_proc is None:
        mount_proc = {Kind.PID, Kind.MNT} <= new_kinds
    if mount_proc and Kind.MNT not in new_kinds:
        raise InvalidValue("option mount_proc", True, "new={'mnt', ...}: or /proc would change for the host")
    if time_offsets and Kind.TIME not in new_kinds:
        raise InvalidValue("option time_offsets", time_offsets, "new={'time', ...}")
    for clock in time_offsets or {}:
        if clock not in ("monotonic", "boottime"):
            raise InvalidValue("clock", clock, "'monotonic' or 'boottime'")
    uids = _id_map(uid_map, os.getuid())
    gids = _id_map(gid_map, os.getgid())
    if (uids or gids) and Kind.USER not in new_kinds:
        raise InvalidValue("uid_map/gid_map", uid_map or gid_map, "new={'user', ...}")
    if new_kinds - {Kind.USER}:
        require_root("creating namespaces (" + " ".join(sorted(k.value for k in new_kinds)) + ")")
    if root is not None and not os.path.isdir(root):
        raise InvalidValue("root directory", os.fspath(root), "an existing directory")
    stdio = [_fileno(x) for x in (stdin, stdout, stderr)]

    # Without a user or time namespace, the parent can make the child PID 1 directly;
    # otherwise the child makes the PID namespace (owned by its new user namespace) and
    # forks once more.
    pid_here = Kind.PID in new_kinds and not new_kinds & {Kind.USER, Kind.TIME}
    flags = 0
    for k in new_kinds - {Kind.USER} - ({Kind.PID} if pid_here else set()):
        flags |= k.flag
    rd, wr = os.pipe2(os.O_CLOEXEC)
    go_rd, go_wr = os.pipe2(os.O_CLOEXEC) if Kind.USER in new_kinds else (-1, -1)
    child = syscalls.fork_as_pid1() if pid_here else syscalls.fork()
    if child == 0:  # ---- in the child: never return, never raise
        os.close(rd)
        if go_wr >= 0:  # only the parent may hold it: its closing is our "give up"
            os.close(go_wr)
        try:
            if pdeathsig:
                syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, pdeathsig)
            if Kind.USER in new_kinds:
                _become_root_in_new_userns(wr, go_rd, uids, gids)
            if flags:
                syscalls.unshare(flags)
            if time_offsets:
                _set_time_offsets(time_offsets)
            if (Kind.PID in new_kinds and not pid_here) or Kind.TIME in new_kinds:
                _fork_into_pid_namespace(wr, pdeathsig)  # returns only in the grandchild
            _set_up_and_run(
                wr, target, argv, new_kinds, hostname, root, mount_proc, env, cwd, stdio, _result_fd
            )
        except BaseException as err:  # noqa: BLE001 - report everything to the parent
            _report(wr, err)
            os._exit(127)
        os._exit(0)

    # ---- in the parent
    os.close(wr)
    if go_rd >= 0:
        os.close(go_rd)
    return _await_child(child, rd, go_wr, uids, gids)


def _await_child(child: int, rd: int, go_wr: int = -1, uids=None, gids=None) -> Process:
    """Read the child's reports until its exec closes the pipe; then a Process for it,
    or raise the error it reported. The child is never left behind: not when its id
    maps cannot be written, not when the wait is interrupted (Ctrl-C in a notebook)."""
    pid, error = child, None
    try:
        while (msg := _recv(rd)) is not None:
            tag, payload = msg
            if tag == b"U":
                try:
                    _write_id_maps(child, uids, gids)
                except OSError as err:
                    error = err
                    break  # closing go_wr (below) makes the waiting child give up
                os.write(go_wr, b"g")
            elif tag == b"P":
                pid = int(payload)
            elif tag == b"E":
                error = pickle.loads(payload)
    except BaseException:
        os.kill(child, signal.SIGKILL)  # its own children follow by PR_SET_PDEATHSIG
        os.waitpid(child, 0)
        raise
    finally:
        os.close(rd)
        if go_wr >= 0:
            os.close(go_wr)
    proc = Process(child, pid)
    if error is not None:
        proc.wait()
        raise error
    return proc


def _fileno(x: Any) -> int | None:
    if x is None or isinstance(x, int):
        return x
    return x.fileno()


def _report(fd: int, err: BaseException) -> None:
    try:
        if not isinstance(err, OSError | LabkitError):
            err = LabkitError(f"in the child: {''.join(traceback.format_exception_only(err)).strip()}")
        _send(fd, b"E", pickle.dumps(err))
    except BaseException:  # noqa: BLE001 - the parent will see the exit code
        pass


def _become_root_in_new_userns(wr: int, go_rd: int, uids, gids) -> None:
    """unshare(CLONE_NEWUSER), then wait while the parent writes our id maps.

    A process cannot write a useful map for itself: the parent, still in the old user
    namespace, writes /proc/CHILD/{setgroups,uid_map,gid_map}. Until then every id of
    the child shows as the overflow id 65534 ("nobody").
    """
    syscalls.unshare(CloneFlags.CLONE_NEWUSER)
    _send(wr, b"U")
    if os.read(go_rd, 1) != b"g":
        raise LabkitError("the parent did not write the user namespace's id maps")
    if gids and any(a == 0 for a, _, _ in gids):
        os.setresgid(0, 0, 0)
    if uids and any(a == 0 for a, _, _ in uids):
        os.setresuid(0, 0, 0)  # root inside; on the host still the mapped id


def _write_id_maps(pid: int, uids, gids) -> None:
    # setgroups must be denied before an unprivileged process may write gid_map; labkit
    # always denies it, so a mapped root cannot drop itself out of a group to gain access.
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    for name, rows in (("uid_map", uids), ("gid_map", gids)):
        if rows:
            text = "".join(f"{a} {b} {n}\n" for a, b, n in rows)
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
            except OSError as err:  # the kernel checks the map as a whole, at this write
                raise syscalls.SyscallError(
                    err.errno or 22, "write", f"/proc/{pid}/{name}, {text.strip()!r}",
                    "ranges must not overlap, and at most 340 lines" if err.errno == 22 else "",
                ) from None


def _set_time_offsets(offsets: dict[str, float]) -> None:
    # Offsets can be written only before the first process enters the new time namespace.
    with open("/proc/self/timens_offsets", "w") as f:
        for clock, secs in offsets.items():
            whole = int(secs // 1)
            f.write(f"{clock} {whole} {int((secs - whole) * 1e9)}\n")


def _fork_into_pid_namespace(wr: int, pdeathsig: int | None) -> None:
    """After unshare(CLONE_NEWPID) (or CLONE_NEWTIME) our *children* go into the new
    namespace, not we ourselves: fork once more. The grandchild (PID 1 inside) returns; this process waits for it and exits the
    same way, so the caller's wait() sees the grandchild's status."""
    grandchild = syscalls.fork()
    if grandchild == 0:
        if pdeathsig:
            syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, pdeathsig)
        return
    _send(wr, b"P", str(grandchild).encode())
    os.close(wr)
    for fd in (0, 1, 2):  # hold no one's terminal or pipe open while we wait
        try:
            os.close(fd)
        except OSError:
            pass
    status = os.waitpid(grandchild, 0)[1]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _set_up_and_run(wr, target, argv, new_kinds, hostname, root, mount_proc, env, cwd, stdio, result_fd):
    if Kind.MNT in new_kinds:
        # A new mount namespace starts as a copy whose mounts still propagate to and from
        # the host's ("shared", the systemd default). Make all of / private first, so
        # nothing we mount below leaks out.
        syscalls.mount(None, "/", None, MountFlags.MS_REC | MountFlags.MS_PRIVATE)
    if hostname is not None:
        syscalls.sethostname(hostname)
    if root is not None:
        _pivot_into(os.fspath(root))
    if mount_proc:
        syscalls.mount("proc", "/proc", "proc", MountFlags.MS_NOSUID | MountFlags.MS_NODEV | MountFlags.MS_NOEXEC)
    if cwd is not None:
        os.chdir(cwd)
    for fd, src in enumerate(stdio):
        if src is not None and src != fd:
            os.dup2(src, fd, inheritable=True)
    if not argv:
        _run_callable(wr, target, stdio, result_fd)
    try:
        if env is None:
            os.execvp(argv[0], argv)
        os.execvpe(argv[0], argv, env)
    except OSError as e:  # the pipe is still open: tell the parent why
        _send(wr, b"E", pickle.dumps(syscalls.SyscallError(e.errno, "execvp", repr(argv[0]))))
        os._exit(126 if e.errno == 13 else 127)


def _pivot_into(root: str) -> None:
    """Make ``root`` the process's / with pivot_root(2), the way runc does it.

    pivot_root needs the new root to be a mount point: bind-mount it onto itself. With
    pivot_root(".", ".") the old root ends up stacked under the new one, where a lazy
    unmount detaches it: no directory for the old root is needed, and nothing of the host's
    tree stays reachable (unlike chroot, which a root process can escape).
    """
    syscalls.mount(root, root, None, MountFlags.MS_BIND | MountFlags.MS_REC)
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.UmountFlags.MNT_DETACH)
    os.chdir("/")


def _run_callable(wr, target, stdio, result_fd) -> None:
    os.close(wr)  # nothing more to report: the parent may go on
    if stdio[1] is not None:
        sys.stdout = open(1, "w", buffering=1, closefd=False)
    if stdio[2] is not None:
        sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 0
    try:
        value = target()
        if result_fd is not None:
            os.write(result_fd, pickle.dumps(value))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


# --- run and enter: start, wait, collect the output -----------------------------------


def run(
    target: Sequence[str] | Callable[[], Any],
    new: Iterable[str | Kind] = (),
    *,
    timeout: float | None = 30,
    **options: Any,
) -> Completed:
    """Like ``spawn``, but wait for the end and return the output and exit code.

    A Python callable's return value comes back as ``.value``:

    >>> run(lambda: socket.gethostname(), new={"uts"}, hostname="box").value  # doctest: +SKIP
    'box'
    """
    return _collect(lambda inp, out, err, res: spawn(target, new, stdin=inp, stdout=out,
                                                      stderr=err, _result_fd=res, **options), timeout)


def _collect(start: Callable[[int, int, int, int], Process], timeout: float | None) -> Completed:
    """Start with stdin on /dev/null and the output in temp files, wait, read them back."""
    with open(os.devnull, "rb") as inp, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as res:
        proc = start(inp.fileno(), out.fileno(), err.fileno(), res.fileno())
        with proc:
            try:
                code = proc.wait(timeout)
            except TimeoutError:
                proc.kill()
                proc.wait()
                raise
        for f in (out, err, res):
            f.seek(0)
        raw = res.read()
        return Completed(
            code,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            pickle.loads(raw) if raw else None,
        )


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
    target: Sequence[str] | Callable[[], Any],
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
                    _fork_into_pid_namespace(wr, signal.SIGKILL)
                _set_up_and_run(wr, target, argv, frozenset(), None, None, False, env, None,
                                [inp, out, err], res)
            except BaseException as e:  # noqa: BLE001
                _report(wr, e)
                os._exit(127)
            os._exit(0)
        os.close(wr)
        for fd in [*fds.values(), root_fd, cwd_fd]:
            if fd >= 0:
                os.close(fd)
        return _await_child(child, rd)

    return _collect(start, timeout)
