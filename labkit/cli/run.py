"""``labkit run``: Docker's ``docker run``, with its flag names and meanings.

``run`` builds a Spec from the image's config and the flags (runflags.py, Docker's
defaults otherwise), attaches the container's network, creates and starts the container,
and, in the foreground, waits for it and exits with its exit code.

Networking, as Docker's: ``--network bridge`` (the default) puts the container on
labkit0 with an address, NAT and the ``-p`` ports; ``none`` gives it a namespace with
only ``lo``; ``host`` leaves it in the host's; ``container:NAME`` joins another's.
labkit.engine.endpoints makes all of it before the container is created, and releases
it when the container is removed (``container.POSTSTOP``, see containers.network_hooks).

Layer: the CLI (the docker client). Calls labkit.runtime and labkit.engine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal

from labkit.cli import runflags
from labkit.cli.containers import network_hooks, resolve
from labkit.errors import AlreadyExists, InvalidValue, LabkitError
from labkit.runtime.status import Status, check

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_ADJECTIVES = ["brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry", "nifty", "proud", "quiet", "sharp", "swift", "tender", "vivid", "witty", "zesty", "bold"]  # fmt: skip
_PEOPLE = ["curie", "hopper", "lovelace", "turing", "noether", "ritchie", "thompson", "torvalds", "hamilton", "babbage", "shannon", "dijkstra", "knuth", "liskov", "lamport", "tanenbaum", "stallman", "allen", "goldberg", "wozniak"]  # fmt: skip


def _limit(name: str):
    """A type= for a limit flag: the value is checked as the parser reads it, so that a
    bad one is reported with its flag (``invalid argument "-5m" for "-m, --memory" flag``).
    It stays text; ``Limits.parse`` reads it again with the others when the spec is made."""

    def check(text: str) -> str:
        from labkit.kernel.cgroups.limits import Limits

        try:
            Limits.parse(**{name: text})
        except InvalidValue as err:
            raise argparse.ArgumentTypeError(f"expected {err.accepted}") from None
        return text

    return check


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print the id")
    p.add_argument("--name", help="a name for the container")
    p.add_argument("-m", "--memory", type=_limit("memory"), help="memory limit, e.g. 64m")
    p.add_argument("--memory-swap", help="memory + swap limit, -1 for unlimited swap")
    p.add_argument("--cpus", type=_limit("cpus"), help="number of CPUs, e.g. 0.5")
    p.add_argument("--cpu-shares", type=_limit("cpu_shares"), help="relative CPU weight (default 1024)")
    p.add_argument("--pids-limit", type=_limit("pids"), help="most processes at once (-1: unlimited)")
    p.add_argument("--hostname", help="the container's hostname (default: its short id)")
    p.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE (or KEY: the host's value)")
    p.add_argument("-v", "--volume", action="append", default=[], help="HOST:CONTAINER[:ro] bind mount")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="UID[:GID] (or a name from the image's /etc/passwd)")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--cap-add", action="append", default=[], help="add a capability (or ALL)")
    p.add_argument("--cap-drop", action="append", default=[], help="drop a capability (or ALL)")
    p.add_argument("--security-opt", action="append", default=[],
                   help="seccomp=unconfined, seccomp=PROFILE.json (Docker's format), no-new-privileges")
    p.add_argument("--privileged", action="store_true",
                   help="all capabilities, no seccomp, no masked paths, the host's devices")
    p.add_argument("--userns", default="host",
                   help="host (default), or auto: root inside is an unprivileged host uid from /etc/subuid")
    p.add_argument("--cgroupns", default="host",
                   help="host (default), or private: the container sees its own cgroup as /")
    p.add_argument("--network", "--net",
                   help="bridge (default; rootless: none), none (only lo), host, container:NAME or a network's name")
    p.add_argument("-p", "--publish", action="append", default=[], help="[IP:]HOST:CONTAINER[/tcp|udp]")
    p.add_argument("-P", "--publish-all", action="store_true", help="publish the image's exposed ports")
    p.add_argument("--entrypoint", help="the program to run instead of the image's ENTRYPOINT")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("image")
    p.add_argument("cmd", nargs=argparse.REMAINDER)


def run(command: str, args: argparse.Namespace) -> int:
    return cmd_run(args)


def _new_name(taken: set[str]) -> str:
    for _ in range(100):
        i = int.from_bytes(os.urandom(2), "big")
        name = f"{_ADJECTIVES[i % len(_ADJECTIVES)]}_{_PEOPLE[(i >> 8) % len(_PEOPLE)]}"
        if name not in taken:
            return name
    return f"{name}{os.urandom(2).hex()}"


def cmd_run(args: argparse.Namespace) -> int:
    from labkit.runtime import container

    container_id = os.urandom(32).hex()
    with _released_on_failure(container_id):
        spec, common = _prepare(args, container_id)
        if args.detach:
            _create_detached(container_id, spec, args, common)
            container.start(container_id)
            print(container_id)
            return 0
        return _run_foreground(container_id, spec, args, common)


def create(args: argparse.Namespace) -> str:
    """``docker create``: everything ``run -d`` does but the start; the new id. The
    Engine API's POST /containers/create comes here (labkit/cli/api)."""
    container_id = os.urandom(32).hex()
    with _released_on_failure(container_id):
        spec, common = _prepare(args, container_id)
        _create_detached(container_id, spec, args, common)
    return container_id


