"""``labkit daemon``: start, stop or check labkitd (labkit/engine/daemon.py).

    labkit daemon start     in the background; returns once it listens
    labkit daemon stop      SIGTERM; running containers keep running
    labkit daemon status    running or not, its pid and socket
    labkit daemon run       in the foreground (what a systemd service runs)

labkitd runs the CLI's own dispatcher in its workers: ``start()`` and ``run`` hand
``dispatch.run_command`` (and ``warm_up``, which builds every parser once) to the
engine's daemon, which knows nothing of the CLI. They hand it the Docker Engine API's
routes too (labkit/cli/api), served on ``docker.sock`` beside labkitd's own socket.

Layer: the CLI. Calls labkit.engine.daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import io

from labkit.cli import api, client, dispatch
from labkit.engine import daemon
from labkit.errors import LabkitError, UsageError, require_root

VERBS = ("start", "stop", "status", "run")


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("verb", choices=VERBS, help="what to do with labkitd")


def warm_up() -> None:
    """Build and exercise every served command's parser once, before labkitd forks."""
    for command in client.SERVED:
        parser, _ = dispatch.build_parser(command)
        parser.format_help()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit, UsageError):
            parser.parse_args([])  # a usage error, mostly: loads gettext, compiles argparse's patterns
    api.router()  # the Engine API's routes, and the modules they use
    from labkit.kernel import seccomp, seccomp_cache, security

    with contextlib.suppress(LabkitError):  # no libseccomp: each container says so itself
        seccomp_cache.program(seccomp.default(security.DOCKER_DEFAULT_CAPS))  # every init gets it in memory


def start() -> int:
    """Start labkitd in the background with the CLI's dispatcher; its pid."""
    return daemon.start(dispatch.run_command, warm_up, api=api.serve)


def run(command: str, args: argparse.Namespace) -> int:
    require_root(f"labkit daemon {args.verb}")
    if args.verb == "status":
        pid = daemon.running_pid()
        if pid is None:
            print("labkitd: not running (commands run in the labkit process; start it: labkit daemon start)")
            return 3  # what `systemctl status` says for a stopped unit
        print(f"labkitd: running, pid {pid}, socket {daemon.socket_path()}, Engine API {daemon.api_socket_path()}")
        return 0
    if args.verb == "start":
        was = daemon.running_pid()
        pid = start()
        print(f"labkitd: {'already running' if was else 'started'}, pid {pid}, socket {daemon.socket_path()}, "
              f"Engine API unix://{daemon.api_socket_path()}")
    elif args.verb == "stop":
        print(f"labkitd: stopped (pid {daemon.stop()})")
    else:
        daemon.serve(dispatch.run_command, warm_up, api=api.serve)
    return 0
