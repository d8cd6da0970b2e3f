"""Networking for containers: namespaces, links, addresses, routes, NAT.

What ``docker run`` does for a container's network, in kernel primitives:

1. a network namespace of its own (``netns.py``): a stack with only ``lo``, and it is down;
2. a veth pair, one end inside as ``eth0``, the other plugged into a bridge on the host,
   addresses and a default route via the bridge (``links.py``: the ip(8) verbs);
3. NAT out of the host and DNAT for published ports, in one nftables table of labkit's
   own (``nat.py``).

Everything is importable from here: ``from labkit.kernel import network as net``, then
``net.NetNS.create("labkit-c1")``, ``net.veth("lkh1", "eth0", peer_netns=ns)``,
``net.Table().create()``. pyroute2 loads at the first call that talks netlink, never at
``import labkit``. ``remove_all()`` is cleanup's step: every namespace, host link and
table labkit's naming rules claim (paths.py), and nothing else.

Layer: kernel. Used by the engine, cleanup, notebook 08 and the tests.
"""

from __future__ import annotations

from labkit import paths
from labkit.kernel.network import links as _links
from labkit.kernel.network import nat as _nat
from labkit.kernel.network import netns as _netns
from labkit.kernel.network.links import (
    Address, Link, Route, add_address, add_route, addresses, bridge, check_interface, check_link_name,
    check_network, delete, forwarding, link, links, move, routes, set_conf, set_forwarding, set_master,
    set_up, veth,
)
from labkit.kernel.network.nat import Rule, Table, check_port, nft, tables
from labkit.kernel.network.netns import NetNS, call_in, namespaces

__all__ = [
    "Address", "Link", "NetNS", "Route", "Rule", "Table", "add_address", "add_route", "addresses", "bridge",
    "call_in", "check_interface", "check_link_name", "check_network", "check_port", "delete", "forwarding",
    "link", "links", "move", "namespaces", "nft", "remove_all", "routes", "set_conf", "set_forwarding", "set_master",
    "set_up", "tables", "veth",
]


def remove_all(netns_prefix: str = paths.NETNS_PREFIX, link_prefix: str = paths.LINK_PREFIX,
               table_prefix: str = paths.NFT_TABLE) -> list[str]:
    """Remove labkit's network objects whose names start with these prefixes: host links
    first (a veth end takes its peer along), then namespaces, then nftables tables.
    ``labkit cleanup`` calls it with the defaults; tests narrow the prefixes to their own."""
    return _links.remove_all(link_prefix) + _netns.remove_all(netns_prefix) + _nat.remove_all(table_prefix)
