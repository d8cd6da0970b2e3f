"""Compile a seccomp filter once, load it in microseconds: libseccomp's BPF, kept on disk.

Turning rules into BPF is slow for a container start: importing the binding (~30 ms: it
runs ``ldconfig`` to find the library) and libseccomp's code generation (5-15 ms for
x86_64 + x86 + x32). Loading the result is fast: the kernel checks ~1,000 instructions
and links them in. The BPF depends only on the rules, libseccomp's version and the
machine, so labkit compiles each distinct filter once (``seccomp.compile``), keeps the
program in the state root, and every later container loads those bytes (``seccomp.load``)
without importing the binding at all.

An entry is named by a SHA-256 of everything the program depends on, and holds the
SHA-256 of the program, checked on every read: a truncated or corrupt file (a crash
mid-write, a disk error) is compiled again, never loaded. That proves the bytes are the
ones written, not who wrote them: the state root is root's, as runc's /run/runc is.

A process also remembers the programs it read or compiled (``program``), so a warm
labkitd, which reads Docker's default profile once before it forks its workers, hands
it to every container's init in memory: no hash to compute, no file to read.

Layer: kernel. Called by the runtime's init (before pivot_root, while the state root is
still reachable). Man page: seccomp(2); kernel doc: userspace-api/seccomp_filter.rst.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from labkit import paths
from labkit.errors import InvalidValue
from labkit.kernel import seccomp

_HEADER = 64 + 1  # the program's SHA-256 in hex, then "\n", then the program
_known: dict[seccomp.Filter, bytes] = {}  # this process's programs for the state root's cache


def key(f: seccomp.Filter) -> str:
    """The entry's name: a hash of the rules, libseccomp's version and the machine.

    The rules in a canonical JSON (sorted keys), so the same Filter always hashes alike.
    The kernel's release too: libseccomp's output does not depend on it today, but a
    new kernel is the moment a stale program would be hardest to explain.
    """
    rules = json.dumps(f.to_oci(), sort_keys=True, separators=(",", ":"))
    machine = os.uname()
    facts = f"{rules}\nlibseccomp {seccomp.library_version()}\n{machine.machine} {machine.release}"
    return hashlib.sha256(facts.encode()).hexdigest()


def program(f: seccomp.Filter, cache: Path | None = None) -> bytes:
    """The BPF program for ``f``: from the cache when an entry checks out, else compiled
    by libseccomp and stored for the next container. Each distinct filter is looked up
    once per process (and the processes labkitd forks), then remembered."""
    if cache is None and f in _known:
        return _known[f]
    path = (cache or paths.seccomp_cache_dir()) / f"{key(f)}.bpf"
    found = read(path)
    if found is None:
        found = seccomp.compile(f)
        write(path, found)
    if cache is None and len(_known) < 16:  # a few profiles at most; a bound all the same
        _known[f] = found
    return found


def read(path: Path) -> bytes | None:
    """An entry's program, or None when it is missing or fails its check."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    digest, prog = data[: _HEADER - 1], data[_HEADER:]
    if data[_HEADER - 1 : _HEADER] != b"\n" or hashlib.sha256(prog).hexdigest().encode() != digest:
        return None
    try:
        return seccomp.check_program(prog)
    except InvalidValue:
        return None


def write(path: Path, prog: bytes) -> None:
    """Store an entry atomically: a temporary file renamed over the name, so a reader
    sees the whole old entry, the whole new one, or none. mkstemp picks a name no other
    writer has: every container's init is PID 1, so its pid would not do."""
    import tempfile  # only on a miss: not on every container's path

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(hashlib.sha256(prog).hexdigest().encode() + b"\n" + prog)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
