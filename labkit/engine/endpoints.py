"""A container on a network: its namespace, its veth, its address, its ports, its /etc files.

What ``docker run --network N -p 8080:80`` does before the container's init starts
(libnetwork calls the result an *endpoint*):

1. under ``ipam.lock()``: the next free address of N's subnet and the host ports, checked
   against every other lease; the lease is written to disk (``paths.endpoints_dir()/ID.json``)
   before any kernel object exists, so a crash after this point leaves a lease that names
   what to remove;
2. a network namespace ``labkit-ID`` and a veth pair, one netlink message each
   (pyroute2, no ``ip`` subprocess): ``eth0`` inside with the address and a default route
   via the bridge, the host end ``lkID`` plugged into the bridge;
3. a DNAT rule per published port, tagged with the container's id;
4. ``hosts``, ``hostname`` and ``resolv.conf`` for the container, bind-mounted over its
   /etc files, as Docker does.

The runtime then *joins* the namespace by path (OCI ``linux.namespaces[{type: network,
path}]``, init.enter_namespaces) instead of making a new one. ``release(ID)`` undoes it
all at ``rm``; a lease whose container never came to be and whose labkit process has died
(SIGKILL between steps) is swept at the next allocation, and ``labkit cleanup`` removes
the whole lot by name.

**Names: /etc/hosts, not a DNS server.** On a user-defined network every container's
/etc/hosts lists every other container of the network, and labkit rewrites them all in
place (same inode: the bind mount stays valid) when one joins or leaves. Docker answers
names from an embedded DNS server at 127.0.0.11 instead, which needs a resolver running
for each container's namespace. A file needs no process, the lookup is what every libc
does first, and students can ``cat`` it; what it cannot do is reach programs that
cache the file or query DNS directly. The default network has no names, as in Docker.

**resolv.conf** is the host's with loopback nameservers removed (a 127.0.0.53 stub is
the host's own, unreachable from the container's namespace); if none is left, Docker's
fallback 8.8.8.8 and 8.8.4.4.

Layer: engine. Used by the CLI's ``run``, ``rm``, ``ps`` and ``port``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from dataclasses import dataclass, field

from labkit import paths
from labkit.engine import ipam, networks
from labkit.engine.ports import PortMapping, assign
from labkit.errors import InvalidValue, LabkitError, NotFound
from labkit.kernel import proc, safe
from labkit.runtime.spec import Mount
from labkit.runtime.state import container_dir

HOSTS_HEAD = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
              "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")  # what Docker writes when the host has only loopback ones


@dataclass(frozen=True)
class Endpoint:
    """One container's lease (``ID.json``): what it was given and what to remove."""

    container_id: str
    name: str
    hostname: str
    network: str  # "bridge", "none", "host", "container:ID" or a user-defined name
    ip: str = ""
    prefixlen: int = 0
    gateway: str = ""
    host_link: str = ""
    netns: str = ""
    ports: tuple[PortMapping, ...] = ()
    files: str = ""  # the directory with hosts, hostname, resolv.conf
    owner: tuple[int, int] = (0, 0)  # pid and start time of the labkit process that made it
    netns_path: str = field(default="", compare=False)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["ports"] = [p.to_json() for p in self.ports]
        d["owner"] = list(self.owner)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Endpoint:
        d = dict(d)
        d["ports"] = tuple(PortMapping.from_json(p) for p in d.get("ports") or ())
        d["owner"] = tuple(d.get("owner") or (0, 0))
        return cls(**d)


def _lease(cid: str):
    return paths.endpoints_dir() / f"{cid}.json"


def load(cid: str) -> Endpoint | None:
    try:
        return Endpoint.from_json(json.loads(_lease(cid).read_text()))
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def all_endpoints() -> list[Endpoint]:
    d = paths.endpoints_dir()
    found = [load(f.stem) for f in sorted(d.glob("*.json"))] if d.is_dir() else []
    return [e for e in found if e is not None]


def _save(e: Endpoint) -> None:
    tmp = _lease(e.container_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(e.to_json()) + "\n")
    os.replace(tmp, _lease(e.container_id))


def users(network: str) -> list[str]:
    """Names of the containers on ``network`` (what ``network rm`` refuses to cut off)."""
    return [e.name for e in all_endpoints() if e.network == network]


