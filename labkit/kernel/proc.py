"""A process as /proc shows it, and the exit status it leaves behind.

``/proc/PID/stat`` is one line: the pid, the command name in parentheses, then ~50
numbers and letters. The name may itself contain spaces and ")" (a process can call
itself anything), so the fields after it are found from the *last* ")". Field 3 is the
state (R running, S sleeping, Z zombie: ended, not yet reaped by its parent, X dead);
field 22 the start time in clock ticks after boot. A pid and its start time together
name one process: a pid alone may be reused by a newer one.

When a process ends, waitpid(2) gives its parent a wait status; a shell turns it into
the number ``$?`` shows: the exit code, or ``128 + N`` when signal N killed it (so
``docker run`` exits 137 when the container got SIGKILL).

Man pages: proc(5) "/proc/pid/stat", wait(2), bash(1) "EXIT STATUS".
Layer: kernel. Used by the runtime (container state, the shim), the engine's daemon, the CLI.
"""

from __future__ import annotations

import os
import signal


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat split into fields, ``fields[0]`` being field 3 (the state).

    Raises OSError (FileNotFoundError) when there is no such process.
    """
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def name(pid: int | str) -> str:
    """Field 2, the command name (what /proc/PID/comm holds), without its parentheses."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.index("(") + 1 : text.rindex(")")]


def groups(pid: int | str) -> set[int]:
    """The supplementary group ids of ``pid`` (the ``Groups:`` line of /proc/PID/status);
    empty if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((x for x in f if x.startswith("Groups:")), "Groups:")
    except OSError:
        return set()
    return {int(g) for g in line.split()[1:]}


def status(pid: int | str) -> dict[str, list[str]]:
    """/proc/PID/status as {"Uid": ["0", "0", "0", "0"], "NSpid": ["812", "1"], ...}.

    Ids are shown as the *reader's* user and PID namespaces see them: read from the host,
    ``Uid`` is the host uid, and ``NSpid`` lists the pid in each PID namespace from the
    reader's down to the process's own (the last one is what ``ps`` inside shows).
    """
    with open(f"/proc/{pid}/status") as f:
        return {key: rest.split() for key, _, rest in (line.partition(":") for line in f)}


def start_time(pid: int | str) -> int:
    """Field 22: when the process started, in clock ticks after boot."""
    return int(stat_fields(pid)[19])


def alive(pid: int, started: int | None = None) -> bool:
    """``pid`` runs and is not a zombie (and, given ``started``, is the process that
    started then, not a newer one that got the same pid)."""
    if not pid:
        return False
    try:
        fields = stat_fields(pid)
        return fields[0] not in ("Z", "X") and (started is None or int(fields[19]) == started)
    except (OSError, IndexError, ValueError):
        return False


def exit_code(wait_status: int) -> int:
    """A waitpid(2) status as a shell shows it: the exit code, or 128 + N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def exit_like(wait_status: int) -> None:
    """End this process the way the one with ``wait_status`` ended: with the same exit
    code, or killed by the same signal (what an in-between process passes on)."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(wait_status) & 0xFF)
