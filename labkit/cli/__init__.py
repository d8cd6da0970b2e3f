"""The ``labkit`` command: labkit's docker CLI.

Like ``docker``, the command is a client. When labkitd (labkit's dockerd, see
labkit/engine/daemon.py) is running, the container commands go to it: it has every
module loaded already and forks a worker that runs the command with this process's
stdin, stdout, stderr, working directory and environment (client.py). Without labkitd,
or for a terminal, the command runs right here (dispatch.py), which gives the same
output and exit code, only later: a Python process takes ~50 ms to load labkit.
The installed command (/usr/local/bin/labkit) is the same client compiled from C
(client.c, built by compiled.py), as the docker CLI is a compiled program: it is
running before Python has even started, and it starts Python only for a command that
runs here.

This module imports nothing but the client, so that the daemon path stays fast.

Layer: the top. Imports the others lazily.
"""

import sys


def main(argv: "list[str] | None" = None, ask_labkitd: bool = True) -> int:
    """Run one command; its exit code. Called without ``argv`` it is the ``labkit``
    process itself: it asks labkitd first (unless the compiled command, client.c, has
    asked already: ``ask_labkitd=False``), and it ends the process."""
    if argv is None and ask_labkitd:
        from labkit.cli import client

        try:
            code = client.via_daemon(sys.argv[1:])
        except KeyboardInterrupt:  # Ctrl-C before the worker was known
            code = 130
        if code is not None:
            client.exit_now(code)
    if sys.flags.no_site:  # started with python -S (the launcher, client.c): find site-packages now
        import site

        site.main()
    from labkit.cli import dispatch

    return dispatch.main(argv)


def __getattr__(name: str):
    """``labkit.cli.build_parser`` and friends live in dispatch.py, loaded on first use."""
    if name in ("build_parser", "COMMANDS", "run_command"):
        from labkit.cli import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
