"""Checkpoint and restore: a running container saved to files, and brought back (CRIU).

CRIU ("checkpoint/restore in user space", criu(8)) does it with what the kernel offers
any debugger, no kernel module:

- ``criu dump`` freezes the container's cgroup (``--freeze-cgroup``: the freezer that
  ``labkit pause`` uses), seizes every process with ptrace(2), puts a small "parasite"
  into each one to read what only the process itself can see, and writes image files:
  memory pages, registers, open files and their offsets, namespaces, mounts, sockets,
  the seccomp filter. Then it kills the tree, or with ``--leave-running`` lets it go on.
- ``criu restore`` forks the tree again with the same pids (in a new PID namespace),
  makes its namespaces and mounts, reopens its files, maps the memory back and jumps
  into the saved registers: the processes go on as if nothing had happened.

What criu cannot know by itself about a labkit container, labkit tells it:

- things from *outside* the container's root cannot go into the images; criu marks them
  external and restore takes them from the host again. The bind mounts (/etc/hosts,
  /etc/hostname, /etc/resolv.conf, ``-v`` volumes, /sys/fs/cgroup):
  ``--external mnt[MOUNTPOINT]:NAME``, then at restore ``--external mnt[NAME]:HOSTPATH``.
  init's stdin, stdout and stderr (/dev/null and the log, opened on the host):
  ``--external file[MNT_ID:INODE]``, then ``--inherit-fd fd[N]:file[MNT_ID:INODE]`` with
  the file opened again on fd N. A network namespace the engine made (a veth on a
  bridge): ``--external net[INODE]:netns``, then ``--inherit-fd fd[N]:netns``, so the
  container comes back into the same namespace, with its address and its ports.
- the root filesystem: the overlay lives only in the container's mount namespace, so
  the restoring shim mounts it again in a mount namespace of its own (the host's mount
  table never holds it) and hands it to criu with ``--root``.
- the cgroup: labkit makes it again, with the limits of config.json, and starts criu in
  it, so the restored processes are born there.
- who waits: ``--restore-detached --restore-sibling`` make the restored init a child of
  criu's parent, the shim, which waits for it and records its exit as at create (shim.py).
- ``--file-locks``: a process holding a flock(2) or fcntl(2) lock gets it back.

What else criu refuses, it says in its log; labkit passes the reason on in one line
(an established TCP connection, for one, would need ``--tcp-established``).

Docker has the same pair (``docker checkpoint create [--leave-running]`` and ``docker start
--checkpoint``). Like Docker, a checkpoint without ``--leave-running`` leaves the
container stopped; labkit keeps one checkpoint per container, in its data directory,
until the next one or ``rm``.

Where criu cannot work, every verb here says why in one line before touching anything:
criu is missing, or ``criu check`` fails (a kernel newer than criu: 3.17 cannot read
6.18's vDSO; labkit's VM boots Debian 12's 6.1, where it works).

Layer: runtime. Used by the CLI (labkit checkpoint, labkit restore) and notebook 07.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from labkit.errors import LabkitError, NotFound, StateError, Unsupported, require_root
from labkit.kernel import cgroups, mounts, proc, syscalls
from labkit.kernel.syscalls import CloneFlags
from labkit.runtime import filesystem, handshake, shim
from labkit.runtime.container import cgroup_name, load, spec_of, wait
from labkit.runtime.spec import Spec
from labkit.runtime.state import State, data_dir, update
from labkit.runtime.status import Status, allows, check

__all__ = ["checkpoint", "restore", "require_criu", "images_dir", "has_checkpoint", "criu_errors"]

CRIU_TIMEOUT = 300.0  # seconds one criu dump or restore may take (minutes when emulated)
EXTERNAL = "external.json"  # what restore must hand criu again, written at dump


def images_dir(container_id: str) -> Path:
    """Where the container's checkpoint lives (Docker: containers/ID/checkpoints/NAME)."""
    return data_dir(container_id) / "checkpoint"


def has_checkpoint(container_id: str) -> bool:
    return (images_dir(container_id) / EXTERNAL).exists()


# -- can criu work here? ------------------------------------------------------------------


