#!/usr/bin/env python3
"""Copy the course's notebooks into the students' work folder, never over their work.

notebooks/ is generated from solutions/ and changes whenever the course does (a
``git pull``, ``make notebooks``). Students edit their own copies in work/, which git
ignores. This script copies a file from notebooks/ only when work/ has no file of that
name yet: an edited notebook is never replaced, and a new lesson still shows up.
To get a fresh copy of a lesson, rename yours (e.g. to 03-pid-namespace-mine.ipynb)
and run this again.

    python3 scripts/sync_work.py                     # notebooks/ -> work/ in this checkout
    python3 scripts/sync_work.py --work /some/dir    # or LABKIT_WORK=/some/dir

Run by vagrant/lab.sh (``sudo make lab``), by the labkit-lab service before it starts
and on every ``vagrant up``. Standard library only, so any python3 can run it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP = {".ipynb_checkpoints", "__pycache__", ".gitkeep"}  # editor and git litter, not lessons


def _own_like(path: Path, model: Path) -> None:
    """Give ``path`` the owner of ``model``: on a plain host the lab runs as root, yet the
    work folder belongs to the student who cloned the course. Shared folders of some
    hypervisors refuse chown; their owner is the host user anyway."""
    st = model.stat()
    try:
        os.chown(path, st.st_uid, st.st_gid)
    except OSError:
        pass


def sync(notebooks: Path, work: Path) -> list[Path]:
    """Copy every file of ``notebooks`` that ``work`` lacks; return the copies made."""
    if not work.is_dir():
        work.mkdir()  # not parents=True: a missing parent means a wrong path, say so
        _own_like(work, work.parent)
    copied: list[Path] = []
    if not notebooks.is_dir():  # nothing generated yet: an empty work folder is fine
        return copied
    for src in sorted(notebooks.rglob("*")):
        rel = src.relative_to(notebooks)
        if SKIP.intersection(rel.parts) or not src.is_file():
            continue
        dst = work / rel
        if dst.exists() or dst.is_symlink():
            continue
        for parent in reversed(rel.parents[:-1]):  # sub-folders (figures, data), top first
            if not (work / parent).is_dir():
                (work / parent).mkdir()
                _own_like(work / parent, work)
        # "x": create, fail if it exists. Should JupyterLab save a file of that name in
        # the instant since the check above, the student's file still wins.
        try:
            with open(src, "rb") as fin, open(dst, "xb") as fout:
                shutil.copyfileobj(fin, fout)
        except FileExistsError:
            continue
        _own_like(dst, work)
        copied.append(dst)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=REPO / "notebooks",
                        help="source (default: notebooks/)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("LABKIT_WORK") or REPO / "work"),
                        help="the work folder (default: $LABKIT_WORK or work/)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when nothing was copied")
    args = parser.parse_args(argv)
    if not args.work.parent.is_dir():
        print(f"sync_work: cannot make the work folder {args.work}: {args.work.parent} does not exist "
              "(expected a folder inside an existing directory, e.g. work/ in the course checkout)",
              file=sys.stderr)
        return 1
    copied = sync(args.notebooks, args.work)
    for path in copied:
        print(f"new notebook: {path}")
    if copied or not args.quiet:
        print(f"work folder {args.work}: {len(copied)} new file(s); your own files are never replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
