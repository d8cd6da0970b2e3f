"""Docker's networks: ``bridge``, ``host``, ``none`` and the ones ``labkit network create`` makes.

A *network* in Docker's sense is a Linux bridge with a subnet, plus the NAT that lets
its containers out (libnetwork's "bridge driver"):

- the default network ``bridge`` is the bridge ``labkit0`` (Docker's ``docker0``), with
  Docker's 172.17.0.0/16 unless a host route already covers it (ipam.py picks the next
  free pool then); under a ``LABKIT_ROOT`` of its own a root gets bridges of its own
  (``paths.bridge_name``), so test runs never share one;
- a user-defined network (``labkit network create NAME``) is one more bridge and subnet;
  only there do containers find each other by name (endpoints.py writes /etc/hosts);
- ``host`` and ``none`` are not bridges: the host's network namespace, or a new one with
  only ``lo``. They are listed, as ``docker network ls`` lists them, and cannot be removed.

What a bridge network sets up on the host, once, when its first container starts (or at
``network create``), all in labkit's nftables table (kernel/network/nat.py):

- ``masquerade``: packets from the subnet leaving by any other link get the host's
  address (Docker's ``POSTROUTING -s SUBNET ! -o docker0 -j MASQUERADE``);
- ``accept_forward``: the forward hook lets packets into and out of the bridge;
- ``publish_loopback`` and ``route_localnet=1`` on the bridge, so a port published with
  ``-p`` answers on 127.0.0.1 too: DNAT in the output hook, no proxy process. Docker
  runs a userland proxy (docker-proxy) per port by default, and does exactly this with
  ``"userland-proxy": false``. labkit's choice keeps the container start free of extra
  processes; the price is that 127.0.0.1 traffic to a bridge is allowed (route_localnet).
- ``net.ipv4.ip_forward=1`` in the host's namespace: without it the host drops what a
  container sends out. Docker turns it on and leaves it on; so does labkit (it is
  host-wide, and turning it off again would cut other bridges' containers off).

A network's definition lives in ``paths.networks_dir()/NAME.json`` (kept, like images);
its bridge and rules are kernel state that ``labkit cleanup`` removes, and that the next
container start makes again.

Layer: engine. Used by endpoints.py and the CLI (``labkit network``, ``run --network``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
from dataclasses import asdict, dataclass

from labkit import paths
from labkit.engine import ipam
from labkit.errors import AlreadyExists, InvalidValue, LabkitError, NotFound, StateError

DEFAULT = "bridge"
BUILTIN = ("bridge", "host", "none")
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Network:
    """One network: ``docker network inspect``'s Name, Driver and IPAM config."""

    name: str
    driver: str  # "bridge", "host" or "null" (Docker's names)
    subnet: str = ""
    gateway: str = ""
    bridge: str = ""
    created: float = 0.0

    @property
    def is_bridge(self) -> bool:
        return self.driver == "bridge"

    @property
    def user_defined(self) -> bool:
        return self.name not in BUILTIN


def _path(name: str):
    return paths.networks_dir() / f"{name}.json"


def _save(n: Network) -> Network:
    paths.networks_dir().mkdir(parents=True, exist_ok=True)
    tmp = _path(n.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(n), indent=2) + "\n")
    os.replace(tmp, _path(n.name))
    return n


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidValue("network name", name, "1-64 of letters, digits, '_', '.', '-', e.g. backend")
    return name


def get(name: str) -> Network:
    """A network by name; the default ``bridge`` is defined at its first use."""
    if name == "host":
        return Network("host", "host")
    if name == "none":
        return Network("none", "null")
    try:
        return Network(**json.loads(_path(check_name(name)).read_text()))
    except FileNotFoundError:
        if name != DEFAULT:
            raise NotFound(f"no such network: {name} (labkit network ls lists them)") from None
    with ipam.lock():  # two first starts at once: one defines it, the other reads it
        if _path(name).exists():
            return get(name)
        subnet = ipam.choose_subnet(_taken(name))
        return _save(Network(name, "bridge", str(subnet), str(ipam.gateway(subnet)), paths.bridge_name(name),
                             time.time()))


def list_networks() -> list[Network]:
    found = {n: get(n) for n in BUILTIN}
    d = paths.networks_dir()
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            try:
                found[f.stem] = get(f.stem)
            except (LabkitError, ValueError, TypeError):
                continue  # half-written: not a network
    return sorted(found.values(), key=lambda n: (n.user_defined, n.name))


