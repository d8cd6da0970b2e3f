"""Run another process inside a running container, as ``docker exec`` and ``runc exec`` do.

A container is nothing but a set of namespaces and a cgroup that its processes share.
Joining one later takes the same steps as nsenter(1), plus the cgroup:

    fork ---- child: setns(pid)          (applies to the child's next child only)
                fork --- grandchild: join the container's cgroup (write 0 to cgroup.procs)
                                     setns(ipc, uts, net, cgroup, time, mnt): mnt after those,
                                       since after it every path resolves inside the container;
                                     setns(user) last: as root of the host we may join the others
                                       first; then setresuid(0): root inside, the mapped uid outside
                                     capabilities, uid/gid, cwd, env: as the container's
                                     execve(command)
              child waits and exits with the grandchild's code

Man pages: setns(2), nsenter(1), pid_namespaces(7).
Layer: runtime. Used by the CLI (labkit exec) and the notebooks.
"""

from __future__ import annotations

import os

from labkit.errors import ExecFailed, LabkitError
from labkit.kernel import cgroups, proc, syscalls
from labkit.runtime import handshake, init
from labkit.runtime.container import load, spec_of
from labkit.runtime.spec import NAMESPACES
from labkit.runtime.status import check
from labkit.runtime.stdio import Stdio, set_stdio

# setns order: the pid namespace first (it only affects children), then the mount one, and
# the user namespace last: inside it we would have no right over the host's network namespace
_ORDER = ("pid", "ipc", "uts", "network", "cgroup", "time", "mount", "user")


def exec_in(
    container_id: str,
    args: list[str],
    *,
    env: list[str] | None = None,
    cwd: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    stdio: Stdio | None = None,
    terminal: bool = False,
    wait: bool = True,
) -> int:
    """Run ``args`` in the container; return its exit code (or its host pid with wait=False)."""
    state = load(container_id)
    check("exec", container_id, state.status)
    base = spec_of(container_id)
    changes: dict = {"args": tuple(args), "terminal": terminal}
    if env:
        changes["env"] = tuple(base.env) + tuple(env)
    if cwd:
        changes["cwd"] = cwd
    if uid is not None:
        changes.update(uid=uid, gid=gid if gid is not None else uid)
    # exec mounts nothing and joins init's namespaces through /proc: what init joined or
    # mounted by host path may be gone by now (the container whose network namespace and
    # /etc files this one shares, --network container:, was removed), the namespaces not
    changes["mounts"] = ()
    changes["namespace_paths"] = tuple((ns, f"/proc/{state.pid}/ns/{NAMESPACES[ns]}") for ns, _ in base.namespace_paths)
    spec = base.replace(**changes).validate()
    cg = cgroups.open(state.cgroup) if cgroups.may_create() else cgroups.NoCgroup()  # (rootless: none)
    # open the namespace files now: if init dies meanwhile, they still name its namespaces;
    # the ones it joined by path count too (the engine's network namespace, --network container:)
    joined = {ns for ns, _ in spec.namespace_paths}
    ns_fds = {}
    for ns in _ORDER:
        if ns in spec.namespaces or ns in joined:
            ns_fds[ns] = os.open(f"/proc/{state.pid}/ns/{NAMESPACES[ns]}", os.O_RDONLY | os.O_CLOEXEC)
    err_r, err_w = os.pipe()
    stdio = stdio or Stdio(0, 1, 2)
    child = syscalls.fork()
    if child == 0:
        try:
            os.close(err_r)
            if "user" in ns_fds and os.geteuid() != 0:
                # rootless we have no right over namespaces on the host: only as root of
                # the container's user namespace, which owns the others, may we join them
                syscalls.setns(ns_fds.pop("user"), syscalls.CloneFlags.CLONE_NEWUSER)
            if "pid" in ns_fds:
                syscalls.setns(ns_fds.pop("pid"), syscalls.CloneFlags.CLONE_NEWPID)
            grandchild = syscalls.fork()
            if grandchild == 0:
                _enter(spec, cg, ns_fds, stdio, err_w)
            os.close(err_w)
            os._exit(proc.exit_code(os.waitpid(grandchild, 0)[1]))
        except BaseException as err:  # noqa: BLE001 - nothing may escape a forked child
            handshake.send(err_w, f"error 1 exec: {err}")
        finally:
            os._exit(1)
    for fd in (err_w, *ns_fds.values()):
        os.close(fd)
    with os.fdopen(err_r, "r") as report:
        message = report.read().strip()  # EOF once execve succeeded (the pipe is CLOEXEC)
    if message:
        os.waitpid(child, 0)
        _, code, text = message.split(" ", 2)
        raise ExecFailed(text, int(code))
    if not wait:
        return child
    return proc.exit_code(os.waitpid(child, 0)[1])


def _enter(spec, cg, ns_fds: dict[str, int], stdio: Stdio, err_w: int) -> None:
    try:
        cg.add(0)  # 0: "the process writing this"; before setns(mnt) hides the host's /sys
        seccomp_filter = init.compile_seccomp(spec)  # the container's filter, as Docker's exec
        for fd in ns_fds.values():
            syscalls.setns(fd, 0)
            os.close(fd)
        if "user" in spec.namespaces:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        set_stdio(stdio, spec.terminal)
        os.chdir("/")
        exe = init.find_executable(spec)
        init.finish_and_exec(spec, exe, seccomp_filter)
    except init.InitError as err:
        handshake.send(err_w, f"error {err.code} {err}")
        os._exit(err.code)
    except LabkitError as err:
        handshake.send(err_w, f"error 1 {err.one_line()}")
    except BaseException as err:  # noqa: BLE001 - nothing may escape a forked child
        handshake.send(err_w, f"error 1 exec: {err}")
    os._exit(1)
