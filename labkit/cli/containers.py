"""``labkit ps / exec / logs / port / stop / kill / rm / pause / unpause / stats / inspect /
images``: Docker's container commands, with Docker's flag names and meanings. ``labkit
run`` has a module of its own (run.py); both find containers with ``resolve`` here.

Networking, as Docker's: ``--network bridge`` (the default) puts the container on
labkit0 with an address, NAT and the ``-p`` ports; ``none`` gives it a namespace with
only ``lo``; ``host`` leaves it in the host's; ``container:NAME`` joins another's.
labkit.engine.endpoints makes all of it before the container is created, and releases
it when the container is removed (``container.POSTSTOP``).

Layer: the CLI (the docker client). Calls labkit.runtime and labkit.engine.images.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from labkit.cli import runflags
from labkit.engine.images import human_age
from labkit.errors import InvalidValue, LabkitError, NotFound
from labkit.kernel import proc
from labkit.runtime.status import ACTIVE, Status, check


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError("expected a number of seconds, 0 or more, e.g. 10")
    return seconds


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command == "ps":
        p.add_argument("-a", "--all", action="store_true", help="show stopped containers too")
        p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    elif command == "exec":
        p.add_argument("-i", "--interactive", action="store_true")
        p.add_argument("-t", "--tty", action="store_true")
        p.add_argument("-e", "--env", action="append", default=[])
        p.add_argument("-w", "--workdir")
        p.add_argument("-u", "--user")
        p.add_argument("container")
        p.add_argument("cmd", nargs=argparse.REMAINDER)
    elif command == "stop":
        p.add_argument("-t", "--time", type=_seconds, default=10.0, help="seconds before SIGKILL (default 10)")
        p.add_argument("containers", nargs="+")
    elif command == "kill":
        p.add_argument("-s", "--signal", default="KILL", help="signal name or number (default KILL)")
        p.add_argument("containers", nargs="+")
    elif command == "rm":
        p.add_argument("-f", "--force", action="store_true", help="kill a running container first")
        p.add_argument("containers", nargs="+")
    elif command == "stats":
        p.add_argument("--no-stream", action="store_true", help="print one sample and exit")
        p.add_argument("containers", nargs="*")
    elif command in ("logs", "port"):
        p.add_argument("container")
    elif command in ("pause", "unpause", "inspect"):
        p.add_argument("containers", nargs="+")


def run(command: str, args: argparse.Namespace) -> int:
    return globals()[f"cmd_{command}"](args)


# -- finding containers -------------------------------------------------------------------


def resolve(ref: str) -> str:
    """A container id from a full id, a unique id prefix, or a name."""
    from labkit.runtime import container

    states = container.list_states()
    for s in states:
        if s.id == ref or s.name == ref:
            return s.id
    matches = [s.id for s in states if len(ref) >= 3 and s.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidValue("container id prefix", ref, "more digits: several containers start with it")
    raise NotFound(f"no such container: {ref}")


def _each(refs: list[str], action) -> int:
    code = 0
    for ref in refs:
        try:
            action(resolve(ref))
            print(ref)
        except LabkitError as err:
            print(f"labkit: {err.one_line()}", file=sys.stderr)
            code = 1
    return code


def network_hooks() -> None:
    """Have every delete in this process (and its shims) release the container's network
    (and its --userns=auto ids)."""
    from labkit.runtime import container

    if _release_network not in container.POSTSTOP:
        container.POSTSTOP.append(_release_network)


def _release_network(container_id: str) -> None:
    """The container's network, and its slice of host ids (--userns=auto, engine/userns.py)."""
    from labkit import paths

    if (paths.endpoints_dir() / f"{container_id}.json").exists():  # no import when there is none
        from labkit.engine import endpoints

        endpoints.release(container_id)
    (paths.images_dir() / "userns" / "leases" / container_id).unlink(missing_ok=True)


# -- the other verbs ----------------------------------------------------------------------