def criu_binary() -> str:
    """criu's path (it lives in /usr/sbin, which a user's PATH may lack); NotFound if none."""
    for found in (shutil.which("criu"), "/usr/sbin/criu", "/sbin/criu"):
        if found and os.access(found, os.X_OK):
            return found
    raise NotFound("criu is not installed", hint="apt-get install criu (provision.sh --dev installs it)")


def require_criu() -> str:
    """criu's path once ``criu check`` passes on this kernel; else Unsupported, one line why."""
    require_root("checkpoint and restore with criu")
    criu = criu_binary()
    r = subprocess.run([criu, "check"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        why = criu_errors(r.stdout + r.stderr) or "failed"
        raise Unsupported(f"criu cannot work on this kernel ({os.uname().release}): criu check: {why}",
                          hint="labkit's VM boots the kernel in /boot: labkit vm run --host-root -- CMD")
    return criu


_ERROR = re.compile(r"Error \(([^)]*)\): (.*)")


def criu_errors(log: str, most: int = 2) -> str:
    """The first ``most`` distinct error messages of a criu log, joined by '; '.

    criu writes ``(00.70) Error (criu/mount.c:753): mnt: ...``. Two kinds of line say
    nothing about the failure and are left out: tun.c's (at every start criu probes
    /dev/net/tun and logs an error where there is none) and the closing "... FAILED.".
    """
    found: list[str] = []
    for line in log.splitlines():
        m = _ERROR.search(line)
        if m and not m[1].startswith("criu/tun.c") and not m[2].endswith("FAILED."):
            if m[2].strip() not in found:
                found.append(m[2].strip())
    return "; ".join(found[:most])


# -- checkpoint ---------------------------------------------------------------------------


def checkpoint(container_id: str, leave_running: bool = False) -> State:
    """``criu dump`` the container's process tree into ``images_dir``; the new state.

    Without ``leave_running`` criu kills the tree once it is saved, and the shim records
    the exit (137: SIGKILL), as for any other end: the container is stopped.
    """
    state = load(container_id)
    check("checkpoint", container_id, state.status)
    spec = spec_of(container_id)
    _refuse_what_criu_cannot_take(state, spec, leave_running)
    criu = require_criu()
    external = {"mounts": _external_mounts(spec, state.cgroup), "files": _external_files(state.pid),
                "netns": _joined_netns(spec)}  # fmt: skip
    images = images_dir(container_id)
    new = images.with_name("checkpoint.new")  # the old checkpoint stays until this one is whole
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    cg = cgroups.open(state.cgroup)
    argv = [criu, "dump", "--tree", str(state.pid), "--images-dir", str(new), "--file-locks",
            "--freeze-cgroup", str(cg.path if cg.version == 2 else cg.paths["freezer"])]  # fmt: skip
    for mountpoint in external["mounts"]:
        argv += ["--external", f"mnt[{mountpoint}]:{mountpoint}"]
    for key, _, _ in external["files"]:
        argv += ["--external", key]
    if external["netns"]:
        argv += ["--external", f"net[{os.stat(f'/proc/{state.pid}/ns/net').st_ino}]:netns"]
    if leave_running:
        argv.append("--leave-running")
    try:
        _run_criu(argv, "dump", container_id)
        (new / EXTERNAL).write_text(json.dumps(external, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(images, ignore_errors=True)
    os.rename(new, images)
    if not leave_running:
        wait(container_id, 30.0)  # criu has killed init: let the shim record the exit
    return load(container_id)


def _refuse_what_criu_cannot_take(state: State, spec: Spec, leave_running: bool) -> None:
    """One line for a container labkit cannot checkpoint, before criu is even asked."""
    name = state.name
    if spec.terminal:
        raise Unsupported(f"cannot checkpoint {name}: it has a terminal (-t), whose other end (the pty "
                          "master) is outside the container")  # fmt: skip
    if proc.stat_fields(state.pid)[3] != str(state.pid):  # field 6, the session id
        raise Unsupported(f"cannot checkpoint {name}: its init shares the session of a process outside "
                          "the container (a foreground run), and criu needs the session leader inside "
                          "(labkit run -d)")  # fmt: skip
    joined = sorted({kind for kind, _ in spec.namespace_paths} - {"network"})
    if joined:
        raise Unsupported(f"cannot checkpoint {name}: it joins another's {', '.join(joined)} namespace, "
                          "and criu can leave only a network namespace outside the checkpoint")  # fmt: skip
    if state.auto_remove and not leave_running:
        raise StateError(f"cannot checkpoint {name} and stop it: it runs with --rm, so stopping removes it "
                         "with its checkpoint (--leave-running keeps it running)")  # fmt: skip


def _external_mounts(spec: Spec, cgroup: str) -> dict[str, str]:
    """mount point in the container -> the host path it is bound from.

    Every bind mount of the spec, and /sys/fs/cgroup: on v2 a bind of the container's
    cgroup directory, on v1 a tmpfs with a bind per hierarchy (filesystem.mount_cgroups).
    """
    found = {os.path.normpath(m.destination): m.source for m in spec.mounts if m.is_bind}
    for m in spec.mounts:
        if m.type == "cgroup" and cgroup:
            cg = cgroups.open(cgroup)
            if cg.version == 2:
                found[os.path.normpath(m.destination)] = str(cg.path)
            else:
                found.update({os.path.join(m.destination, c): str(d) for c, d in cg.paths.items()})
    return found


def _external_files(init_pid: int) -> list[tuple[str, str, int]]:
    """(criu's key, host path, open flags) of each file the tree holds on a mount that its
    mount namespace does not have: what labkit opened for it on the host (stdio)."""
    inside = {m.mount_id for m in mounts.mountinfo(init_pid)}
    found: dict[str, tuple[str, str, int]] = {}
    for pid in _tree(init_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # it ended meanwhile (criu freezes the tree, this walk cannot)
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                fdinfo = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                inode = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
            except OSError:
                continue
            info = dict(line.split(":", 1) for line in fdinfo.splitlines())
            mnt_id, flags = int(info["mnt_id"]), int(info["flags"], 8)
            # pipe:[...] and socket:[...] are criu's own business; a path on a mount the
            # container does not have is one labkit opened for it on the host
            if target.startswith("/") and mnt_id not in inside:
                key = f"file[{mnt_id:x}:{inode:x}]"  # criu's spelling: both in hex
                found[key] = (key, target, flags & (os.O_ACCMODE | os.O_APPEND))
    return list(found.values())


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (/proc/PID/task/TID/children, proc(5))."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def _joined_netns(spec: Spec) -> str:
    """The path of the network namespace the container joined (the engine's), or ''."""
    return next((path for kind, path in spec.namespace_paths if kind == "network"), "")


def _run_criu(argv: list[str], verb: str, container_id: str, pass_fds: tuple[int, ...] = (),
              preexec=None) -> None:  # fmt: skip
    """Run criu dump or restore; LabkitError with criu's own reason if it fails."""
    log = data_dir(container_id) / f"criu-{verb}.log"  # the whole story: kept until rm
    what = f"criu {verb} of {container_id[:12]}"
    try:
        r = subprocess.run([*argv, "--log-file", str(log)], capture_output=True, text=True, check=False,
                           timeout=CRIU_TIMEOUT, pass_fds=pass_fds, preexec_fn=preexec)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LabkitError(f"{what} took over {CRIU_TIMEOUT:.0f} s (its log: {log})") from None
    if r.returncode != 0:
        why = criu_errors((log.read_text(errors="replace") if log.exists() else "") + r.stderr)
        raise LabkitError(f"{what} failed: {why or r.stderr.strip()} (its log: {log})")


# -- restore ------------------------------------------------------------------------------


def restore(container_id: str) -> State:
    """Bring a checkpointed container back: same id, same name, its processes going on
    where they were. Needs the container stopped and its checkpoint; the new state."""
    state = load(container_id)
    check("restore", container_id, state.status)
    if not has_checkpoint(container_id):
        raise NotFound(f"container {state.name} has no checkpoint (labkit checkpoint {state.name} makes one)")
    spec = spec_of(container_id)
    criu = require_criu()
    external = json.loads((images_dir(container_id) / EXTERNAL).read_text())
    cg = cgroups.create(cgroup_name(container_id), limits=spec.limits)
    try:
        return _launch(state, spec, cg, criu, external)
    except BaseException:
        cg.close(keep_parents=True)
        raise


def _launch(state: State, spec: Spec, cg, criu: str, external: dict) -> State:
    """Double-fork the shim (as shim.launch does for a detached container), then read its
    one line: ``restored`` once the state says running, or ``error MESSAGE``."""
    report_r, report_w = os.pipe()
    middle = syscalls.fork()
    if middle == 0:
        try:
            os.close(report_r)
            os.setsid()
            if syscalls.fork() == 0:
                _restore_shim(state, spec, cg, criu, external, report_w)
        finally:
            os._exit(1)
    os.close(report_w)
    os.waitpid(middle, 0)
    answer = ""
    try:
        for line in handshake.lines(report_r, time.monotonic() + CRIU_TIMEOUT + 10):
            answer = line
            break
    finally:
        os.close(report_r)
    if answer != "restored":
        raise LabkitError(answer.removeprefix("error ") or f"the shim restoring {state.id[:12]} gave no answer")
    return load(state.id)


def _restore_shim(state: State, spec: Spec, cg, criu: str, external: dict, report_w: int) -> None:
    """The shim of a restored container: run criu restore, then monitor init until it ends."""
    with open("/proc/self/comm", "w") as comm:
        comm.write("labkit-shim")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    pid = 0
    try:
        pid = _criu_restore(state, spec, cg, criu, external)
        update(state.id, lambda s: s.replace(status=Status.RUNNING, pid=pid, pid_start=proc.start_time(pid),
                                             shim_pid=os.getpid(), started=time.time(), finished=0.0,
                                             exit_code=None, oom_killed=False, detached=True, error="")
               if allows("restore", s.status) else s)  # fmt: skip
    except BaseException as err:  # noqa: BLE001 - a forked child reports, never raises
        shim.kill_quietly(pid, signal.SIGKILL)  # restored, but nobody would record its end
        message = err.one_line() if isinstance(err, LabkitError) else f"{type(err).__name__}: {err}"
        handshake.send(report_w, f"error {message}")
        os._exit(1)
    shim.MONITORED[state.id] = (pid, cg, proc.start_time(pid))
    handshake.send(report_w, "restored")
    os.close(report_w)
    os._exit(shim.monitor(state.id))


def _criu_restore(state: State, spec: Spec, cg, criu: str, external: dict) -> int:
    """Open what criu must inherit, mount the root, run criu restore; init's pid."""
    images = images_dir(state.id)
    argv = [criu, "restore", "--images-dir", str(images), "--pidfile", str(images / "restore.pid"),
            "--restore-detached", "--restore-sibling", "--file-locks"]  # fmt: skip
    # Opened before the mount namespace below: the files' mounts are then the host's,
    # where a later checkpoint finds them again.
    fds = []
    for key, path, flags in external["files"]:
        fds.append(os.open(path, flags | os.O_CLOEXEC))
        argv += ["--inherit-fd", f"fd[{fds[-1]}]:{key}"]
    if external["netns"]:
        fds.append(os.open(external["netns"], os.O_RDONLY | os.O_CLOEXEC))
        argv += ["--inherit-fd", f"fd[{fds[-1]}]:netns"]
    for mountpoint, host_path in external["mounts"].items():
        argv += ["--external", f"mnt[{mountpoint}]:{host_path}"]
    # The overlay root again, in a mount namespace of this shim's own: --root must be a mount
    root = str(spec.rootfs_path(state.bundle))
    syscalls.unshare(CloneFlags.CLONE_NEWNS)
    mounts.make_private("/")
    filesystem.mount_rootfs(spec, root)
    argv += ["--root", root]
    (images / "restore.pid").unlink(missing_ok=True)
    _run_criu(argv, "restore", state.id, pass_fds=tuple(fds), preexec=cg.join)  # criu starts in the cgroup
    for fd in fds:
        os.close(fd)
    mounts.unmount(root, lazy=True)  # the container has its own copy of the mount now
    return int((images / "restore.pid").read_text())
