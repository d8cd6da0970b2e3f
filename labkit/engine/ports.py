"""Published ports: ``-p [IP:]HOST:CONTAINER[/tcp|udp]``, ranges and ``-P``, as Docker reads them.

A published port is a DNAT rule (kernel/network/nat.py): a packet to the host's port
8080 gets the container's address and port 80 written into it. This module only reads
and checks what the user typed, and tells whether a host port is free; endpoints.py
makes the rules.

    >>> [str(m) for m in parse("127.0.0.1:8000-8001:80-81/udp")]
    ['127.0.0.1:8000->80/udp', '127.0.0.1:8001->81/udp']
    >>> parse("70000:80")
    Traceback (most recent call last):
    ...
    labkit.errors.InvalidValue: invalid published port '70000:80': expected [IP:]HOST:CONTAINER[/tcp|udp] with ports 1-65535, e.g. 8080:80 or 127.0.0.1:8000-8001:80-81/udp

A host port is taken when another container published it (the leases say so) or when
a host process listens on it: ``check_free`` tries to bind it, as docker-proxy would.
A port given as ``-p 80`` (or by ``-P``) gets an ephemeral host port, from the range
Docker uses (49153-65535).

Layer: engine. Used by endpoints.py and the CLI's ``run``.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from labkit.errors import AlreadyExists, InvalidValue

FORM = "[IP:]HOST:CONTAINER[/tcp|udp] with ports 1-65535, e.g. 8080:80 or 127.0.0.1:8000-8001:80-81/udp"
EPHEMERAL = range(49153, 65536)
_SPEC = re.compile(r"(?:(?P<ip>[0-9.]+):)?(?:(?P<host>[0-9-]*):)?(?P<cont>[0-9-]+)(?:/(?P<proto>tcp|udp))?")


@dataclass(frozen=True)
class PortMapping:
    """One published port: ``0.0.0.0:8080->80/tcp`` (host_port 0: not chosen yet)."""

    host_ip: str
    host_port: int
    container_port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.container_port}/{self.proto}"

    def to_json(self) -> dict[str, object]:
        return {"host_ip": self.host_ip, "host_port": self.host_port, "container_port": self.container_port,
                "proto": self.proto}

    @classmethod
    def from_json(cls, d: dict) -> PortMapping:
        return cls(d["host_ip"], int(d["host_port"]), int(d["container_port"]), d.get("proto", "tcp"))


def _range(text: str, spec: str) -> list[int]:
    low, dash, high = text.partition("-")
    try:
        first, last = int(low), int(high) if dash else int(low)
    except ValueError:
        raise InvalidValue("published port", spec, FORM) from None
    if not 1 <= first <= last <= 65535:
        raise InvalidValue("published port", spec, FORM)
    return list(range(first, last + 1))


def parse(spec: str) -> list[PortMapping]:
    """One ``-p`` value -> its mappings (host_port 0 where Docker would pick one)."""
    m = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        raise InvalidValue("published port", spec, FORM)
    ip, host, cont, proto = m.group("ip"), m.group("host"), m.group("cont"), m.group("proto") or "tcp"
    if ip is not None and host is None:  # "8080:80": the regex read 8080 as an IP
        ip, host = None, ip
    if ip is not None:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise InvalidValue("published port", spec, FORM) from None
    container = _range(cont, spec)
    hosts = _range(host, spec) if host else [0] * len(container)
    if len(hosts) != len(container):
        raise InvalidValue("published port", spec, "host and container ranges of the same length, e.g. 8000-8001:80-81")
    return [PortMapping(ip or "0.0.0.0", h, c, proto) for h, c in zip(hosts, container)]


def exposed(ports: Iterable[str]) -> list[PortMapping]:
    """``-P``: the image's ExposedPorts ("80/tcp") -> mappings to ephemeral host ports."""
    return [m for p in ports for m in parse(p)]


def clashes(a: PortMapping, b: PortMapping) -> bool:
    """Whether two mappings want the same host port (0.0.0.0 clashes with every address)."""
    same_ip = a.host_ip == b.host_ip or "0.0.0.0" in (a.host_ip, b.host_ip)
    return a.proto == b.proto and a.host_port == b.host_port and same_ip


def check_free(m: PortMapping) -> None:
    """AlreadyExists if a host process holds ``m``'s host port (bind it and let go)."""
    kind = socket.SOCK_STREAM if m.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((m.host_ip, m.host_port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AlreadyExists(f"port {m.host_ip}:{m.host_port}/{m.proto} is in use by a host process "
                                    f"(ss -lnp shows it)") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise InvalidValue("published port's host IP", m.host_ip, "an address of this host") from None
            raise


def assign(wanted: list[PortMapping], published: list[PortMapping]) -> list[PortMapping]:
    """``wanted`` with every host port chosen and checked against ``published`` (other
    containers') and the host's sockets; the first conflict raises, naming the port."""
    out: list[PortMapping] = []
    for m in wanted:
        taken = published + out
        if m.host_port:
            for other in taken:
                if clashes(m, other):
                    raise AlreadyExists(f"port {m.host_ip}:{m.host_port}/{m.proto} is already published "
                                        f"({other}); choose another host port")
            check_free(m)
            out.append(m)
            continue
        for port in EPHEMERAL:
            candidate = PortMapping(m.host_ip, port, m.container_port, m.proto)
            if any(clashes(candidate, other) for other in taken):
                continue
            try:
                check_free(candidate)
            except AlreadyExists:
                continue
            out.append(candidate)
            break
    return out
