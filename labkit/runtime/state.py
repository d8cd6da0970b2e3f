"""A container's status, and the state file that outlives the process that wrote it.

The status is an explicit state machine, as in youki: every verb checks that it is
allowed in the current status and raises StateError otherwise, never a silent no-op.

    creating --create--> created --start--> running <--pause/resume--> paused
                            |                  |                         |
                            +------kill--------+-----process exits-------+--> stopped --delete--> (gone)

The state lives in ``<run_root>/containers/<id>/state.json`` (like runc's
/run/runc/<id>/state.json), so ``labkit ps`` in another process, or after the process
that started the container has exited, still finds it. The recorded status is only a
hint: ``State.refresh()`` asks the kernel whether the init process still lives (same
pid *and* same start time, so a recycled pid is not mistaken for it) and whether the
cgroup is frozen.

Reference: opencontainers/runtime-spec runtime.md ("State", "Lifecycle").
Layer: runtime. Used by container.py and the CLI.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import StateError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms at every start)
if TYPE_CHECKING:
    from typing import Any


class Status(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


# verb -> the statuses it is allowed from
ALLOWED: dict[str, tuple[Status, ...]] = {
    "start": (Status.CREATED,),
    "pause": (Status.RUNNING,),
    "resume": (Status.PAUSED,),
    "exec": (Status.RUNNING,),
    "kill": (Status.CREATED, Status.RUNNING, Status.PAUSED),
    "delete": (Status.STOPPED, Status.CREATED),
}


def check(verb: str, container_id: str, status: Status) -> None:
    """Raise StateError unless ``verb`` is allowed while the container is ``status``."""
    allowed = ALLOWED[verb]
    if status not in allowed:
        names = " or ".join(s.value for s in allowed)
        raise StateError(f"cannot {verb} container {container_id[:12]}: it is {status.value} (must be {names})")


def container_dir(container_id: str) -> Path:
    """Live state: state.json, exec.fifo, the rootfs mount point."""
    return paths.run_root() / "containers" / container_id


def data_dir(container_id: str) -> Path:
    """Kept until `rm`: config.json, the overlay's upper and work dirs, the log."""
    return paths.containers_dir() / container_id


@dataclass(frozen=True)
class State:
    """What labkit knows about one container (the OCI state, plus Docker's extras)."""

    id: str
    name: str
    status: Status
    bundle: str
    pid: int = 0  # host pid of the container's init (PID 1 inside)
    pid_start: int = 0  # its start time in clock ticks (/proc/PID/stat field 22)
    shim_pid: int = 0
    created: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    exit_code: int | None = None
    oom_killed: bool = False
    image: str = ""
    command: tuple[str, ...] = ()
    cgroup: str = ""  # the name given to cgroups.create
    detached: bool = False
    auto_remove: bool = False
    error: str = ""

    def replace(self, **changes: Any) -> State:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        # getattr, not dataclasses.asdict: asdict deep-copies every value, ~10x slower
        d = {name: getattr(self, name) for name in _FIELDS}
        d["status"] = self.status.value
        d["command"] = list(self.command)
        d["ociVersion"] = "1.0.2-dev"
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> State:
        values = {k: v for k, v in d.items() if k in _FIELDS}
        values["status"] = Status(values["status"])
        values["command"] = tuple(values.get("command") or ())
        return cls(**values)

    def save(self) -> None:
        """Write state.json atomically: readers see the old or the new file, never half.

        One line, as runc writes its state.json: json's C encoder only runs without
        ``indent`` (with it, the pure-Python one takes ~10x as long)."""
        directory = os.fspath(container_dir(self.id))
        tmp = f"{directory}/.state.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(self.to_json()).encode())
        finally:
            os.close(fd)
        os.replace(tmp, f"{directory}/state.json")

    @classmethod
    def load(cls, container_id: str) -> State:
        with open(f"{os.fspath(container_dir(container_id))}/state.json", "rb") as f:
            return cls.from_json(json.loads(f.read()))

    def refresh(self) -> State:
        """The status as the kernel sees it now."""
        if self.status in (Status.STOPPED, Status.CREATING):
            return self
        if not self.pid or not _alive(self.pid, self.pid_start):
            # The shim records the exit; until it has, or when it was killed, say stopped.
            return self.replace(status=Status.STOPPED)
        if self.status in (Status.RUNNING, Status.PAUSED) and self.cgroup:
            return self.replace(status=Status.PAUSED if _frozen(self.cgroup) else Status.RUNNING)
        return self


_FIELDS = tuple(f.name for f in dataclasses.fields(State))


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return int(text.rsplit(")", 1)[1].split()[19])  # the name (field 2) may contain spaces


def _alive(pid: int, started: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # field 3 is fields[0]
        return int(fields[19]) == started and fields[0] != "Z"  # same start time, not a zombie
    except (OSError, IndexError, ValueError):
        return False


def _frozen(cgroup_name: str) -> bool:
    from labkit.kernel import cgroups

    try:
        return cgroups.open(cgroup_name).is_frozen
    except Exception:  # noqa: BLE001 - a vanished cgroup is simply not frozen
        return False


def all_ids() -> list[str]:
    """Every container with a state file, oldest first."""
    root = paths.run_root() / "containers"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        st = d / "state.json"
        if st.exists():
            found.append((st.stat().st_mtime, d.name))
    return [name for _, name in sorted(found)]
