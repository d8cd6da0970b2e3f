"""IP address management: which subnet a network gets, which address a container gets.

Docker's libnetwork calls this IPAM. Two questions, answered here without touching the
kernel (the caller hands in what is taken):

- **A subnet for a new network.** Docker's default pools: 172.17.0.0/16 for the default
  network, then the next free /16 of 172.18-31, then /20s of 192.168.0.0/16. "Free"
  means overlapping neither a route of the host (``ip route``: a subnet that is already
  reachable another way would shadow it) nor another network's subnet.
- **An address for a container.** The lowest free host address of the subnet; the first
  one (``.1``) is the gateway, on the bridge.

Both are decided under ``lock()``: an flock(2) on one file, held by one labkit process
at a time, so 20 ``labkit run -d`` started together read, choose and record their
addresses one after another. The lock goes when its holder dies, even by SIGKILL: the
kernel drops a dead process's flocks, so a crash never leaves it taken.

Layer: engine. Used by networks.py and endpoints.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from labkit import paths
from labkit.errors import InvalidValue

Net = ipaddress.IPv4Network


def pools() -> Iterator[Net]:
    """Docker's default address pools, in the order it tries them."""
    for second in range(17, 32):
        yield Net(f"172.{second}.0.0/16")
    for third in range(0, 256, 16):
        yield Net(f"192.168.{third}.0/20")


def overlaps(subnet: Net, taken: Iterable[Net]) -> Net | None:
    """The first of ``taken`` that shares an address with ``subnet`` (None: no overlap)."""
    for other in taken:
        if subnet.overlaps(other):
            return other
    return None


def choose_subnet(taken: Iterable[Net]) -> Net:
    """The first pool that overlaps nothing in ``taken`` (host routes and other networks)."""
    taken = list(taken)
    for candidate in pools():
        if overlaps(candidate, taken) is None:
            return candidate
    raise InvalidValue("address pool", "172.17-31.0.0/16, 192.168.0.0/16",
                       "a free subnet: every default pool is in use; pass --subnet")


def gateway(subnet: Net) -> ipaddress.IPv4Address:
    """The bridge's address: the subnet's first host address (172.17.0.1)."""
    return subnet.network_address + 1


def allocate(subnet: Net, used: Iterable[str]) -> ipaddress.IPv4Address:
    """The lowest address of ``subnet`` that is neither the gateway nor in ``used``."""
    used_set = {ipaddress.IPv4Address(u) for u in used} | {gateway(subnet)}
    for address in subnet.hosts():
        if address not in used_set:
            return address
    raise InvalidValue("network", str(subnet), "a subnet with a free address: every one is leased")


@contextlib.contextmanager
def lock() -> Iterator[Path]:
    """``with ipam.lock():`` holds the state root's network lock (flock, exclusive)."""
    d = paths.endpoints_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield d
    finally:
        os.close(fd)  # closing the last fd of the open file drops the flock
