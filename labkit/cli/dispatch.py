"""The ``labkit`` command, run in this process: parse the arguments, run the command.

Each subcommand lives in a module of this package that provides two functions:

    add_arguments(command: str, parser: argparse.ArgumentParser) -> None
    run(command: str, args: argparse.Namespace) -> int   # the exit code

Only the module of the command being run is imported. labkitd (labkit/engine/daemon.py)
runs the same code in a forked worker, with every module and parser loaded already.
Every LabkitError becomes one line on stderr, ``labkit: <what went wrong>``, and a
non-zero exit: never a traceback.

Layer: the top. Imports the others lazily.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from labkit.errors import LabkitError, UsageError

# name -> (module, one-line help). Grouped as `labkit --help` shows them.
COMMANDS: dict[str, tuple[str, str]] = {
    # containers, with docker's names and flags
    "run": ("labkit.cli.run", "Run a command in a new container"),
    "ps": ("labkit.cli.containers", "List containers"),
    "exec": ("labkit.cli.containers", "Run a command in a running container"),
    "logs": ("labkit.cli.containers", "Show a container's output"),
    "top": ("labkit.cli.top", "Show a container's processes, with host and container ids"),
    "port": ("labkit.cli.containers", "List a container's published ports"),
    "stop": ("labkit.cli.containers", "Stop containers (SIGTERM, then SIGKILL)"),
    "kill": ("labkit.cli.containers", "Send a signal to containers"),
    "rm": ("labkit.cli.containers", "Remove containers"),
    "pause": ("labkit.cli.containers", "Freeze every process of containers"),
    "unpause": ("labkit.cli.containers", "Thaw paused containers"),
    "stats": ("labkit.cli.containers", "Live CPU, memory and pids of containers"),
    "checkpoint": ("labkit.cli.checkpoint", "Save a running container to files with CRIU (and stop it)"),
    "restore": ("labkit.cli.checkpoint", "Bring a checkpointed container back, running where it was"),
    "inspect": ("labkit.cli.containers", "Show a container or image as JSON"),
    "images": ("labkit.cli.containers", "List images"),
    "network": ("labkit.cli.networks", "Create, list, inspect and remove networks"),
    "pull": ("labkit.cli.images", "Download an image from a registry"),
    "push": ("labkit.cli.images", "Upload an image to a registry"),
    "load": ("labkit.cli.images", "Load images from a docker-archive or OCI layout"),
    "save": ("labkit.cli.images", "Save images to a docker-archive or OCI layout"),
    "tag": ("labkit.cli.images", "Give an image another name"),
    "build": ("labkit.cli.build", "Build an image from a Dockerfile"),
    "history": ("labkit.cli.images", "Show the layers of an image and what made each"),
    "rmi": ("labkit.cli.images", "Remove images"),
    "image": ("labkit.cli.images", "Manage images: inspect, prune, ls, rm, history"),
    "commit": ("labkit.cli.images", "Make a new image from a container's changes"),
    # runc's command line over an OCI bundle
    "runtime": ("labkit.cli.runtime", "runc-like commands over an OCI bundle"),
    # the course
    "doctor": ("labkit.cli.lab", "Check this machine for everything the course needs"),
    "cleanup": ("labkit.cli.lab", "Remove every mount, cgroup, namespace, link and process labkit made"),
    "vm": ("labkit.cli.vm", "Run a command in labkit's small VM"),
    "daemon": ("labkit.cli.daemon", "Start, stop or check labkitd, which runs container commands warm"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: labkit COMMAND [ARGS...]", "", "Build and run containers from kernel primitives.", "", "Commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'labkit COMMAND --help' for a command's options."]
    return "\n".join(lines)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, given the terminal width up front. argparse makes one for
    every add_argument(), and left to itself each asks shutil, whose import costs ~2 ms
    of every labkit start."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS") or os.get_terminal_size(sys.stdout.fileno()).columns)
        except (OSError, ValueError):  # not a terminal
            width = 80
        super().__init__(prog, width=width - 2)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line in one line, as docker does,
    instead of printing the whole usage: it raises UsageError, which run_command prints
    with a pointer to --help.

    Like docker it also takes a value that starts with '-' (``-m -5m``, ``--cpus -1``):
    argparse alone would take ``-5m`` for an unknown option and say the flag has no
    value, which hides the real mistake, the value itself."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(self.prog, message)

    def _get_value(self, action: argparse.Action, arg_string: str):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as err:  # the option's type= refused the value
            flag = ", ".join(action.option_strings) or action.dest
            raise UsageError(self.prog, f'invalid argument "{arg_string}" for "{flag}" flag: {err.message}') from None

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self._attach_dash_values(list(args or [])), namespace)

    def _attach_dash_values(self, argv: list[str]) -> list[str]:
        """``-m -5m`` -> ``-m-5m`` and ``--memory -5m`` -> ``--memory=-5m``, up to the first
        positional argument (after it come the image and the container's own command)."""
        out: list[str] = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            action = self._option_string_actions.get(arg)
            if action is None or arg == "--":
                if not arg.startswith("-") or arg == "--":
                    return out + argv[i:]  # the first positional: the rest is not ours
                out.append(arg)
            elif action.nargs is None and i + 1 < len(argv) and argv[i + 1].startswith("-"):
                out.append(f"{arg}={argv[i + 1]}" if arg.startswith("--") else arg + argv[i + 1])
                i += 1
            else:
                out.append(arg)
                if action.nargs is None and i + 1 < len(argv):  # its value, whatever it looks like
                    out.append(argv[i + 1])
                    i += 1
            i += 1
        return out


_PARSERS: dict[str, tuple[argparse.ArgumentParser, object]] = {}


def build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The command's parser and module, made once per process (labkitd makes them all
    before it forks its first worker)."""
    if command not in _PARSERS:
        _PARSERS[command] = _build_parser(command)
    return _PARSERS[command]


def _build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"labkit {command}", description=help_)
    module.add_arguments(command, parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. Called without ``argv`` it is the ``labkit``
    process itself, and it ends the process (see _exit)."""
    code = run_command(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        _exit(code)
    return code


def _exit(code: int) -> None:
    """End the process now, skipping the interpreter's teardown: freeing every module's
    objects one by one takes ~5 ms, the kernel frees the whole memory at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # `labkit ps | head`: the reader has gone
            pass
    os._exit(code)


def run_command(argv: list[str]) -> int:
    """Parse ``argv`` and run the command; its exit code. Here, or in a labkitd worker."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from labkit import __version__

        print(f"labkit {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"labkit: unknown command {command!r}; 'labkit --help' lists them", file=sys.stderr)
        return 2
    try:
        parser, module = build_parser(command)
        args = parser.parse_args(argv[1:])
        return int(module.run(command, args) or 0)
    except UsageError as err:
        print(f"labkit: {err.one_line()}\nSee '{err.command} --help'.", file=sys.stderr)
        return err.exit_code
    except LabkitError as err:
        print(f"labkit: {err.one_line()}", file=sys.stderr)
        return int(getattr(err, "exit_code", 1))
    except PermissionError as err:  # a kernel refusal we did not foresee: still one line
        print(f"labkit: needs root: {err.strerror or err} (hint: run it with sudo)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `labkit ps | head`
        return 0
    except Exception as err:  # a bug in labkit, not the user's mistake: still one line
        if os.environ.get("LABKIT_DEBUG"):
            raise
        print(f"labkit: internal error: {type(err).__name__}: {err} (hint: LABKIT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
