"""``labkit runtime``: runc's command line over an OCI bundle.

A bundle is a directory with a ``config.json`` (the OCI runtime spec) and the root
filesystem it names. The same bundle runs under both tools:

    labkit runtime spec --bundle b      |  runc spec --bundle b
    labkit runtime run --bundle b c1    |  runc run --bundle b c1
    labkit runtime create --bundle b c1 / start c1 / state c1 / kill c1 KILL / delete c1

``labkit runtime spec`` writes what ``runc spec`` writes (3 capabilities, read-only root,
a terminal, hostname "runc"); ``labkit run`` uses Docker's defaults instead.

Layer: the CLI. Calls labkit.runtime.
"""

from __future__ import annotations

import argparse
import json
import os

from labkit.errors import AlreadyExists, InvalidValue
from labkit.runtime.spec import OCI_VERSION
from labkit.runtime.status import Status

VERBS = ("spec", "create", "start", "state", "kill", "delete", "run", "list")


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(VERBS) + "}")
    s = sub.add_parser("spec", help="write a config.json like runc spec's")
    s.add_argument("-b", "--bundle", default=".")
    for verb in ("create", "run"):
        s = sub.add_parser(verb)
        s.add_argument("-b", "--bundle", default=".")
        s.add_argument("-d", "--detach", action="store_true") if verb == "run" else None
        s.add_argument("id")
    for verb in ("start", "state"):
        sub.add_parser(verb).add_argument("id")
    s = sub.add_parser("kill")
    s.add_argument("id")
    s.add_argument("signal", nargs="?", default="TERM")
    s = sub.add_parser("delete")
    s.add_argument("-f", "--force", action="store_true")
    s.add_argument("id")
    sub.add_parser("list")


def run(command: str, args: argparse.Namespace) -> int:
    from labkit.runtime import container
    from labkit.runtime.spec import Spec

    if args.verb == "spec":
        path = os.path.join(args.bundle, "config.json")
        if os.path.exists(path):
            raise AlreadyExists(f"{path} already exists; remove it first")
        Spec.runc().save(args.bundle)
        return 0
    if args.verb in ("create", "run"):
        spec = Spec.load(args.bundle)
        bundle = os.path.abspath(args.bundle)
        if args.verb == "create" or args.detach:
            return _detached(args.id, spec, bundle, start=args.verb == "run")
        return _foreground(args.id, spec, bundle)
    if args.verb == "start":
        container.start(args.id)
    elif args.verb == "state":
        s = container.load(args.id)
        pid = s.pid if s.status is not Status.STOPPED else 0
        print(json.dumps({"ociVersion": OCI_VERSION, "id": s.id, "pid": pid, "status": s.status.value,
                          "bundle": s.bundle, "created": s.created, "annotations": {}}, indent=2))  # fmt: skip
    elif args.verb == "kill":
        from labkit.cli.containers import parse_signal

        container.kill(args.id, parse_signal(args.signal))
    elif args.verb == "delete":
        container.delete(args.id, force=args.force)
    elif args.verb == "list":
        print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} BUNDLE")
        for s in container.list_states():
            print(f"{s.id:<20} {s.pid:<8} {s.status.value:<10} {s.bundle}")
    return 0


def _detached(container_id: str, spec, bundle: str, start: bool) -> int:
    from labkit.runtime import container

    if spec.terminal:
        raise InvalidValue("process.terminal", True, "false for a detached container (labkit has no console socket)")
    container.create(container_id, spec, bundle=bundle, stdio=container.Stdio(0, 1, 2), detach=True)
    if start:
        container.start(container_id)
    return 0


def _foreground(container_id: str, spec, bundle: str) -> int:
    """runc run: create, start, wait; the container is deleted when it exits."""
    from labkit.runtime import container

    master = None
    if spec.terminal:
        from labkit.runtime import tty

        master, slave, path = tty.open_pty()
        container.create(container_id, spec, bundle=bundle, stdio=container.Stdio(slave, slave, slave),
                         detach=False, console=path, pty_master=master)  # fmt: skip
        os.close(slave)
    else:
        # no shim: like runc run, this process is the container's monitor (see container.py)
        container.create(container_id, spec, bundle=bundle, stdio=container.Stdio(0, 1, 2), detach=False,
                         monitor_here=True)  # fmt: skip
    try:
        container.start(container_id)
        if master is not None:
            from labkit.runtime import tty

            tty.relay(master, lambda: container.load(container_id).status is Status.STOPPED)
        code = container.wait_shim(container_id)
    finally:  # also on Ctrl-C or a failed start: runc run leaves no container behind
        if master is not None:
            os.close(master)
        container.delete(container_id, force=True)
    return code
