"""Start a process in new namespaces, as unshare(1) does: fork, then unshare(2) in the child.

- ``spawn(...)``: start an argv (or a Python callable) in new namespaces; a ``Process``.
- ``run(...)``: the same, wait for it, and return what it printed (for notebooks).
- ``set_time_offsets(...)``: shift a new time namespace's clocks (the runtime's init too).

With a new PID namespace the child is born PID 1 there (``syscalls.fork_as_pid1``).
With a new user namespace the child makes it first and the parent writes its id maps
(user_namespaces(7)); with a new mount namespace the child makes its mounts private,
and may pivot_root into a new root and mount /proc.

Man pages: unshare(2), unshare(1), pid_namespaces(7), user_namespaces(7), time_namespaces(7).
Layer: kernel. Used by the notebooks and the tests (the runtime has its own init, which
borrows ``set_time_offsets``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Sequence

from labkit.errors import InvalidValue, LabkitError, Unsupported, require_root
from labkit.kernel import mounts, syscalls
from labkit.kernel.namespaces import child as child_
from labkit.kernel.namespaces.child import Completed, Process
from labkit.kernel.namespaces.kinds import Kind, kinds
from labkit.kernel.syscalls import CloneFlags, MountFlags

IdMap = Sequence[tuple[int, int, int]]


def _id_map(value: str | IdMap | None, own_id: int) -> list[tuple[int, int, int]] | None:
    """'root' maps id 0 inside to the caller's id; or a list of (inside, outside, count)."""
    if value is None:
        return None
    if value == "root":
        return [(0, own_id, 1)]
    try:
        rows = [(int(a), int(b), int(c)) for a, b, c in value]  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidValue("id map", value, "'root' or a list of (inside, outside, count)") from None
    if not rows or any(n <= 0 or a < 0 or b < 0 for a, b, n in rows):
        raise InvalidValue("id map", value, "non-negative ids and a positive count")
    return rows


