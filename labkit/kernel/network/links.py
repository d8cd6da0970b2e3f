"""Links, addresses and routes: the ip(8) verbs, through netlink with pyroute2.

``ip link``, ``ip addr`` and ``ip route`` are clients of rtnetlink: each command is one
message on a netlink socket (``RTM_NEWLINK``, ``RTM_NEWADDR``, ``RTM_NEWROUTE``...) that
the kernel answers with an ack or an errno. pyroute2 speaks the same messages from
Python, and each function here is one of them, named after the ip(8) command it mirrors:

========================================  =============================================
``veth("lkh1", "eth0", peer_netns=ns)``   ip link add lkh1 type veth peer name eth0 netns NS
``bridge("lkbr0")``                       ip link add lkbr0 type bridge
``set_master("lkh1", "lkbr0")``           ip link set lkh1 master lkbr0
``set_up("lo", netns=ns)``                ip -n NS link set lo up
``move("lkh2", ns)``                      ip link set lkh2 netns NS
``delete("lkbr0")``                       ip link del lkbr0
``add_address("eth0", "10.0.0.2/24")``    ip addr add 10.0.0.2/24 dev eth0
``add_route("default", via="10.0.0.1")``  ip route add default via 10.0.0.1
``links()`` / ``addresses()`` / ``routes()``  ip link / ip addr / ip route (as dataclasses)
``set_forwarding(True, netns=ns)``        sysctl -w net.ipv4.ip_forward=1 (in NS)
========================================  =============================================

Every function takes ``netns=``: None for the host's namespace, a ``NetNS`` or a labkit
namespace's name (like ``ip -n NAME``). The netlink socket for a namespace is made
inside it (``NetNS.call``), and a socket stays in the namespace it was made in.

Names are checked before anything is sent: at most 15 bytes (IFNAMSIZ 16 with the NUL),
no ``/``, ``:`` or space; a link that labkit makes in the host's namespace starts with
``lk`` (``paths.LINK_PREFIX``), so ``labkit cleanup`` can find it. Inside labkit's own
namespaces any valid name goes (``eth0``): they go with the namespace. A veth pair is one
netlink message, with the peer made directly in its namespace: it exists whole or not at all.

Man pages: ip-link(8), ip-address(8), ip-route(8), veth(4), rtnetlink(7); the bridge:
Documentation/networking/bridge.rst. pyroute2: IPRoute's docs ("IPRoute module").
Layer: kernel. Used by the engine (a container's eth0 on labkit's bridge), cleanup,
notebook 08 and the tests.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from labkit import paths
from labkit.errors import InvalidValue, NetlinkError, NotFound, require_root
from labkit.kernel.network.netns import NetNS

IFNAMSIZ = 16  # include/uapi/linux/if.h: names are at most 15 bytes and a NUL
NETLINK_ROUTE = 0
IFF_UP = 0x1

Netns = NetNS | str | None


@dataclass(frozen=True)
class Link:
    """One line of ``ip link``."""

    index: int
    name: str
    kind: str  # "veth", "bridge", ... ("" for lo and physical devices)
    up: bool  # administratively up (IFF_UP); ``state`` is what the kernel sees
    state: str  # operstate: "UP", "DOWN", "UNKNOWN" (lo), "LOWERLAYERDOWN"...
    mac: str
    mtu: int
    master: str | None  # the bridge it is enslaved to


@dataclass(frozen=True)
class Address:
    """One address of ``ip addr``: ``10.0.0.2/24`` on ``eth0``."""

    link: str
    cidr: str


@dataclass(frozen=True)
class Route:
    """One IPv4 route of the main table, as ``ip route`` shows it."""

    dst: str  # "default" or a network, "10.0.0.0/24"
    via: str | None  # the gateway
    dev: str | None


# -- checking input before the kernel sees it ----------------------------------------------
def check_link_name(name: object, *, on_host: bool = True) -> str:
    """A link name the kernel accepts (dev_valid_name); on the host, with our prefix, or
    the default network's bridge (``labkit0``, the one name cleanup knows besides lk*)."""
    accepted = "1-15 characters without '/', ':' or spaces"
    if on_host:
        accepted = f"a name starting with '{paths.LINK_PREFIX}', " + accepted + f" (e.g. {paths.LINK_PREFIX}br0)"
    ok = isinstance(name, str) and 0 < len(name.encode()) < IFNAMSIZ and name not in (".", "..")
    ok = ok and not re.search(r"[/:\s]", name)  # type: ignore[arg-type]
    ours = ok and (name.startswith(paths.LINK_PREFIX) or name == paths.DEFAULT_BRIDGE)  # type: ignore[union-attr]
    if not ok or (on_host and not ours):
        raise InvalidValue("link name", name, accepted)
    return name  # type: ignore[return-value]


