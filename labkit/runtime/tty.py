"""A terminal for an interactive container (``labkit run -it``, ``labkit exec -it``).

The container's process gets the slave side of a pseudo-terminal pair (pty(7)) as its
stdin, stdout and stderr, and as its controlling terminal, so a shell inside gets line
editing, job control and Ctrl-C. labkit keeps the master side and copies bytes both ways
between it and your own terminal, which it puts in raw mode meanwhile (every key goes
through untouched; the pty inside does the line discipline). This relays through a host
pty, as ``docker run -it`` relays through containerd; runc can instead allocate the pty
inside the container's own /dev/pts and pass its master over a socket.

Man pages: pty(7), openpty(3), termios(3), ioctl_tty(2) (TIOCSCTTY, TIOCSWINSZ).
Layer: runtime. Used by container.py's callers (the CLI) and execute.py.
"""

from __future__ import annotations

import fcntl
import os
import select
import termios
import tty
from collections.abc import Callable


def open_pty() -> tuple[int, int, str]:
    """(master fd, slave fd, slave path), with the caller's window size copied over."""
    master, slave = os.openpty()
    try:
        size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
    except OSError:
        pass  # stdin is not a terminal: keep the kernel's default size
    return master, slave, os.ttyname(slave)


def relay(master: int, done: Callable[[], bool], stdin: int = 0, stdout: int = 1) -> None:
    """Copy stdin -> master and master -> stdout until the pty closes and ``done()``."""
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    inputs = [master, stdin]
    try:
        while True:
            ready = select.select(inputs, [], [], 0.1)[0]
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the last process holding the slave has exited
                    data = b""
                if not data:
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if data:
                    os.write(master, data)
                else:
                    inputs.remove(stdin)  # our stdin ended: stop reading it
            if not ready and done():
                break
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
