"""A container's status, and the one table of which verb may change it how.

The status is an explicit state machine, as in youki: every verb looks up its row in
``TRANSITIONS`` and raises StateError when the container is in no status the row
allows, never a silent no-op.

    creating --create--> created --start--> running --pause--> paused
                            |                  ^  <----resume----  |
                            |                  |                   |
                            +--kill/stop/exit--+--kill/stop/exit---+--> stopped --delete--> (gone)
                                               ^                              |
                                               +-------------restore----------+

``checkpoint`` (checkpoint.py) saves a running container with criu; unless asked to
leave it running, criu then kills it and the monitor records the exit, as for any
other end. ``restore`` brings a stopped container with a checkpoint back to running.

Reference: opencontainers/runtime-spec runtime.md ("Lifecycle"); youki's container status.
Layer: runtime. Used by container.py and shim.py (the lifecycle) and by the CLI.
"""

from __future__ import annotations

import enum

from labkit.errors import StateError


class Status(enum.Enum):
    CREATING = "creating"  # create() has begun; init is setting up
    CREATED = "created"  # init waits at exec.fifo: nothing of the user's code ran yet
    RUNNING = "running"
    PAUSED = "paused"  # every process frozen (freezer cgroup)
    STOPPED = "stopped"  # init has exited; the exit code is recorded


# The statuses with a live init: what `labkit ps` lists without -a.
ACTIVE = (Status.CREATED, Status.RUNNING, Status.PAUSED)


# verb -> (the statuses it is allowed from, the status it records; None: it records none)
TRANSITIONS: dict[str, tuple[tuple[Status, ...], Status | None]] = {
    "create": ((Status.CREATING,), Status.CREATED),  # init has said "created"
    "start": ((Status.CREATED,), Status.RUNNING),
    "pause": ((Status.RUNNING,), Status.PAUSED),
    "resume": ((Status.PAUSED,), Status.RUNNING),
    "exit": ((Status.CREATING, *ACTIVE), Status.STOPPED),  # the monitor saw init end
    "stop": ((*ACTIVE, Status.STOPPED), Status.STOPPED),  # SIGTERM, later SIGKILL
    "kill": (ACTIVE, None),  # the signal's effect, if any, is recorded as "exit"
    "exec": ((Status.RUNNING,), None),  # one more process; the status stays
    "checkpoint": ((Status.RUNNING,), None),  # criu dump; the kill that may follow is an "exit"
    "restore": ((Status.STOPPED,), Status.RUNNING),  # criu restore of the checkpoint
    "delete": ((Status.CREATED, Status.STOPPED), None),  # the state goes with it
}


def check(verb: str, container_id: str, status: Status) -> Status | None:
    """The status ``verb`` leads to from ``status``; StateError if it is not allowed there."""
    allowed, result = TRANSITIONS[verb]
    if status not in allowed:
        names = " or ".join(s.value for s in allowed)
        raise StateError(f"cannot {verb} container {container_id[:12]}: it is {status.value} (must be {names})")
    return result


def allows(verb: str, status: Status) -> bool:
    """Whether ``verb`` may happen in ``status`` (to re-check under the state file's lock)."""
    return status in TRANSITIONS[verb][0]