def check_interface(cidr: object) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An address with its prefix length, as ``ip addr add`` takes it: ``10.0.0.2/24``."""
    accepted = "an address with a prefix length, e.g. 10.0.0.2/24"
    if not isinstance(cidr, str) or "/" not in cidr:
        raise InvalidValue("address", cidr, accepted)
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError:
        raise InvalidValue("address", cidr, accepted) from None


def check_network(cidr: object, what: str = "network") -> ipaddress.IPv4Network:
    """An IPv4 network with no host bits set: ``10.0.0.0/24``."""
    accepted = "an IPv4 network, e.g. 10.0.0.0/24 (no host bits set)"
    if not isinstance(cidr, str) or "/" not in cidr:
        raise InvalidValue(what, cidr, accepted)
    try:
        return ipaddress.IPv4Network(cidr)
    except ValueError:
        raise InvalidValue(what, cidr, accepted) from None


def check_ip(value: object, what: str = "IP address") -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidValue(what, value, "an IPv4 address, e.g. 10.0.0.1") from None


# -- talking netlink -------------------------------------------------------------------------
@contextlib.contextmanager
def _ns(netns: Netns) -> Iterator[NetNS | None]:
    if netns is None or isinstance(netns, NetNS):
        yield netns
    else:
        with NetNS.open(netns) as ns:
            yield ns


@contextlib.contextmanager
def ipr(netns: Netns = None, command: str = "") -> Iterator:
    """``with ipr(netns) as ipr:``: a pyroute2 IPRoute talking to ``netns``; a netlink
    error on the way out becomes one labkit NetlinkError that names ``command``."""
    from pyroute2 import IPRoute  # heavy: loaded by the first network call, not by `import labkit`
    from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

    require_root("changing network links")
    with _ns(netns) as ns:
        if ns is None:
            route = IPRoute()
        else:  # a netlink socket made inside the namespace speaks for that namespace
            sock = ns.call(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE))
            route = IPRoute(use_socket=sock)
        try:
            with route:
                yield route
        except PyNetlinkError as e:
            prefix = f"ip -n {ns.name} " if ns is not None else "ip "
            raise NetlinkError(e.code, prefix + command) from None


def _where(netns: Netns) -> str:
    return f" in network namespace {netns.name if isinstance(netns, NetNS) else netns}" if netns else ""


def _index(ip, name: str, netns: Netns) -> int:
    found = ip.link_lookup(ifname=name)
    if not found:
        raise NotFound(f"no link {name!r}{_where(netns)}")
    return found[0]


def _link(msg, names: dict[int, str]) -> Link:
    master = msg.get("master")
    return Link(index=msg["index"], name=msg.get("ifname"), kind=msg.get(("linkinfo", "kind")) or "",
                up=bool(msg["flags"] & IFF_UP), state=msg.get("operstate") or "", mac=msg.get("address") or "",
                mtu=msg.get("mtu") or 0, master=names.get(master) if master else None)


# -- ip link ----------------------------------------------------------------------------------
def links(netns: Netns = None) -> list[Link]:
    """``ip link``: every link in the namespace, in index order."""
    with ipr(netns, "link show") as ip:
        msgs = list(ip.get_links())
    names = {m["index"]: m.get("ifname") for m in msgs}
    return sorted((_link(m, names) for m in msgs), key=lambda link: link.index)


def link(name: str, netns: Netns = None) -> Link:
    """One link by name (``ip link show NAME``); NotFound if there is none."""
    for found in links(netns):
        if found.name == name:
            return found
    raise NotFound(f"no link {name!r}{_where(netns)}")


def veth(name: str, peer: str, *, peer_netns: Netns = None, netns: Netns = None) -> Link:
    """A veth pair: two ends of one cable. ``name`` stays in ``netns``; ``peer`` is made
    directly in ``peer_netns`` (one message: the pair exists whole or not at all)."""
    check_link_name(name, on_host=netns is None)
    check_link_name(peer, on_host=peer_netns is None)
    with _ns(peer_netns) as pns:
        peer_spec: dict = {"ifname": peer}
        where = ""
        if pns is not None:
            peer_spec["net_ns_fd"] = pns.fd
            where = f" netns {pns.name}"
        with ipr(netns, f"link add {name} type veth peer name {peer}{where}") as ip:
            ip.link("add", ifname=name, kind="veth", peer=peer_spec)
    return link(name, netns)


def bridge(name: str, netns: Netns = None) -> Link:
    """A Linux bridge: a virtual switch that the host ends of veth pairs plug into."""
    check_link_name(name, on_host=netns is None)
    with ipr(netns, f"link add {name} type bridge") as ip:
        ip.link("add", ifname=name, kind="bridge")
    return link(name, netns)


def set_master(name: str, master: str | None, netns: Netns = None) -> None:
    """Plug ``name`` into the bridge ``master`` (None: ``ip link set NAME nomaster``)."""
    with ipr(netns, f"link set {name} " + (f"master {master}" if master else "nomaster")) as ip:
        ip.link("set", index=_index(ip, name, netns), master=_index(ip, master, netns) if master else 0)


def set_up(name: str, netns: Netns = None, up: bool = True) -> None:
    """``ip link set NAME up`` (``up=False``: down). A new namespace's ``lo`` starts down."""
    state = "up" if up else "down"
    with ipr(netns, f"link set {name} {state}") as ip:
        ip.link("set", index=_index(ip, name, netns), state=state)


