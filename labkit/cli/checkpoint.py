"""``labkit checkpoint [--leave-running] NAME`` and ``labkit restore NAME``: CRIU.

    COUNT='i=0; while :; do echo $i; i=$((i+1)); sleep 1; done'
    labkit run -d --name counter --network none busybox sh -c "$COUNT"
    labkit checkpoint counter   # saved to files, then stopped: ps -a says Exited (137)
    labkit restore counter      # running again, counting on from where it was

Docker spells them ``docker checkpoint create [--leave-running] NAME CHECKPOINT`` and
``docker start --checkpoint CHECKPOINT NAME``; labkit keeps one checkpoint per container,
so neither needs a checkpoint name. How it works, and what labkit tells criu:
labkit.runtime.checkpoint.

Layer: the CLI. Calls labkit.runtime.checkpoint.
"""

from __future__ import annotations

import argparse

from labkit.cli.containers import resolve


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command == "checkpoint":
        p.add_argument("--leave-running", action="store_true",
                       help="let the container run on after the checkpoint")
    p.add_argument("container")


def run(command: str, args: argparse.Namespace) -> int:
    from labkit.runtime import checkpoint

    cid = resolve(args.container)
    if command == "checkpoint":
        checkpoint.checkpoint(cid, leave_running=args.leave_running)
    else:
        checkpoint.restore(cid)
    print(args.container)
    return 0