def _prepare(args: argparse.Namespace, container_id: str):
    """Check the name, build the spec from the image and flags, connect the network
    (the caller gives back what was taken for ``container_id`` if this fails)."""
    from labkit.runtime import container

    taken = {s.name for s in container.list_states()}
    if args.name is not None:
        if not _NAME.fullmatch(args.name):
            raise InvalidValue("container name", args.name, "letters, digits, '_', '.', '-', e.g. web1")
        if args.name in taken:
            raise AlreadyExists(f"container name {args.name!r} is already in use (labkit rm {args.name})")
    spec, image = runflags.build_spec(args, container_id)
    wanted = runflags.published(args, image)
    name = args.name or _new_name(taken)
    common = {"name": name, "image": image.ref, "auto_remove": args.rm}
    return _connect(container_id, name, spec, args.network, wanted), common


@contextlib.contextmanager
def _released_on_failure(container_id: str):
    try:
        yield
    except BaseException:
        from labkit.engine import endpoints
        from labkit.runtime.state import container_dir

        if not container_dir(container_id).exists():  # create failed early: nothing else releases it
            from labkit.engine import userns

            endpoints.release(container_id)
            userns.release(container_id)
        raise


def _connect(container_id: str, name: str, spec, mode: str, wanted: list):
    """The container's network (endpoints.connect), and the spec that joins it."""
    from labkit.engine import endpoints
    from labkit.runtime import container

    peer = None
    if mode.startswith("container:"):
        state = container.load(resolve(mode[len("container:"):]))
        check("exec", state.id, state.status)  # it must be running: we join its namespace
        peer = (state.id, state.pid)
    network_hooks()
    att = endpoints.connect(container_id, name, spec.hostname, mode, wanted, peer)
    try:
        return spec.replace(namespace_paths=spec.namespace_paths + att.join,
                            mounts=spec.mounts + att.mounts).validate()
    except BaseException:
        endpoints.release(container_id)
        raise


def _create_detached(container_id: str, spec, args, common) -> None:
    from labkit.runtime import container

    if args.tty:
        from labkit.runtime import tty

        master, slave, path = tty.open_pty()
        stdio = container.Stdio(slave, slave, slave)
        try:
            container.create(container_id, spec, stdio=stdio, detach=True, console=path, pty_master=master, **common)
        finally:
            os.close(slave)
            os.close(master)
    else:
        container.create(container_id, spec, detach=True, **common)


def _run_foreground(container_id: str, spec, args, common) -> int:
    from labkit.runtime import container

    null = os.open(os.devnull, os.O_RDONLY)
    master = None
    code = None
    try:
        if args.tty:
            from labkit.runtime import tty

            master, slave, path = tty.open_pty()
            stdio = container.Stdio(slave, slave, slave)
            state = container.create(container_id, spec, stdio=stdio, detach=False, console=path,
                                     pty_master=master, **common)  # fmt: skip
            os.close(slave)
        else:
            stdio = container.Stdio(0 if args.interactive else null, 1, 2)
            # no shim: this process lives as long as the container (see container.py)
            state = container.create(container_id, spec, stdio=stdio, detach=False, monitor_here=True, **common)
        # Ctrl-C and `kill` reach labkit: pass them on, as docker's --sig-proxy does
        def forward(sig, _frame):
            try:
                os.kill(state.pid, sig)
            except ProcessLookupError:
                pass

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            container.start(container_id)
            if master is not None:
                from labkit.runtime import tty

                tty.relay(master, lambda: container.load(container_id).status is Status.STOPPED)
            code = container.wait_shim(container_id)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        os.close(null)
        if master is not None:
            os.close(master)
        if args.rm:  # --rm also when start or the wait failed (as docker run --rm does)
            try:
                container.delete(container_id, force=True)
            except LabkitError:
                if code is not None:  # on the error path the first error is the one to show
                    raise
    return code