def spawn(
    target: Sequence[str] | Callable[[], object],
    new: Iterable[str | Kind] = (),
    *,
    hostname: str | None = None,
    root: str | os.PathLike | None = None,
    mount_proc: bool | None = None,
    uid_map: str | IdMap | None = None,
    gid_map: str | IdMap | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: object = None,
    stdout: object = None,
    stderr: object = None,
    time_offsets: dict[str, float] | None = None,
    pdeathsig: int | None = signal.SIGKILL,
    _result_fd: int | None = None,
) -> Process:
    """Start ``target`` (an argv list, or a Python callable) in new namespaces.

    >>> with spawn(["hostname"], new={"uts"}, hostname="box") as p:  # doctest: +SKIP
    ...     p.wait()

    ``mount_proc`` defaults to True when both the PID and the mount namespace are new:
    /proc shows the processes of the PID namespace of whoever mounted it, so a process
    in a new PID namespace still sees the host's processes until /proc is mounted again.

    ``time_offsets`` (with a new time namespace) shifts the clocks inside, e.g.
    ``{"boottime": 86400}`` makes the machine look a day older; "monotonic" works too.
    """
    new_kinds = kinds(new)
    if not callable(target):
        argv = [os.fspath(a) for a in target]
        if not argv:
            raise InvalidValue("command", target, "a non-empty list like ['sh', '-c', 'echo hi']")
    else:
        argv = []
    if hostname is not None and Kind.UTS not in new_kinds:
        raise InvalidValue("option hostname", hostname, "new={'uts', ...}: a new UTS namespace")
    if root is not None and Kind.MNT not in new_kinds:
        raise InvalidValue("option root", root, "new={'mnt', ...}: pivot_root needs a mount namespace")
    if mount_proc is None:
        mount_proc = {Kind.PID, Kind.MNT} <= new_kinds
    if mount_proc and Kind.MNT not in new_kinds:
        raise InvalidValue("option mount_proc", True, "new={'mnt', ...}: or /proc would change for the host")
    if time_offsets and Kind.TIME not in new_kinds:
        raise InvalidValue("option time_offsets", time_offsets, "new={'time', ...}")
    for clock in time_offsets or {}:
        if clock not in ("monotonic", "boottime"):
            raise InvalidValue("clock", clock, "'monotonic' or 'boottime'")
    uids = _id_map(uid_map, os.getuid())
    gids = _id_map(gid_map, os.getgid())
    if (uids or gids) and Kind.USER not in new_kinds:
        raise InvalidValue("uid_map/gid_map", uid_map or gid_map, "new={'user', ...}")
    if new_kinds - {Kind.USER}:
        require_root("creating namespaces (" + " ".join(sorted(k.value for k in new_kinds)) + ")")
    if root is not None and not os.path.isdir(root):
        raise InvalidValue("root directory", os.fspath(root), "an existing directory")
    stdio = [x if x is None or isinstance(x, int) else x.fileno() for x in (stdin, stdout, stderr)]

    # Without a user or time namespace, the parent can make the child PID 1 directly;
    # otherwise the child makes the PID namespace (owned by its new user namespace) and
    # forks once more.
    pid_here = Kind.PID in new_kinds and not new_kinds & {Kind.USER, Kind.TIME}
    flags = 0
    for k in new_kinds - {Kind.USER} - ({Kind.PID} if pid_here else set()):
        flags |= k.flag
    rd, wr = os.pipe2(os.O_CLOEXEC)
    go_rd, go_wr = os.pipe2(os.O_CLOEXEC) if Kind.USER in new_kinds else (-1, -1)
    child = syscalls.fork_as_pid1() if pid_here else syscalls.fork()
    if child == 0:  # ---- in the child: never return, never raise
        os.close(rd)
        if go_wr >= 0:  # only the parent may hold it: its closing is our "give up"
            os.close(go_wr)
        try:
            if pdeathsig:
                syscalls.prctl(syscalls.Prctl.PR_SET_PDEATHSIG, pdeathsig)
            if Kind.USER in new_kinds:
                _become_root_in_new_userns(wr, go_rd, uids, gids)
            if flags:
                syscalls.unshare(flags)
            if time_offsets:
                _set_time_offsets(time_offsets)
            if (Kind.PID in new_kinds and not pid_here) or Kind.TIME in new_kinds:
                child_.fork_into_pid_namespace(wr, pdeathsig)  # returns only in the grandchild
            _set_up_and_run(
                wr, target, argv, new_kinds, hostname, root, mount_proc, env, cwd, stdio, _result_fd
            )
        except BaseException as err:  # noqa: BLE001 - report everything to the parent
            child_.report(wr, err)
            os._exit(127)
        os._exit(0)

    # ---- in the parent
    os.close(wr)
    if go_rd >= 0:
        os.close(go_rd)
    return child_.await_child(child, rd, go_wr, lambda pid: _write_id_maps(pid, uids, gids))


def _become_root_in_new_userns(wr: int, go_rd: int, uids, gids) -> None:
    """unshare(CLONE_NEWUSER), then wait while the parent writes our id maps.

    A process cannot write a useful map for itself: the parent, still in the old user
    namespace, writes /proc/CHILD/{setgroups,uid_map,gid_map}. Until then every id of
    the child shows as the overflow id 65534 ("nobody").
    """
    syscalls.unshare(CloneFlags.CLONE_NEWUSER)
    child_.send(wr, b"U")
    if os.read(go_rd, 1) != b"g":
        raise LabkitError("the parent did not write the user namespace's id maps")
    if gids and any(a == 0 for a, _, _ in gids):
        os.setresgid(0, 0, 0)
    if uids and any(a == 0 for a, _, _ in uids):
        os.setresuid(0, 0, 0)  # root inside; on the host still the mapped id


def _write_id_maps(pid: int, uids, gids) -> None:
    write_id_maps(pid, uids, gids, allow_setgroups=False)