def _taken(name: str) -> dict[ipaddress.IPv4Network, str]:
    """Subnets a new network must not overlap, each with what holds it: the host's routes
    (other than through this network's own bridge) and every other network's subnet."""
    from labkit.kernel import network as net

    taken: dict[ipaddress.IPv4Network, str] = {}
    d = paths.networks_dir()
    for f in sorted(d.glob("*.json")) if d.is_dir() else ():
        if f.stem != name:
            try:
                taken[ipaddress.IPv4Network(json.loads(f.read_text())["subnet"])] = f"network {f.stem}"
            except (ValueError, KeyError):
                continue
    own = paths.bridge_name(name)
    for r in net.routes():  # a network's own bridge route is already named by its network
        if r.dst != "default" and r.dev != own:
            taken.setdefault(ipaddress.IPv4Network(r.dst), f"a route on {r.dev}")
    return taken


def create(name: str, subnet: str | None = None) -> Network:
    """``docker network create [--subnet CIDR] NAME``: check everything, then the bridge."""
    from labkit.kernel import network as net

    check_name(name)
    if name in BUILTIN or _path(name).exists():
        raise AlreadyExists(f"network with name {name} already exists")
    with ipam.lock():
        taken = _taken(name)
        if subnet is None:
            chosen = ipam.choose_subnet(taken)
        else:
            chosen = net.check_network(subnet, "subnet")
            if chosen.prefixlen > 30:
                raise InvalidValue("subnet", subnet, "a network of /30 or wider, e.g. 10.10.0.0/24")
            clash = ipam.overlaps(chosen, taken)
            if clash is not None:
                raise InvalidValue("subnet", subnet,
                                   f"a subnet that overlaps no route or network ({clash} is taken: {taken[clash]})")
        n = _save(Network(name, "bridge", str(chosen), str(ipam.gateway(chosen)), paths.bridge_name(name),
                          time.time()))
        try:
            ensure(n)
        except BaseException:
            _path(name).unlink(missing_ok=True)
            teardown(n)
            raise
    return n


def remove(name: str, users: list[str]) -> None:
    """``docker network rm NAME``; refused while ``users`` (container names) are on it."""
    n = get(name)
    if not n.user_defined:
        raise InvalidValue("network to remove", name, "a user-defined network: bridge, host and none are built in")
    if users:
        raise StateError(f"network {name} is in use by container(s) {', '.join(sorted(users))} (labkit rm -f them first)")
    teardown(n)
    _path(name).unlink(missing_ok=True)


def ensure(n: Network) -> None:
    """The bridge, its address, its rules, once. The caller holds ``ipam.lock()``. The
    bridge is made last: when it exists, everything before it does too."""
    from labkit.kernel import network as net

    if not n.is_bridge or os.path.exists(f"/sys/class/net/{n.bridge}"):
        return
    iface = f"{n.gateway}/{ipaddress.IPv4Network(n.subnet).prefixlen}"
    if not net.forwarding():
        net.set_forwarding(True)  # left on, as Docker does (see the module's docstring)
    table = net.Table(paths.nft_table()).create()
    table.remove_rules(n.bridge)  # a bridge deleted by hand leaves its rules: no doubles
    table.masquerade(n.subnet, bridge=n.bridge, tag=n.bridge)
    table.accept_forward(n.bridge, tag=n.bridge)
    table.publish_loopback(n.bridge, tag=n.bridge)
    try:
        net.bridge(n.bridge)
        net.add_address(n.bridge, iface)
        net.set_conf(n.bridge, "route_localnet", "1")
        net.set_up(n.bridge)
    except BaseException:
        teardown(n)
        raise


def discard() -> list[str]:
    """Remove this state root's networks from the kernel: the bridge of each network and,
    under LABKIT_ROOT, the root's own nftables table; the names removed.

    The default network's bridge stays between containers, as docker0 does. A state root
    that is thrown away (a test's, a notebook's own store) must take its bridges and its
    table with it: this is how. ``labkit cleanup`` does the same for every root."""
    from labkit.kernel import network as net

    removed = []
    for n in list_networks():
        if n.is_bridge and os.path.exists(f"/sys/class/net/{n.bridge}"):
            teardown(n)
            removed.append(n.bridge)
    if paths._env_root() is not None:  # the default root's table is labkit cleanup's
        table = net.Table(paths.nft_table())
        if table.exists():
            table.remove()
            removed.append(table.name)
    return removed


def teardown(n: Network) -> None:
    """Undo ``ensure``: the bridge and its rules (the table stays for other networks)."""
    from labkit.kernel import network as net

    if not n.is_bridge:
        return
    if os.path.exists(f"/sys/class/net/{n.bridge}"):
        net.delete(n.bridge)
    table = net.Table(paths.nft_table())
    if table.exists():
        table.remove_rules(n.bridge)
