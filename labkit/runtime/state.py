"""The state file of one container, which outlives the process that wrote it.

The state lives in ``<run_root>/containers/<id>/state.json`` (like runc's
/run/runc/<id>/state.json), so ``labkit ps`` in another process, or after the process
that started the container has exited, still finds it. The recorded status (status.py)
is only a hint: ``State.refresh()`` asks the kernel whether the init process still lives
(same pid *and* same start time, so a recycled pid is not mistaken for it) and whether
the cgroup is frozen. ``update()`` is the one way to change the file: read, change,
write, under flock(2), so the caller and the shim never overwrite each other.

Reference: opencontainers/runtime-spec runtime.md ("State").
Layer: runtime. Used by container.py, shim.py and the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import NotFound
from labkit.kernel import cgroups, proc
from labkit.runtime.spec import OCI_VERSION
from labkit.runtime.status import Status

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

    def replace(self, **changes: object) -> State:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, object]:
        d = {name: getattr(self, name) for name in _FIELDS}
        d["status"] = self.status.value
        d["command"] = list(self.command)
        d["ociVersion"] = OCI_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> State:
        values = {k: v for k, v in d.items() if k in _FIELDS}
        values["status"] = Status(values["status"])
        values["command"] = tuple(values.get("command") or ())
        return cls(**values)

    def save(self) -> None:
        """Write state.json atomically: readers see the old or the new file, never half.
        One line, as runc writes its state.json."""
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
        if not proc.alive(self.pid, self.pid_start):
            # The shim records the exit; until it has, or when it was killed, say stopped.
            return self.replace(status=Status.STOPPED)
        if self.status in (Status.RUNNING, Status.PAUSED) and self.cgroup:
            return self.replace(status=Status.PAUSED if _frozen(self.cgroup) else Status.RUNNING)
        return self


_FIELDS = tuple(f.name for f in dataclasses.fields(State))


def _frozen(cgroup_name: str) -> bool:
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
        try:
            found.append(((d / "state.json").stat().st_mtime, d.name))
        except FileNotFoundError:  # not written yet, or removed meanwhile (a --rm exit)
            continue
    return [name for _, name in sorted(found)]


@contextlib.contextmanager
def locked(container_id: str) -> Iterator[None]:
    """flock(2) on the container's directory, so that update() and the removal of the
    directory take turns: a state written while the directory is being removed would
    make the removal fail half-way. NotFound if the container is gone."""
    try:
        fd = os.open(container_dir(container_id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no such container: {container_id}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        yield
    finally:
        os.close(fd)


def update(container_id: str, change: Callable[[State], State]) -> State:
    """Read-modify-write state.json under the container's lock, so the caller and the
    shim never overwrite each other's change. NotFound if the container is gone (a --rm
    container's shim may remove it the moment it exits)."""
    with locked(container_id):
        try:
            new = change(State.load(container_id))
            new.save()
        except FileNotFoundError:  # removed before we had the lock
            raise NotFound(f"no such container: {container_id}") from None
    return new
