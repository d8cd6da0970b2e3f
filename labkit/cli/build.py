"""``labkit build``: Docker's ``docker build -t NAME[:TAG] [-f FILE] CONTEXT``.

The steps, the cache and the output (``Step N/M : ...``, `` ---> Using cache``,
`` ---> <id>``) are the engine's (``labkit.engine.build``); this module reads the flags.

Layer: the CLI (the docker client). Calls labkit.engine.build.
"""

from __future__ import annotations

import argparse


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tag", default="", help="NAME[:TAG] for the image")
    p.add_argument("-f", "--file", help="the Dockerfile (default: CONTEXT/Dockerfile)")
    p.add_argument("--build-arg", action="append", default=[], help="KEY=VALUE for an ARG")
    p.add_argument("--no-cache", action="store_true", help="run every step again")
    p.add_argument("--target", default="", help="build up to this stage (FROM ... AS STAGE)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")
    p.add_argument("context", help="the directory whose files COPY and ADD may use")


def run(command: str, args: argparse.Namespace) -> int:
    from labkit.engine import build

    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    done = build.build(args.context, tag=args.tag, file=args.file, build_args=build.parse_build_args(args.build_arg),
                       no_cache=args.no_cache, target=args.target, progress=say)  # fmt: skip
    if args.quiet:
        print(done.id)
    return 0