def write_id_maps(pid: int, uids, gids, *, allow_setgroups: bool, helpers: bool = False) -> None:
    """Write /proc/PID/uid_map and gid_map: rows of (id inside, id outside, count).

    setgroups(2) must be denied before an unprivileged process may write gid_map. spawn()
    always denies it, so a mapped root cannot drop itself out of a group to gain access.
    A container runtime that is root on the host may leave it allowed (``allow_setgroups``),
    as runc does, so that the container's user gets its additional groups.

    An ordinary user may map only their own uid, one line. ``helpers`` writes the maps
    with newuidmap(1) and newgidmap(1) instead (Debian's uidmap package): set-uid programs
    that write any range /etc/subuid and /etc/subgid give the user, as rootless podman does.
    A map of the user's own id alone needs no helper.
    """
    if helpers and (len(uids) > 1 or len(gids) > 1):
        _map_with_helpers(pid, uids, gids)
        return
    if not allow_setgroups or os.geteuid() != 0:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    for name, rows in (("uid_map", uids), ("gid_map", gids)):
        if rows:
            text = "".join(f"{a} {b} {n}\n" for a, b, n in rows)
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
            except OSError as err:  # the kernel checks the map as a whole, at this write
                raise syscalls.SyscallError(
                    err.errno or 22, "write", f"/proc/{pid}/{name}, {text.strip()!r}",
                    "ranges must not overlap, and at most 340 lines" if err.errno == 22 else "",
                ) from None


def _map_with_helpers(pid: int, uids, gids) -> None:
    import shutil  # (here: only rootless containers need it)
    import subprocess

    for tool, rows in (("newuidmap", uids), ("newgidmap", gids)):
        path = shutil.which(tool) or f"/usr/bin/{tool}"
        args = [path, str(pid), *(str(x) for row in rows for x in row)]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
        except FileNotFoundError:
            raise Unsupported(f"{tool} is not installed (Debian: apt-get install uidmap)") from None
        if done.returncode != 0:
            raise InvalidValue(f"{tool} {' '.join(args[2:])}", done.stderr.strip().splitlines()[-1:] or done.returncode,
                               "ranges that /etc/subuid and /etc/subgid give this user")  # fmt: skip


def _set_time_offsets(offsets: dict[str, float]) -> None:
    as_pairs = {}
    for clock, secs in offsets.items():
        whole = int(secs // 1)
        as_pairs[clock] = (whole, int((secs - whole) * 1e9))
    set_time_offsets(as_pairs)


def set_time_offsets(offsets: dict[str, tuple[int, int]]) -> None:
    """Shift the clocks of the time namespace this process has just unshared(2).

    ``offsets`` maps "monotonic" or "boottime" to (seconds, nanoseconds), as
    /proc/self/timens_offsets takes them (time_namespaces(7)). The kernel accepts them
    only after unshare(CLONE_NEWTIME) and before the first process enters the new
    namespace: the caller's next child, or the caller itself at its next execve(2).
    """
    text = "".join(f"{clock} {secs} {nanosecs}\n" for clock, (secs, nanosecs) in offsets.items())
    try:
        with open("/proc/self/timens_offsets", "w") as f:
            f.write(text)
    except OSError as err:  # EINVAL: a clock would go below 0; EACCES: a process is in already
        raise syscalls.SyscallError(
            err.errno or 22, "write", f"/proc/self/timens_offsets, {text.strip()!r}",
            "no clock may go below zero, and only before a process enters the namespace",
        ) from None


def _set_up_and_run(wr, target, argv, new_kinds, hostname, root, mount_proc, env, cwd, stdio, result_fd):
    if Kind.MNT in new_kinds:
        # A new mount namespace starts as a copy whose mounts still propagate to and from
        # the host's ("shared", the systemd default). Make all of / private first, so
        # nothing we mount below leaks out.
        mounts.make_private("/")
    if hostname is not None:
        syscalls.sethostname(hostname)
    if root is not None:  # pivot_root needs a mount point: bind the directory onto itself
        mounts.bind(root, root)
        mounts.pivot_into(root)
    if mount_proc:
        syscalls.mount("proc", "/proc", "proc", MountFlags.MS_NOSUID | MountFlags.MS_NODEV | MountFlags.MS_NOEXEC)
    if cwd is not None:
        os.chdir(cwd)
    child_.exec_target(wr, target, argv, env, stdio, result_fd)


def run(
    target: Sequence[str] | Callable[[], object],
    new: Iterable[str | Kind] = (),
    *,
    timeout: float | None = 30,
    **options: object,
) -> Completed:
    """Like ``spawn``, but wait for the end and return the output and exit code.

    A Python callable's return value comes back as ``.value``:

    >>> run(lambda: socket.gethostname(), new={"uts"}, hostname="box").value  # doctest: +SKIP
    'box'
    """
    return child_.collect(lambda inp, out, err, res: spawn(target, new, stdin=inp, stdout=out,
                                                           stderr=err, _result_fd=res, **options), timeout)
