"""A registry of the course's own, on 127.0.0.1: Debian's ``docker-registry``.

``docker-registry`` is distribution 2.8, the program behind Docker Hub's API (the OCI
distribution spec). The tests and notebook 10 push to it and pull from it, so no
lesson ever reaches an outside registry. ``local_registry()`` starts one on a free
port with a config file and storage of its own in a temporary directory, and stops it
and deletes both afterwards:

    >>> from labkit.lab.registry import local_registry
    >>> with local_registry() as reg:                            # doctest: +SKIP
    ...     print(reg.address)                   # push to f"{reg.address}/app:v1"
    127.0.0.1:40517

The config is written as JSON, which YAML (the format distribution reads) includes.
``auth`` adds an ``auth:`` section, e.g. ``{"token": {"realm": ..., "service": ...,
"issuer": ..., "rootcertbundle": ...}}`` for the Bearer-token flow.

Layer: the course (lab). Used by the tests, the bench and notebook 10.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import LabkitError, Unsupported

REGISTRY = "docker-registry"  # Debian's package and program name
START_TIMEOUT = 10.0  # seconds for the registry to answer /v2/
ATTEMPTS = 3  # a free port can be taken between our probe and the registry's bind


@dataclass(frozen=True)
class LocalRegistry:
    """A running registry: ``address`` is HOST:PORT, the start of image names to push."""

    address: str
    root: Path
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, port: int, auth: dict | None) -> dict:
    doc = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": os.urandom(16).hex()},
    }
    if auth:
        doc["auth"] = auth
    return doc


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status in (200, 401)
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def local_registry(auth: dict | None = None) -> Iterator[LocalRegistry]:
    """Run ``docker-registry`` on 127.0.0.1 for the ``with`` block (see the module doc)."""
    program = shutil.which(REGISTRY)
    if not program:
        raise Unsupported(f"{REGISTRY} is not installed (apt-get install docker-registry)")
    root = Path(tempfile.mkdtemp(prefix="labkit-registry-"))
    proc = None
    try:
        for _ in range(ATTEMPTS):
            port = free_port()
            (root / "config.yml").write_text(json.dumps(_config(root, port, auth), indent=2))
            log = open(root / "registry.log", "wb")
            proc = subprocess.Popen([program, "serve", str(root / "config.yml")], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
            log.close()
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline and not _answers(port):
                time.sleep(0.05)
            if proc.poll() is None and _answers(port):
                break
            _stop(proc)
            proc = None
        if proc is None:
            tail = (root / "registry.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise LabkitError(f"{REGISTRY} did not start on 127.0.0.1: {tail[0] if tail else 'no output'}")
        yield LocalRegistry(f"127.0.0.1:{port}", root, proc.pid)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
