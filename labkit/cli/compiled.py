"""The compiled ``labkit`` command: client.c, built with gcc for one Python and one checkout.

client.c is client.py in C (see its comment for why). Provisioning builds it as
/usr/local/bin/labkit:

    python -m labkit.cli.compiled /usr/local/bin/labkit

The program is built for this Python and this checkout: both are compiled into it, as
the path it execs when labkitd does not run the command, and the code that runs it there.
A test builds it the same way into a temp dir (tests/test_daemon.py, its ``client``
fixture), and so do the benches, to time this checkout's command as users start it.

Layer: the CLI. Runs gcc (provisioning installs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("client.c")
HOME = Path(__file__).resolve().parent.parent.parent  # the directory that holds the labkit package
FLAGS = ("-O2", "-Wall", "-Wextra")


def in_process_code(home: Path = HOME) -> str:
    """What ``python -S -P -c`` runs when labkitd does not: labkit from ``home``, in-process."""
    return (f"import sys; sys.path.insert(0, {str(home)!r}); from labkit.cli import main; "
            "main(ask_labkitd=False)")  # fmt: skip


def c_string(text: str) -> str:
    """``text`` as a C string literal: quotes and backslashes escaped, other bytes that
    are not printable ASCII as octal.

    >>> print(c_string('a "b" \\\\ é'))
    "a \\"b\\" \\\\ \\303\\251"
    """
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def build(out: str | os.PathLike, python: str = sys.executable, home: Path = HOME, werror: bool = False) -> Path:
    """Compile client.c into ``out`` (written atomically, mode 0755); its path."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    cmd = ["gcc", *FLAGS, *(["-Werror"] if werror else []), f"-DLABKIT_PYTHON={c_string(python)}",
           f"-DLABKIT_CODE={c_string(in_process_code(home))}", "-o", tmp, str(SOURCE)]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"labkit: gcc could not build {SOURCE}:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m labkit.cli.compiled OUTPUT")
    build(sys.argv[1])
