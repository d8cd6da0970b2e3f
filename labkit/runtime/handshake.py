"""How init, its shim and create()'s caller tell each other where they are.

Three channels, all made before the fork, so each side only reads or writes an fd:

- the **sync pipe**: init (and the shim) write lines, the caller of create() reads them:
  ``pid INIT SHIM``, then ``created`` or ``error CODE MESSAGE``;
- the **go pipe**, one byte ``g``: on cgroup v2 the shim puts init into its cgroup while
  init sets up, and says so; init waits for it before it says ``created`` (on v1 init
  joins its cgroup itself, first thing, and nobody writes the byte);
- the **exec fifo** (``exec.fifo``, as runc's): init opens it for writing, which blocks
  until ``start`` opens it for reading. That open is the line between "created" and
  "running": before it, nothing of the user's code has run.

    caller of create()          shim                            init (PID 1 inside)
    ------------------          ----                            -------------------
    fork() ---------------->    fork_as_pid1() ------------->   (v1: join the cgroup)
                                sync: "pid INIT SHIM"           namespaces, mounts,
    <-------------------------  (v2: cgroup.add(init))          rootfs, pivot_root,
                                go: "g" ------------------->    hostname, rlimits ...
                                                                wait for "g" (v2)
    <------------------------------------- sync: "created" --  send "created"
    status: created                                             open(exec.fifo, WRONLY)
    ...                                                           ... blocks ...
    start(): open(exec.fifo, RDONLY), read ---------------->    returns; write "0"
    status: running                                             caps, uid, execve(command)
                                waitpid(init)                   (the sync pipe is
                                record the exit: stopped         close-on-exec: it closes)

With a user namespace (``--userns=auto``) init is born in it (one clone(2) makes it and
the PID namespace) and may write neither its own id maps nor the host's cgroup files: the
shim writes /proc/INIT/uid_map and gid_map, then puts init into its cgroup on v1 too, and
only then says go. init waits for that first thing, before step 1, then calls setresuid(0).

On cgroup v1 init waits for no go byte, so its ``created`` may overtake the shim's
``pid`` line: the caller reads until it has both. A failure in init sends
``error CODE MESSAGE`` instead of ``created`` and exits with CODE (127: command not
found, 126: cannot execute, 1: anything else, as Docker's).
In the foreground without a terminal the caller is its own shim (``monitor_here``):
the left and middle columns are one process, which knows init's pid without the line.

Man pages: pipe(7), fifo(7), open(2) ("O_NONBLOCK" on a FIFO).
Layer: runtime. Used by shim.py, init.py, container.py (start) and execute.py.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator

GO = b"g"


def send(fd: int, line: str) -> bool:
    """Write one line on the sync pipe; False when nobody listens any more (not an error)."""
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        return False
    return True


def lines(fd: int, deadline: float) -> Iterator[str]:
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


def say_go(fd: int) -> None:
    """(the shim, cgroup v2) init is in its cgroup now."""
    os.write(fd, GO)


def wait_go(fd: int) -> bool:
    """(init) Block until the shim's go byte; False if the shim went away instead."""
    return os.read(fd, 1) == GO


def wait_for_start(fifo: str) -> int:
    """(init) Block until ``start`` opens the exec fifo; the fd, still open."""
    fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)  # blocks here: this is "created"
    os.write(fd, b"0")
    return fd


def release(fifo: str, timeout: float, gone) -> bool:
    """(start) Open the exec fifo and read init's byte: init goes on to exec.

    False when init has not written within ``timeout`` seconds or ``gone()`` says it
    died. O_NONBLOCK: opening a FIFO for reading does not wait for a writer."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(100):
            if time.monotonic() > deadline or gone():
                return False
        os.read(fd, 1)
        return True
    finally:
        os.close(fd)
