"""The thin client: hand a command to labkitd, the way ``docker`` talks to dockerd.

One request over labkitd's Unix socket (labkit/engine/daemon.py) carries what the
command needs to run as if it ran here: the arguments, the working directory, the
environment, and this process's stdin, stdout and stderr themselves. Open file
descriptors travel over a Unix socket as SCM_RIGHTS ancillary data (unix(7)): the worker
gets the very same pipes or files, so output, input and ``| head`` work unchanged. The
worker answers with its pid (so Ctrl-C here reaches it) and, at the end, the exit code.

The command runs here instead (the caller gets None) when no labkitd listens, for an
interactive command at a terminal (``-i``, ``-t``, or ``labkit runtime``, whose spec may
ask for one: the terminal's modes, size and signals are the caller's business), for
commands labkitd does not serve, when ``LABKIT_NO_DAEMON=1``, and when the daemon
declines (the caller is in other namespaces than the daemon, or not root). Ctrl-C at a terminal reaches this process, which passes
it on to the worker, as ``docker run`` passes it on to the container.

Only builtin modules are imported here (``posix`` rather than ``os``, ``_socket`` rather
than ``socket``), and labkit's protocol module, which imports nothing: the client is on
the clock of every command, and those wrappers with what they import cost more than the
rest of the client together.

Layer: the CLI. The protocol itself is labkit/engine/protocol.py.
"""

import sys

import _signal
import _socket
import posix

from labkit.engine import protocol

# The commands labkitd runs: the container commands. doctor, cleanup, vm and daemon
# itself always run in the caller's own process.
SERVED = frozenset({"run", "ps", "exec", "logs", "stop", "kill", "rm", "pause", "unpause", "stats",
                    "inspect", "images", "runtime", "port", "network", "checkpoint", "restore", "top",
                    # images, as dockerd builds and pulls: the worker reads the build context
                    # and writes -o files from the caller's working directory
                    "pull", "push", "load", "save", "tag", "build", "history", "rmi", "image", "commit"})  # fmt: skip
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


def via_daemon(argv: list[str]) -> int | None:
    """Run the command in labkitd; its exit code, or None to run it in this process."""
    # bytes to bytes; os.environb if os is loaded (it has the changes made since start)
    environ = sys.modules["os"].environb if "os" in sys.modules else posix.environ
    if not argv or argv[0] not in SERVED or environ.get(b"LABKIT_NO_DAEMON") or posix.geteuid() != 0:
        return None  # (labkitd serves root only: rootless commands run here, in the user's own state)
    if _is_tty(0) and (argv[0] == "runtime" or any(map(_interactive, argv[1:]))):
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            conn.connect(protocol.socket_path(environ))
            args = [a.encode("utf-8", "surrogateescape") for a in argv]  # what os.fsencode does
            request = protocol.encode_request(args, posix.getcwdb(), environ)
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
            sent = conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError:  # no daemon (no socket, or nobody listening), a closed fd 0-2, no cwd
            return None
        try:
            conn.sendall(request[sent:])  # the rest of a large environment
        except OSError:  # labkitd declined, or went away: _answer tells which
            pass
        return _answer(conn)
    finally:
        conn.close()


GONE = -1  # in place of a pidfd: the worker had ended before the client could open one


def _answer(conn) -> int | None:
    """Read labkitd's lines: "pid N" first, then "exit N" (or "fallback WHY" instead)."""
    buffered, worker = b"", None
    while True:
        chunk = _receive(conn, worker)
        if not chunk and worker is None:
            # closed before any worker took the command: nothing ran, so run it here (a
            # labkitd killed a moment ago leaves a spare that accepts, then dies with it)
            return None
        if not chunk:
            sys.stderr.write("labkit: labkitd went away before the command finished "
                             "(hint: see labkitd.log next to its socket)\n")  # fmt: skip
            return protocol.EXIT_DAEMON
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            word, _, value = line.decode().partition(" ")
            if word == "pid":
                _forward_signals(int(value))
                try:
                    worker = posix.pidfd_open(int(value))
                except ProcessLookupError:  # it finished already: what it wrote is in the socket
                    worker = GONE
            elif word == "exit":
                return int(value)
            elif word == "fallback":
                return None


def _receive(conn, worker: int | None) -> bytes:
    """The next bytes from labkitd; b"" once the worker is gone without a word. The socket
    alone would not say so: the container's shim, forked by the worker, holds it too."""
    try:
        if worker == GONE:
            conn.setblocking(False)
        elif worker is not None:
            import select

            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            poller.register(worker, select.POLLIN)  # a pidfd is readable once the process ended
            if conn.fileno() not in dict(poller.poll()):
                conn.setblocking(False)  # it ended: take what it wrote, if anything
        return conn.recv(256)
    except OSError:  # BlockingIOError included: nothing was written
        return b""


def _forward_signals(worker: int) -> None:
    """Ctrl-C and friends, sent to this process, go on to the worker running the command."""

    def forward(sig, _frame):
        try:
            posix.kill(worker, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        _signal.signal(sig, forward)


def _interactive(arg: str) -> bool:
    """-i, -t, --interactive, --tty, or a cluster of short flags with one (-it, -dit).
    A word of the container's command (``ls -t``) counts too: in doubt, run here."""
    if arg in ("--interactive", "--tty"):
        return True
    flags = arg[1:]
    return arg[:1] == "-" and flags.isalpha() and ("i" in flags or "t" in flags)


def _is_tty(fd: int) -> bool:
    try:
        return posix.isatty(fd)
    except OSError:
        return False


def exit_now(code: int) -> None:
    """End the process: nothing to tear down, the worker wrote the output."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    posix._exit(code)
