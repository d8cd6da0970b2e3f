"""The `labkit` command the benches time: this checkout's, built as provisioning builds it.

vagrant/provision.sh installs /usr/local/bin/labkit as the thin client compiled from C
(labkit/cli/client.c, built by labkit.cli.compiled for the venv's Python and the
checkout). The benches build the same program into their temp dir for this checkout, so
that they time this code started the way users start it (the installed command may run
another checkout). `python_command` is the same client in Python (labkit/cli/client.py,
started with `python -S` as a launcher script would), for the comparison.

Not a bench itself (the leading _ keeps `make bench` from running it).
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def labkit_command(directory: str | Path) -> list[str]:
    """Build the compiled command into ``directory``; the argv prefix that runs it."""
    sys.path.insert(0, str(CHECKOUT))
    from labkit.cli import compiled

    return [str(compiled.build(Path(directory) / "labkit", home=CHECKOUT))]


def python_command(directory: str | Path) -> list[str]:
    """A launcher script for the Python client; the argv prefix that runs it (what its
    #! line says, spelled out: a temp dir may be mounted noexec)."""
    path = Path(directory) / "labkit.py"
    path.write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(CHECKOUT)!r})\n"
                    "from labkit.cli import main\nsys.exit(main())\n")  # fmt: skip
    return [sys.executable, "-S", str(path)]