def move(name: str, to: Netns, netns: Netns = None) -> None:
    """``ip link set NAME netns TO``: the link leaves ``netns`` (its addresses go)."""
    if to is None:  # back to the host's: the name must be one cleanup can find there
        check_link_name(name)
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # the caller's
        try:
            with ipr(netns, f"link set {name} netns {os.getpid()}") as ip:
                ip.link("set", index=_index(ip, name, netns), net_ns_fd=fd)
        finally:
            os.close(fd)
        return
    with _ns(to) as target, ipr(netns, f"link set {name} netns {target.name}") as ip:
        ip.link("set", index=_index(ip, name, netns), net_ns_fd=target.fd)


def delete(name: str, netns: Netns = None) -> None:
    """``ip link del NAME``; deleting one end of a veth pair deletes both. A link that is
    gone, even one that went between the lookup and the delete (its peer's owner removed
    the pair first), raises NotFound."""
    try:
        with ipr(netns, f"link del {name}") as ip:
            ip.link("del", index=_index(ip, name, netns))
    except NetlinkError as e:
        if e.errno != errno.ENODEV:
            raise
        raise NotFound(f"no link {name!r}{_where(netns)}") from None


# -- ip addr, ip route -----------------------------------------------------------------------
def add_address(name: str, cidr: str, netns: Netns = None) -> Address:
    """``ip addr add CIDR dev NAME``; the kernel adds the subnet's route with it."""
    iface = check_interface(cidr)
    with ipr(netns, f"addr add {iface} dev {name}") as ip:
        ip.addr("add", index=_index(ip, name, netns), address=str(iface.ip), prefixlen=iface.network.prefixlen)
    return Address(name, str(iface))


