"""``labkit pull / push / load / save / tag``: Docker's image commands.

``pull`` and ``push`` draw the engine's per-layer progress the way ``docker pull``
does: one line per layer, ``<id>: Downloading [=====>    ]  1.2MB/3.4MB``. On a
terminal each line is redrawn in place (cursor-up, erase line: ECMA-48 ``CSI n A``,
``CSI 2 K``); otherwise, in a log or a notebook, each change of status is one plain line.

Layer: the CLI (the docker client). Calls labkit.engine.pull, push, archive and images.
"""

from __future__ import annotations

import argparse
import sys
import threading

from labkit.errors import InvalidValue


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command in ("pull", "push"):
        p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the image name")
        p.add_argument("name", help="NAME[:TAG|@DIGEST], e.g. localhost:5000/app:v1")
    elif command == "load":
        p.add_argument("-i", "--input", required=True, help="a docker-archive or OCI layout (tar or directory)")
        p.add_argument("-q", "--quiet", action="store_true", help="print only the names")
    elif command == "save":
        p.add_argument("-o", "--output", required=True, help="the file (or, with --format oci-dir, directory)")
        p.add_argument("--format", default="docker-archive", help="docker-archive (default; also an OCI layout), "
                       "oci-archive (the same tar) or oci-dir (a directory)")  # fmt: skip
        p.add_argument("images", nargs="+")
    elif command == "tag":
        p.add_argument("source")
        p.add_argument("target")


def run(command: str, args: argparse.Namespace) -> int:
    return globals()[f"cmd_{command}"](args)


def _bar(current: int, total: int, width: int = 50) -> str:
    """Docker's progress bar: ``[=====>      ]  1.2MB/3.4MB``."""
    from labkit.engine.images import human_size

    if total <= 0:
        return ""
    done = min(width, width * current // total)
    arrow = "=" * done + (">" if done < width else "") + " " * (width - done - 1)
    return f"[{arrow[:width]}]  {human_size(current)}/{human_size(total)}"


class Board:
    """The progress lines of one pull or push (called from the engine's threads)."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.order: list[str] = []
        self.lines: dict[str, str] = {}
        self.status: dict[str, str] = {}
        self.lock = threading.Lock()

    def __call__(self, p) -> None:
        with self.lock:
            line = f"{p.id}: {p.status}"
            if p.status in ("Downloading", "Pushing") and p.total:
                line += " " + _bar(p.current, p.total)
            if p.id not in self.lines:
                self.order.append(p.id)
                self.lines[p.id] = line
                if self.tty:
                    self.out.write(line + "\n")
            elif self.tty:
                up = len(self.order) - self.order.index(p.id)
                self.out.write(f"\x1b[{up}A\x1b[2K\r{line}\x1b[{up}B\r")
            self.lines[p.id] = line
            if not self.tty and self.status.get(p.id) != p.status:  # plain lines: one per status
                self.out.write(line.split(" [")[0] + "\n")
            self.status[p.id] = p.status
            self.out.flush()


def cmd_pull(args: argparse.Namespace) -> int:
    from labkit.engine import pull, reference

    ref = reference.parse(args.name)
    if not args.quiet:
        if not ref.digest and ":" not in args.name.rsplit("/", 1)[-1]:
            print(f"Using default tag: {ref.tag}")
        print(f"{ref.reference}: Pulling from {ref.path}", flush=True)
    done = pull.pull(args.name, progress=None if args.quiet else Board())
    if not args.quiet:
        print(f"Digest: {done.digest}")
        verb = "Downloaded newer image for" if done.updated else "Image is up to date for"
        print(f"Status: {verb} {done.image.ref}")
    print(f"{ref.domain}/{ref.path}" + (f":{ref.tag}" if ref.tag else "") + (f"@{ref.digest}" if ref.digest else ""))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from labkit.engine import push, reference

    ref = reference.parse(args.name)
    if not args.quiet:
        print(f"The push refers to repository [{ref.domain}/{ref.path}]", flush=True)
    done = push.push(args.name, progress=None if args.quiet else Board())
    print(f"{ref.tag}: digest: {done.digest} size: {done.size}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from labkit.engine import archive

    for item in archive.load(args.input):
        print(f"Loaded image: {item.ref}" if item.ref else f"Loaded image ID: {item.id}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from labkit.engine import archive

    if args.output == "-":
        raise InvalidValue("output", "-", "a file name: labkit does not write archives to stdout")
    archive.save(args.images, args.output, fmt=args.format)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from labkit.engine import images

    images.tag(args.source, args.target)
    return 0