# -- joining a network ------------------------------------------------------------------------
@dataclass(frozen=True)
class Attachment:
    """What the runtime needs: a namespace to join (or none), and three bind mounts."""

    endpoint: Endpoint
    join: tuple[tuple[str, str], ...]  # Spec.namespace_paths
    new_netns: bool  # whether the runtime makes a new one (``none``)
    mounts: tuple[Mount, ...]


def connect(cid: str, name: str, hostname: str, mode: str, wanted: list[PortMapping],
            peer: tuple[str, int] | None = None) -> Attachment:
    """Put container ``cid`` on ``mode`` (a network name, ``host``, ``none`` or ``container:``
    with ``peer`` = (its id, its init pid)). Everything is checked before anything is made;
    on any failure everything made is removed."""
    net_name = mode if peer is None else f"container:{peer[0]}"
    if wanted and (peer is not None or mode in ("host", "none")):
        raise InvalidValue("published port", str(wanted[0]), f"a bridge network: --network {mode} has no ports")
    network = networks.get(mode) if peer is None else None
    owner = (os.getpid(), proc.start_time(os.getpid()))
    files = str(paths.endpoints_dir() / cid)
    with ipam.lock():
        _sweep()
        e = Endpoint(cid, name, hostname, net_name, files=files, owner=owner)
        if network is not None and network.is_bridge:
            networks.ensure(network)
            others = [o for o in all_endpoints()]
            subnet = ipaddress.IPv4Network(network.subnet)
            ip = ipam.allocate(subnet, [o.ip for o in others if o.network == network.name and o.ip])
            ports = assign(wanted, [p for o in others for p in o.ports])
            e = Endpoint(cid, name, hostname, net_name, str(ip), subnet.prefixlen, network.gateway,
                         f"{paths.LINK_PREFIX}{cid[:13]}", f"{paths.NETNS_PREFIX}{cid[:12]}", tuple(ports),
                         files, owner)
        os.makedirs(files, exist_ok=True)
        _save(e)  # the lease first: from here on, release() knows what to undo
    try:
        return _attach(e, network, peer)
    except BaseException:
        release(cid)
        raise


def _attach(e: Endpoint, network, peer) -> Attachment:
    if peer is not None:  # share the other container's namespace and files
        other = load(peer[0])
        path = str(paths.netns_dir() / other.netns) if other and other.netns else f"/proc/{peer[1]}/ns/net"
        src = other.files if other else e.files
        if other is None:
            _write_files(e, HOSTS_HEAD)
        return Attachment(e, (("network", path),), False, _mounts(src))
    if network.name == "host":
        with open("/etc/hosts") as f:
            _write_files(e, f.read())
        return Attachment(e, (), False, _mounts(e.files))
    if network.name == "none":
        _write_files(e, HOSTS_HEAD)
        return Attachment(e, (), True, _mounts(e.files))
    _plumb(e, network)
    for p in e.ports:
        _table().publish(p.host_port, e.ip, p.container_port, proto=p.proto,
                         host_ip=None if p.host_ip == "0.0.0.0" else p.host_ip, tag=e.container_id)
    with ipam.lock():
        _write_files(e, HOSTS_HEAD)
        _refresh_hosts(network.name)
    return Attachment(e, (("network", str(paths.netns_dir() / e.netns)),), False, _mounts(e.files))


def _table():
    from labkit.kernel import network as net

    return net.Table(paths.nft_table())


def _plumb(e: Endpoint, network) -> None:
    """The namespace and the veth pair: one IPRoute on each side, a handful of messages."""
    from labkit.kernel import network as net
    from labkit.kernel.network.links import ipr

    net.check_link_name(e.host_link)
    ns = net.NetNS.create(e.netns)  # outlives this call: the container joins it, release() removes it
    try:
        with ipr(None, f"link add {e.host_link} type veth peer name eth0 netns {ns.name}") as ip:
            ip.link("add", ifname=e.host_link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.fd})
            host = ip.link_lookup(ifname=e.host_link)[0]
            ip.link("set", index=host, master=ip.link_lookup(ifname=network.bridge)[0], state="up")
        with ipr(ns, f"addr add {e.ip}/{e.prefixlen} dev eth0; route add default via {e.gateway}") as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
            eth0 = ip.link_lookup(ifname="eth0")[0]
            ip.addr("add", index=eth0, address=e.ip, prefixlen=e.prefixlen)
            ip.link("set", index=eth0, state="up")
            ip.route("add", dst="0.0.0.0/0", gateway=e.gateway)
    finally:
        ns.close()


