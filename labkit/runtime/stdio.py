"""A container's fds 0, 1 and 2, and how its first process takes them.

Layer: runtime. Used by shim.py (init's stdio), execute.py and the CLI.
"""

from __future__ import annotations

import fcntl
import os
import termios
from dataclasses import dataclass


@dataclass(frozen=True)
class Stdio:
    """The container's fds 0, 1 and 2 (already open in the caller)."""

    stdin: int
    stdout: int
    stderr: int


def set_stdio(stdio: Stdio, terminal: bool) -> None:
    """In the child: make ``stdio`` fds 0, 1, 2; with ``terminal``, stdin (a pty slave)
    becomes the controlling terminal of a new session (ioctl_tty(2) TIOCSCTTY)."""
    fds = (stdio.stdin, stdio.stdout, stdio.stderr)
    safe = [os.dup(fd) for fd in fds]  # dup first: stdio.stdout may be fd 0, and so on
    for target, fd in enumerate(safe):
        os.dup2(fd, target)  # dup2 makes the copy inheritable: execve keeps 0, 1, 2
        os.close(fd)
    if terminal:
        os.setsid()  # a new session, so the pty can become its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
