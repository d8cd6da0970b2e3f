#!/usr/bin/env python3
"""Generate notebooks/ from solutions/: the student versions, navigation, contents.

    python scripts/make_notebooks.py          # write what changed (make notebooks)
    python scripts/make_notebooks.py --check  # exit 1 when notebooks/ is out of date

The work happens in labkit.lab.notebooks.generate(src_dir, out_dir); this script only
picks the folders and reports. It never touches a student's work folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout even before `pip install -e .`

from labkit.errors import LabkitError  # noqa: E402 - after the sys.path line above
from labkit.lab import notebooks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    parser.add_argument("--src", type=Path, default=REPO / "solutions", help="default: solutions/")
    parser.add_argument("--out", type=Path, default=REPO / "notebooks", help="default: notebooks/")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = notebooks.stale(args.src, args.out)
            for path in stale:
                print(f"out of date: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
            if stale:
                print("run 'make notebooks' (python scripts/make_notebooks.py) and commit the result",
                      file=sys.stderr)
            return 1 if stale else 0
        for path in notebooks.generate(args.src, args.out):
            print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    except LabkitError as err:
        print(f"make_notebooks: {err.one_line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