# -- the files in /etc -------------------------------------------------------------------------
def _mounts(files: str) -> tuple[Mount, ...]:
    return tuple(Mount(f"/etc/{n}", "bind", f"{files}/{n}", ("bind", "rw")) for n in ("hosts", "hostname", "resolv.conf"))


def resolv_conf(text: str) -> str:
    """The host's resolv.conf for a container: loopback nameservers dropped.

    >>> resolv_conf("nameserver 127.0.0.53\\nsearch lab\\n")
    'search lab\\nnameserver 8.8.8.8\\nnameserver 8.8.4.4\\n'
    """
    kept, servers = [], 0
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
            servers += 1
        kept.append(line)
    if not servers:
        kept += [f"nameserver {s}" for s in FALLBACK_DNS]
    return "\n".join(kept) + "\n"


def _write_in_place(path: str, text: str) -> None:
    """Rewrite a file keeping its inode: a bind mount of it shows the new text at once."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_files(e: Endpoint, hosts: str) -> None:
    os.makedirs(e.files, exist_ok=True)
    try:
        with open("/etc/resolv.conf") as f:
            resolv = f.read()
    except OSError:
        resolv = ""
    _write_in_place(f"{e.files}/resolv.conf", resolv_conf(resolv) if e.network != "host" else resolv)
    _write_in_place(f"{e.files}/hostname", e.hostname + "\n")
    if e.ip:
        hosts += f"{e.ip}\t{e.hostname}\n"
    _write_in_place(f"{e.files}/hosts", hosts)


def _refresh_hosts(network: str) -> None:
    """On a user-defined network: every member's /etc/hosts lists every member by name
    (and hostname). The caller holds the lock."""
    if network in networks.BUILTIN:
        return
    members = [m for m in all_endpoints() if m.network == network and m.ip and os.path.isdir(m.files)]
    for m in members:
        lines = HOSTS_HEAD + "".join(f"{o.ip}\t{o.name} {o.hostname}\n" if o.name != o.hostname else f"{o.ip}\t{o.name}\n"
                                     for o in members)
        _write_in_place(f"{m.files}/hosts", lines)


# -- leaving ------------------------------------------------------------------------------------
def release(cid: str) -> bool:
    """Remove the container's rules, veth, namespace, files and lease; whether it had one.
    Safe to call twice, and on a lease half carried out."""
    e = load(cid)
    if e is None:
        return False
    _undo(e)
    with ipam.lock():
        _lease(cid).unlink(missing_ok=True)
        if e.network not in networks.BUILTIN and not e.network.startswith("container:"):
            _refresh_hosts(e.network)
    return True


def _undo(e: Endpoint) -> None:
    from labkit.kernel import network as net

    if e.ports:
        with contextlib.suppress(LabkitError):
            _table().remove_rules(e.container_id)
    # The veth goes with the namespace: once the last holder of a network namespace is
    # gone (the container's processes, then our bind mount), the kernel deletes the
    # virtual links in it, and a veth's peer with it, in its own cleanup work. Deleting
    # the veth here first would wait for that work (20 to 40 ms, an RCU grace period)
    # on every `run --rm`. Only where another container still shares the namespace
    # (--network container:ID) is the link deleted at once, so that it stops using the
    # address whose lease is given back.
    shared = e.netns and any(o.network == f"container:{e.container_id}" for o in all_endpoints())
    if e.host_link and (shared or not e.netns) and os.path.exists(f"/sys/class/net/{e.host_link}"):
        with contextlib.suppress(NotFound):
            net.delete(e.host_link)
    if e.netns:
        with contextlib.suppress(NotFound):
            net.NetNS.open(e.netns).remove()
    if os.path.isdir(e.files):
        safe.remove_tree(e.files, within=paths.run_root())


def _sweep() -> None:
    """Leases of containers that never came to be, whose labkit process is gone (it was
    killed between connect and create): undo them. The caller holds the lock."""
    for e in all_endpoints():
        if container_dir(e.container_id).exists() or proc.alive(e.owner[0], e.owner[1] or None):
            continue
        _undo(e)
        _lease(e.container_id).unlink(missing_ok=True)


def ports_of(cid: str) -> tuple[PortMapping, ...]:
    e = load(cid)
    return e.ports if e is not None else ()
