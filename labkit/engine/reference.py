"""Image names as Docker reads them: ``busybox`` is ``docker.io/library/busybox:latest``.

A reference (distribution's ``reference`` grammar, the one ``docker pull`` uses) has up
to four parts::

    localhost:5000/team/app:v2@sha256:9f86...
    '--domain---' '-path--' tag  '-digest-'

- **domain**: the registry. The first ``/``-separated component is a domain only if it
  looks like one: it holds a ``.`` or a ``:port``, or it is ``localhost``. Otherwise the
  name is on Docker Hub, ``docker.io``.
- **path**: lower-case components joined by ``/``. Docker Hub's official images live
  under ``library/``, so ``busybox`` means ``library/busybox``.
- **tag**: after the last ``:`` of the last component; ``latest`` when absent.
- **digest**: ``@sha256:`` and 64 hex digits: the manifest's own sha256, so the
  reference names exact bytes and no tag can be moved under it.

The *familiar* name is what ``docker images`` prints: ``docker.io/library/`` taken off
again (``busybox``), any other registry kept (``localhost:5000/app``).

    >>> r = parse("busybox")
    >>> r.domain, r.path, r.tag, r.name, str(r)
    ('docker.io', 'library/busybox', 'latest', 'busybox', 'busybox:latest')
    >>> r = parse("localhost:5000/app@sha256:" + "a" * 64)
    >>> r.domain, r.path, r.tag, r.reference == r.digest
    ('localhost:5000', 'app', '', True)

Layer: engine. Used by images (the store's names), registry (pull, push) and archive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labkit.errors import InvalidValue

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
ACCEPTED = "NAME[:TAG], REGISTRY[:PORT]/NAME[:TAG] or NAME@sha256:DIGEST in lower case, e.g. busybox or localhost:5000/app:v1"


@dataclass(frozen=True)
class Reference:
    """A parsed image name. ``tag`` is '' when only a digest was given."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """The familiar repository name: 'busybox', 'me/app', 'localhost:5000/app'."""
        if self.domain == DOCKER_HUB:
            return self.path.removeprefix("library/")
        return f"{self.domain}/{self.path}"

    @property
    def reference(self) -> str:
        """What goes after /manifests/ in the registry's URL: the digest, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        out = self.name + (f":{self.tag}" if self.tag else "")
        return out + (f"@{self.digest}" if self.digest else "")


def parse(text: str, default_tag: str = "latest") -> Reference:
    """Read ``text`` as ``docker pull`` would; ``InvalidValue`` if it is no image name.

    The tag defaults to ``default_tag`` unless a digest is given (pass '' for no default).
    """
    rest, at, digest = text.partition("@")
    if at and not DIGEST.fullmatch(digest):
        raise InvalidValue("image name", text, ACCEPTED)
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise InvalidValue("image name", text, ACCEPTED)
        domain, path = first, remainder
    else:
        domain, path = DOCKER_HUB, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    last_slash = path.rfind("/")
    colon = path.find(":", last_slash + 1)
    tag = ""
    if colon >= 0:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidValue("image name", text, ACCEPTED)
    if not _PATH.fullmatch(path) or len(path) > 255:
        raise InvalidValue("image name", text, ACCEPTED)
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images
    return Reference(domain, path, tag or ("" if digest else default_tag), digest)


def is_loopback(domain: str) -> bool:
    """True for a registry on this machine (plain HTTP is fine there, as Docker allows)."""
    host = domain.rsplit(":", 1)[0] if not domain.startswith("[") else domain.split("]")[0] + "]"
    return host in ("localhost", "[::1]") or host.startswith("127.")
