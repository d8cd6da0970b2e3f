"""``labkit pull / push / load / save / tag / history / rmi / image / commit``: Docker's
image commands.

``pull`` and ``push`` draw the engine's per-layer progress the way ``docker pull``
does: one line per layer, ``<id>: Downloading [=====>    ]  1.2MB/3.4MB``. On a
terminal each line is redrawn in place (cursor-up, erase line: ECMA-48 ``CSI n A``,
``CSI 2 K``); otherwise, in a log or a notebook, each change of status is one plain line.

Layer: the CLI (the docker client). Calls labkit.engine.pull, push, archive, images and inventory.
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
    elif command == "history":
        p.add_argument("--no-trunc", action="store_true", help="show the whole CREATED BY")
        p.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
        p.add_argument("image")
    elif command == "rmi":
        p.add_argument("images", nargs="+")
    elif command == "image":
        p.add_argument("verb", choices=("inspect", "prune", "ls", "rm", "history"), help="what to do")
        p.add_argument("-a", "--all", action="store_true", help="prune: every untagged image (labkit always does)")
        p.add_argument("-f", "--force", action="store_true", help="prune: do not ask (labkit never asks)")
        p.add_argument("--no-trunc", action="store_true")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("images", nargs="*")
    elif command == "commit":
        p.add_argument("-a", "--author", default="", help="the image's author")
        p.add_argument("-m", "--message", default="", help="the history entry's comment")
        p.add_argument("container")
        p.add_argument("repository", nargs="?", default="", help="REPO[:TAG] (default: untagged)")


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


def cmd_history(args: argparse.Namespace) -> int:
    """``docker history``: IMAGE  CREATED  CREATED BY  SIZE  COMMENT, newest first."""
    import time

    from labkit.engine import images, inventory

    image, entries = inventory.history(args.image)
    now = time.time()
    rows = [("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT")]
    for n, e in enumerate(entries):
        shown = image.short_id if n == 0 else "<missing>"
        by = e.created_by if args.no_trunc or len(e.created_by) <= 45 else e.created_by[:44] + "…"
        rows.append((shown, images.human_age(now - e.created) + " ago", by, images.human_size(e.size), e.comment))
    if args.quiet:
        print(image.short_id)
        return 0
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from labkit.engine import images
    from labkit.errors import LabkitError

    code = 0
    for ref in args.images:
        try:
            image = images.get(ref)
            images.remove(ref)
            print(f"Untagged: {image.ref}")
        except LabkitError as err:
            print(f"labkit: {err.one_line()}", file=sys.stderr)
            code = 1
    return code


def cmd_image(args: argparse.Namespace) -> int:
    import json

    from labkit.engine import images, inventory

    if args.verb == "prune":
        done = inventory.prune()
        if done.images:
            print("Deleted Images:")
            for image_id in done.images:
                print(f"deleted: {image_id}")
        for diff_id in done.layers:
            print(f"deleted layer: {diff_id}")
        print(f"Total reclaimed space: {images.human_size(done.reclaimed)}")
        return 0
    if args.verb == "ls":
        print(images.format_table(images.list_images()))
        return 0
    if not args.images:
        raise InvalidValue(f"image {args.verb}", "", "at least one image name")
    if args.verb == "inspect":
        print(json.dumps([inventory.inspect(ref) for ref in args.images], indent=4))
        return 0
    if args.verb == "history":
        args.image = args.images[0]
        return cmd_history(args)
    return cmd_rmi(args)


def cmd_commit(args: argparse.Namespace) -> int:
    """``docker commit CONTAINER [REPO[:TAG]]``: the container's upper directory as a layer."""
    from labkit.cli.containers import resolve
    from labkit.engine import inventory
    from labkit.runtime import container
    from labkit.runtime import state as st

    cid = resolve(args.container)
    state = container.load(cid)
    if not state.image:
        raise InvalidValue("container", args.container, "a container started from an image (labkit run IMAGE)")
    upper = st.data_dir(cid) / "upper"
    if not upper.is_dir():
        raise InvalidValue("container", args.container, "a container whose root is an overlay of image layers")
    spec = container.spec_of(cid)  # with a user namespace, the owners are read back through its maps
    image_id = inventory.commit(upper, state.image, args.repository, author=args.author, comment=args.message,
                                created_by=" ".join(state.command), maps=(spec.uid_map, spec.gid_map))  # fmt: skip
    print(image_id)
    return 0
