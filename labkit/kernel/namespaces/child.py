"""A process started in new namespaces: its handle, and how it reports back while it starts.

Between fork() and execve() the child reports over a close-on-exec pipe: ``U`` (user
namespace made, waiting for its id maps), ``P`` (the pid that runs the target), ``E`` (a
pickled exception). When exec succeeds the pipe closes by itself, so the parent reads
until EOF and knows. ``Process`` is the handle the parent gets; ``Completed`` what
``run()`` and ``enter()`` return.

Man pages: pipe(7), pidfd_open(2), pid_namespaces(7).
Layer: kernel. Used by unshare.py (spawn, run) and nsenter.py (enter).
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import shutil
import signal
import struct
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from labkit import poll
from labkit.errors import LabkitError
from labkit.kernel import mounts, proc, syscalls  # (all loaded before the child's pivot_root)

# -- the parent <-> child channel ----------------------------------------------------------


def send(fd: int, tag: bytes, payload: bytes = b"") -> None:
    os.write(fd, tag + struct.pack("I", len(payload)) + payload)


def receive(fd: int) -> tuple[bytes, bytes] | None:
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


def report(fd: int, err: BaseException) -> None:
    """In the child: send ``err`` to the parent (as a LabkitError if it is no OSError)."""
    try:
        if not isinstance(err, OSError | LabkitError):
            err = LabkitError(f"in the child: {''.join(traceback.format_exception_only(err)).strip()}")
        send(fd, b"E", pickle.dumps(err))
    except BaseException:  # noqa: BLE001 - the parent will see the exit code
        pass


# -- Process: a handle on a child started in new namespaces ------------------------------


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
        if not poll.until(lambda: self.poll() is not None, timeout, first=0.0005):
            raise TimeoutError(f"process {self.pid} still running after {timeout} s")
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
    value: object = None


# -- in the parent: wait for the child's start, or its output ------------------------------


def await_child(child: int, rd: int, go_wr: int = -1, write_id_maps: Callable[[int], None] | None = None) -> Process:
    """Read the child's reports until its exec closes the pipe; then a Process for it,
    or raise the error it reported. On "U", ``write_id_maps(child)`` runs, then the go
    byte goes out on ``go_wr``. The child is never left behind: not when its id maps
    cannot be written, not when the wait is interrupted (Ctrl-C in a notebook)."""
    pid, error = child, None
    try:
        while (msg := receive(rd)) is not None:
            tag, payload = msg
            if tag == b"U":
                try:
                    write_id_maps(child)  # type: ignore[misc]
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
    handle = Process(child, pid)
    if error is not None:
        handle.wait()
        raise error
    return handle


def collect(start: Callable[[int, int, int, int], Process], timeout: float | None) -> Completed:
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


# -- in the child: the last steps --------------------------------------------------------


def fork_into_pid_namespace(wr: int, pdeathsig: int | None) -> None:
    """After unshare(CLONE_NEWPID) (or CLONE_NEWTIME) our *children* go into the new
    namespace, not we ourselves: fork once more. The grandchild (PID 1 inside) returns;
    this process waits for it and exits the same way, so the caller's wait() sees the grandchild's status."""
    grandchild = syscalls.fork()
    if grandchild == 0:
        if pdeathsig:
            syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, pdeathsig)
        return
    send(wr, b"P", str(grandchild).encode())
    os.close(wr)
    for fd in (0, 1, 2):  # hold no one's terminal or pipe open while we wait
        try:
            os.close(fd)
        except OSError:
            pass
    proc.exit_like(os.waitpid(grandchild, 0)[1])


def exec_target(wr: int, target, argv: list[str], env: dict[str, str] | None, stdio, result_fd) -> None:
    """Put ``stdio`` on fds 0-2, then execve ``argv`` (or call ``target``); never returns."""
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
        path = shutil.which(argv[0], path=(env or os.environ).get("PATH")) or argv[0]
        detail = ""
        if e.errno == errno.EACCES and mounts.on_noexec_mount(path):  # (/run, on some systems)
            detail = f"{path} lies on a mount with noexec: no program there may run; put the files elsewhere"
        send(wr, b"E", pickle.dumps(syscalls.SyscallError(e.errno, "execvp", repr(argv[0]), detail)))
        os._exit(126 if e.errno == 13 else 127)


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
