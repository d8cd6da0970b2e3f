"""``labkit daemon``: start, stop or check labkitd (labkit/engine/daemon.py).

    labkit daemon start     in the background; returns once it listens
    labkit daemon stop      SIGTERM; running containers keep running
    labkit daemon status    running or not, its pid and socket
    labkit daemon run       in the foreground (what a systemd service runs)

Layer: the CLI. Calls labkit.engine.daemon.
"""

from __future__ import annotations

import argparse

VERBS = ("start", "stop", "status", "run")


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("verb", choices=VERBS, help="what to do with labkitd")


def run(command: str, args: argparse.Namespace) -> int:
    from labkit.engine import daemon
    from labkit.errors import require_root

    require_root(f"labkit daemon {args.verb}")
    if args.verb == "status":
        pid = daemon.running_pid()
        if pid is None:
            print("labkitd: not running (commands run in the labkit process; start it: labkit daemon start)")
            return 3  # what `systemctl status` says for a stopped unit
        print(f"labkitd: running, pid {pid}, socket {daemon.socket_path()}")
        return 0
    if args.verb == "start":
        was = daemon.running_pid()
        pid = daemon.start()
        print(f"labkitd: {'already running' if was else 'started'}, pid {pid}, socket {daemon.socket_path()}")
    elif args.verb == "stop":
        print(f"labkitd: stopped (pid {daemon.stop()})")
    else:
        daemon.serve()
    return 0