def addresses(netns: Netns = None, link: str | None = None) -> list[Address]:
    """``ip addr`` (IPv4 and IPv6), optionally of one link only."""
    with ipr(netns, "addr show") as ip:
        names = {m["index"]: m.get("ifname") for m in ip.get_links()}
        found = [Address(names.get(a["index"], "?"), f"{a.get('address')}/{a['prefixlen']}") for a in ip.get_addr()]
    return [a for a in found if link is None or a.link == link]


def add_route(dst: str, *, via: str | None = None, dev: str | None = None, netns: Netns = None) -> Route:
    """``ip route add DST [via GATEWAY] [dev NAME]``; DST is ``default`` or a network."""
    net = "default" if dst == "default" else str(check_network(dst, "route destination"))
    gateway = str(check_ip(via, "gateway")) if via is not None else None
    if gateway is None and dev is None:
        raise InvalidValue("route", dst, "a gateway (via=) or a link (dev=), or both")
    command = f"route add {net}" + (f" via {gateway}" if gateway else "") + (f" dev {dev}" if dev else "")
    with ipr(netns, command) as ip:
        spec: dict = {"dst": "0.0.0.0/0" if net == "default" else net}
        if gateway:
            spec["gateway"] = gateway
        if dev:
            spec["oif"] = _index(ip, dev, netns)
        ip.route("add", **spec)
    return Route(net, gateway, dev)


def routes(netns: Netns = None) -> list[Route]:
    """``ip route``: the IPv4 routes of the main table."""
    with ipr(netns, "route show") as ip:
        names = {m["index"]: m.get("ifname") for m in ip.get_links()}
        found = []
        for r in ip.get_routes(family=socket.AF_INET, table=254):
            dst = f"{r.get('dst')}/{r['dst_len']}" if r.get("dst") else "default"
            found.append(Route(dst, r.get("gateway"), names.get(r.get("oif"))))
    return found


def set_forwarding(enabled: bool = True, netns: Netns = None) -> None:
    """``net.ipv4.ip_forward``: whether the namespace routes packets between its links.
    A NAT host needs it (Docker turns it on). It is per namespace: /proc/sys/net shows
    the namespace of the thread that opens it, so write it from inside."""
    require_root("setting net.ipv4.ip_forward")

    def write() -> None:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1" if enabled else "0")

    with _ns(netns) as ns:
        write() if ns is None else ns.call(write)


def set_conf(name: str, key: str, value: str, netns: Netns = None) -> None:
    """``sysctl -w net.ipv4.conf.NAME.KEY=VALUE``: a per-link IPv4 setting
    (``route_localnet``, ``rp_filter``...; Documentation/networking/ip-sysctl.rst)."""
    check_link_name(name, on_host=False)
    if not re.fullmatch(r"[a-z_]{1,32}", key):
        raise InvalidValue("sysctl key", key, "a net.ipv4.conf key such as route_localnet")
    require_root(f"setting net.ipv4.conf.{name}.{key}")

    def write() -> None:
        with open(f"/proc/sys/net/ipv4/conf/{name}/{key}", "w") as f:
            f.write(value)

    with _ns(netns) as ns:
        write() if ns is None else ns.call(write)


def forwarding(netns: Netns = None) -> bool:
    def read() -> bool:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip() == "1"

    with _ns(netns) as ns:
        return read() if ns is None else ns.call(read)


def remove_all(prefix: str = paths.LINK_PREFIX) -> list[str]:
    """Delete every link in the host's namespace whose name starts with ``prefix``
    (cleanup's step). A veth end that goes takes its peer with it."""
    names = sorted(n for n in os.listdir("/sys/class/net") if n.startswith(prefix))
    done = []
    for name in names:
        try:
            delete(name)
        except (NotFound, NetlinkError) as e:  # gone already: its peer was deleted first
            if isinstance(e, NetlinkError) and e.errno != 19:  # ENODEV
                raise
            continue
        done.append(f"removed link {name}")
    return done