def cmd_ps(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    states = [s for s in container.list_states() if args.all or s.status in ACTIVE]
    if args.quiet:
        for s in reversed(states):
            print(s.id[:12])
        return 0
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES")]
    now = time.time()
    for s in reversed(states):  # newest first, as docker ps
        command = " ".join(s.command)
        command = json.dumps(command if len(command) <= 20 else command[:19] + "…", ensure_ascii=False)
        rows.append((s.id[:12], s.image or "-", command, human_age(now - s.created) + " ago", _status(s, now),
                     _ports(s.id), s.name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _ports(container_id: str) -> str:
    """docker ps's PORTS: ``0.0.0.0:8080->80/tcp, ...`` (read from the lease, if any)."""
    from labkit import paths

    lease = paths.endpoints_dir() / f"{container_id}.json"
    if not lease.exists():
        return ""
    from labkit.engine import endpoints

    return ", ".join(str(p) for p in endpoints.ports_of(container_id))


def _status(s, now: float) -> str:
    if s.status is Status.RUNNING:
        return f"Up {human_age(now - s.started)}"
    if s.status is Status.PAUSED:
        return f"Up {human_age(now - s.started)} (Paused)"
    if s.status is Status.STOPPED:
        code = "?" if s.exit_code is None else s.exit_code
        when = f" {human_age(now - s.finished)} ago" if s.finished else ""
        return f"Exited ({code}){when}" + (" (OOM killed)" if s.oom_killed else "")
    return s.status.value.capitalize()


def cmd_exec(args: argparse.Namespace) -> int:
    from labkit.runtime import container, execute

    if not args.cmd:
        raise InvalidValue("command", "", "a command to run, e.g. labkit exec web1 sh")
    cid = resolve(args.container)
    uid = gid = None
    if args.user:
        state = container.load(cid)
        check("exec", cid, state.status)
        # the container's own view of its files: its rootfs overlay is mounted only in its
        # mount namespace, and /proc/PID/root looks through init's root into it
        uid, gid = runflags.user_ids(args.user, [f"/proc/{state.pid}/root"])
    for item in args.env:
        if "=" not in item:
            raise InvalidValue("environment variable", item, "KEY=VALUE")
    if args.tty:
        from labkit.runtime import tty

        master, slave, _ = tty.open_pty()
        pid = execute.exec_in(cid, args.cmd, env=args.env, cwd=args.workdir, uid=uid, gid=gid,
                              stdio=container.Stdio(slave, slave, slave), terminal=True, wait=False)  # fmt: skip
        os.close(slave)
        exited = []

        def done() -> bool:
            if not exited:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    exited.append(status)  # keep the status: it is the exit code to return
            return bool(exited)

        tty.relay(master, done)
        os.close(master)
        if not exited:  # the usual way out: the pty closed before done() reaped the process
            exited.append(os.waitpid(pid, 0)[1])
        return proc.exit_code(exited[0])
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        stdio = container.Stdio(0 if args.interactive else null, 1, 2)
        return execute.exec_in(cid, args.cmd, env=args.env, cwd=args.workdir, uid=uid, gid=gid, stdio=stdio)
    finally:
        os.close(null)


def cmd_logs(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    path = container.log_path(resolve(args.container))
    if path.exists():
        with open(path, "rb") as f:
            sys.stdout.buffer.write(f.read())
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    return _each(args.containers, lambda cid: container.stop(cid, args.time, _stop_signal(cid)))


def _stop_signal(cid: str) -> int:
    """The StopSignal of the container's image (``STOPSIGNAL`` in its Dockerfile)."""
    from labkit.engine import images
    from labkit.runtime import container

    try:
        name = images.get(container.load(cid).image).config.stop_signal
    except LabkitError:  # no image (a bundle), or it was removed since
        name = ""
    return parse_signal(name) if name else signal.SIGTERM


def cmd_kill(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    sig = parse_signal(args.signal)
    return _each(args.containers, lambda cid: container.kill(cid, sig))


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit() and 0 < int(name) < signal.NSIG:
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise InvalidValue("signal", text, "a name like TERM, SIGKILL or a number like 9") from None


def cmd_rm(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    network_hooks()
    return _each(args.containers, lambda cid: container.delete(cid, force=args.force))


def cmd_port(args: argparse.Namespace) -> int:
    """``docker port NAME``: ``80/tcp -> 0.0.0.0:8080``, one line per published port."""
    from labkit.engine import endpoints

    for p in endpoints.ports_of(resolve(args.container)):
        print(f"{p.container_port}/{p.proto} -> {p.host_ip}:{p.host_port}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    return _each(args.containers, container.pause)


def cmd_unpause(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    return _each(args.containers, container.resume)


def cmd_inspect(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    out = []
    for ref in args.containers:
        try:
            cid = resolve(ref)
        except NotFound:
            from labkit.engine import images

            img = images.get(ref) if ":" in ref or ref in {i.name for i in images.list_images()} else None
            if img is None:
                raise
            out.append({"Id": img.id, "RepoTags": [img.ref], "Created": img.created, "Size": img.size_bytes,
                        "Config": img.config.to_oci(), "Layers": [str(p) for p in img.layers]})  # fmt: skip
            continue
        s = container.load(cid)
        doc = s.to_json()
        doc["State"] = {"Status": s.status.value, "Pid": s.pid if s.status is not Status.STOPPED else 0,
                        "ExitCode": s.exit_code, "OOMKilled": s.oom_killed}  # fmt: skip
        doc["Config"] = container.spec_of(cid).to_oci()
        doc["LogPath"] = str(container.log_path(cid))
        out.append(doc)
    print(json.dumps(out, indent=4))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from labkit.engine import images

    print(images.format_table(images.list_images()))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from labkit.kernel import cgroups
    from labkit.runtime import container

    ids = [resolve(r) for r in args.containers] or [s.id for s in container.list_states()
                                                      if s.status in (Status.RUNNING, Status.PAUSED)]  # fmt: skip
    groups = {}
    for cid in ids:
        try:
            groups[cid] = (container.load(cid), cgroups.open(container.load(cid).cgroup))
        except NotFound:
            continue
    for _ in range(1 if args.no_stream else 10**6):
        before = {cid: (time.monotonic(), cg.stats()) for cid, (_, cg) in groups.items()}
        time.sleep(0.5)
        rows = [("CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS")]
        for cid, (s, cg) in groups.items():
            try:
                now = cg.stats()
            except LabkitError:
                continue
            t0, old = before[cid]
            cpu = ((now.cpu_usage_ns or 0) - (old.cpu_usage_ns or 0)) / ((time.monotonic() - t0) * 1e9) * 100
            limit = now.memory_limit or _host_memory()
            mem = now.memory_current or 0
            rows.append((cid[:12], s.name, f"{cpu:.2f}%", f"{_size(mem)} / {_size(limit)}",
                         f"{mem / limit * 100:.2f}%", str(now.pids_current or 0)))  # fmt: skip
        if not args.no_stream:
            print("\033[2J\033[H", end="")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)
        if args.no_stream:
            break
    return 0


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.4g}{unit}"
        n /= 1024
    return f"{n}"
