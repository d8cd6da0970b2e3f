"""labkit.kernel.network on the real kernel: namespaces, veth, bridges, routes, NAT, DNAT.

Traffic goes only to addresses inside namespaces these tests make. The NAT tests build
a whole small world of their own, so the host's routing and its ip_forward stay as they
are: a "host" namespace with a bridge and NAT (labkit's table lives there), a
"container" on the bridge, and an "upstream" namespace acting as router and server.

Every object is named after the test's own id (``labkit-t<id>-*``, ``lk<id>*``,
``table ip labkit-t<id>``), because other test runs create labkit objects on this
machine at the same time: the checks look at their own objects only. A canary table
of the tests' own must survive every labkit operation and every cleanup.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import threading

import pytest

from labkit import paths
from labkit.errors import AlreadyExists, InvalidValue, LabkitError, NetlinkError, NotFound
from labkit.kernel import mounts
from labkit.kernel import network as net
from labkit.kernel.syscalls import CloneFlags, setns
from labkit.lab import cleanup
from tests.bundles import SLOWDOWN
from tests.conftest import need_tool

TIMEOUT = 2.0 * SLOWDOWN  # seconds for any one connection, reply or ping (SLOWDOWN: see bundles)


# -- names, canary, and what is ours -----------------------------------------------------------
@pytest.fixture
def tid():
    """This test's id; teardown removes (and then checks) everything named after it."""
    t = secrets.token_hex(2)
    yield t
    net.remove_all(netns_prefix=f"labkit-t{t}", link_prefix=f"lk{t}", table_prefix=f"labkit-t{t}")
    assert ours(t) == {"netns": [], "links": [], "tables": []}


def ours(t: str) -> dict[str, list[str]]:
    return {"netns": [n for n in net.namespaces() if n.startswith(f"labkit-t{t}")],
            "links": sorted(n for n in os.listdir("/sys/class/net") if n.startswith(f"lk{t}")),
            "tables": [n for n in net.tables() if n.startswith(f"labkit-t{t}")]}


def nft_cli(*args: str, netns: str | None = None) -> str:
    cmd = ([need_tool("ip"), "netns", "exec", netns] if netns else []) + [need_tool("nft"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr.strip()}"
    return out.stdout


class Canary:
    """A rule in a table of the tests' own (not a labkit name), made with the nft CLI."""

    def __init__(self, netns: str | None = None) -> None:
        self.table, self.netns = f"canary_{secrets.token_hex(2)}", netns
        nft_cli("add", "table", "ip", self.table, netns=netns)
        nft_cli("add", "chain", "ip", self.table, "c", "{ type filter hook forward priority 0; policy accept; }",
                netns=netns)
        nft_cli("add", "rule", "ip", self.table, "c", "counter", "comment", '"canary"', netns=netns)

    def alive(self) -> bool:
        out = json.loads(nft_cli("-j", "list", "table", "ip", self.table, netns=self.netns))
        return [r["rule"].get("comment") for r in out["nftables"] if "rule" in r] == ["canary"]

    def remove(self) -> None:
        nft_cli("delete", "table", "ip", self.table, netns=self.netns)


@pytest.fixture
def canary():
    c = Canary()
    yield c
    assert c.alive(), "a labkit operation touched a table that is not labkit's"
    c.remove()


# -- traffic, inside namespaces --------------------------------------------------------------------
@contextlib.contextmanager
def tcp_server(ns: net.NetNS, port: int, reply: str, count: int = 4):
    """Listen on 0.0.0.0:port inside ``ns``; answer up to ``count`` connections with
    ``reply`` and the peer's address as the server saw it."""
    def listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        s.settimeout(5 * TIMEOUT)
        return s

    srv = ns.call(listen)  # the socket stays in ns, whichever thread uses it

    def serve() -> None:
        for _ in range(count):
            try:
                conn, peer = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{reply} {peer[0]}".encode())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would not
        srv.close()
        t.join(6 * TIMEOUT)


def tcp_get(ns: net.NetNS, ip: str, port: int) -> str:
    """Connect from inside ``ns``; return what the server said (raises on failure)."""
    def get() -> str:
        with socket.create_connection((ip, port), timeout=TIMEOUT) as c:
            return c.recv(200).decode()

    return ns.call(get)


def udp_ask(client: net.NetNS, server: net.NetNS, port: int, ip: str, dport: int) -> str:
    """One datagram from ``client`` to ip:dport; ``server`` listens on ``port``."""
    srv = server.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    srv.bind(("0.0.0.0", port))
    srv.settimeout(3 * TIMEOUT)

    def answer() -> None:
        with contextlib.suppress(OSError):
            data, peer = srv.recvfrom(100)
            srv.sendto(data + f" {peer[0]}".encode(), peer)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        def ask() -> str:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(TIMEOUT)
                c.sendto(b"dns?", (ip, dport))
                return c.recv(100).decode()

        return client.call(ask)
    finally:
        srv.close()
        t.join(4 * TIMEOUT)


def ping(ns: net.NetNS, ip: str) -> bool:
    """busybox ping from inside ``ns``, through ``ip netns exec`` (labkit's names work there)."""
    cmd = [need_tool("ip"), "netns", "exec", ns.name, need_tool("busybox"), "ping", "-c", "1", "-W", "2", ip]
    return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0


def free_subnet() -> str:
    """A /30 for the host end of a veth that no route of the host's covers."""
    taken = [r.dst for r in net.routes() if r.dst != "default"]
    for _ in range(50):
        cand = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}.0/30"
        if not any(net.check_network(cand).overlaps(net.check_network(t)) for t in taken):
            return cand
    pytest.fail("no free /30 in 10.200-249.x.x")


# -- namespaces ---------------------------------------------------------------------------------------
def test_namespace_is_kept_under_the_run_root_and_seen_by_ip_netns(tid, canary):
    name = f"labkit-t{tid}-a"
    with net.NetNS.create(name) as ns:
        # a fresh stack: only lo, and it is down
        assert [(link.name, link.up) for link in net.links(ns)] == [("lo", False)]
        net.set_up("lo", ns)
        assert net.link("lo", ns).up
        # kept alive by an nsfs bind mount under the run root, visible to ip(8) by a symlink
        assert ns.path == paths.netns_dir() / name
        assert [m.fstype for m in mounts.mountinfo() if m.mountpoint == str(ns.path)] == ["nsfs"]
        assert os.readlink(paths.IP_NETNS_DIR / name) == str(ns.path)
        listed = subprocess.run([need_tool("ip"), "netns", "list"], capture_output=True, text=True, timeout=10)
        assert name in listed.stdout.split()
        assert name in net.namespaces()
        # ns.fd is usable with setns(2): a thread that joins it sees the namespace's inode
        inside = net.call_in(ns.fd, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inside == os.fstat(ns.fd).st_ino != os.stat("/proc/self/ns/net").st_ino

        def join_by_hand() -> int:
            setns(ns.fd, CloneFlags.CLONE_NEWNET)
            return os.stat("/proc/thread-self/ns/net").st_ino

        assert net.netns.in_thread(join_by_hand) == inside
        with pytest.raises(AlreadyExists, match=name):
            net.NetNS.create(name)
        with net.NetNS.open(name) as again:  # opening does not own it: leaving only closes
            assert os.fstat(again.fd).st_ino == inside
        assert name in net.namespaces()
    assert name not in net.namespaces()
    assert not os.path.lexists(paths.IP_NETNS_DIR / name) and not ns.path.exists()
    assert not [m for m in mounts.mountinfo() if m.mountpoint == str(ns.path)]
    with pytest.raises(NotFound):
        net.NetNS.open(name)


def test_two_removers_of_one_namespace_at_once_both_succeed(tid, canary, monkeypatch):
    """A --rm container's shim releases its network while another container's labkit
    sweeps the lease as stale: both remove the namespace, and the later one finds each
    step done already, even one done between its look and its act."""
    name = f"labkit-t{tid}-a"
    ns = net.NetNS.create(name)
    path, link = ns.path, paths.IP_NETNS_DIR / name
    ns.remove()
    real_exists = os.path.exists
    monkeypatch.setattr(net.netns.os.path, "exists", lambda p: p == path or real_exists(p))  # looked before
    net.netns._remove_paths(path, link)  # unmount: ENOENT, unlink: gone; neither is an error
    monkeypatch.undo()
    assert name not in net.namespaces()


# -- veth, bridge -------------------------------------------------------------------------------------
def test_veth_across_host_and_namespace(tid, canary):
    subnet = net.check_network(free_subnet())
    host_ip, ns_ip = (str(subnet.network_address + i) for i in (1, 2))
    with net.NetNS.create(f"labkit-t{tid}-a") as ns:
        host_end = net.veth(f"lk{tid}h", "eth0", peer_netns=ns)
        assert host_end.kind == "veth" and not host_end.up
        assert [link.name for link in net.links(ns)] == ["lo", "eth0"]
        net.add_address(f"lk{tid}h", f"{host_ip}/30")
        net.set_up(f"lk{tid}h")
        net.add_address("eth0", f"{ns_ip}/30", netns=ns.name)  # by name works as well
        net.set_up("eth0", ns)
        net.set_up("lo", ns)
        assert net.Address("eth0", f"{ns_ip}/30") in net.addresses(ns, link="eth0")
        assert net.Route(str(subnet), None, "eth0") in net.routes(ns)
        with tcp_server(ns, 7000, "inside"):
            assert tcp_get_host(ns_ip, 7000) == f"inside {host_ip}"
        # a second pair made on the host, one end moved in afterwards
        net.veth(f"lk{tid}m", f"lk{tid}n")
        net.move(f"lk{tid}n", ns)
        assert f"lk{tid}n" in [link.name for link in net.links(ns)]
        assert f"lk{tid}n" not in os.listdir("/sys/class/net")
        net.delete(f"lk{tid}h")  # one end goes, the peer with it
        assert "eth0" not in [link.name for link in net.links(ns)]
        assert f"lk{tid}h" not in os.listdir("/sys/class/net")


def test_a_link_that_goes_between_lookup_and_delete_is_not_found(tid, monkeypatch):
    """Two owners may remove one veth pair at once (a container's shim, and `labkit cleanup`
    releasing its lease): the one that comes second is told NotFound, which it ignores."""
    import importlib

    links = importlib.import_module("labkit.kernel.network.links")  # the module, not net.links()
    net.veth(f"lk{tid}a", f"lk{tid}b")
    stale = net.link(f"lk{tid}a").index
    net.delete(f"lk{tid}b")  # the other owner wins the race
    monkeypatch.setattr(links, "_index", lambda ip, name, netns: stale)  # our lookup came first
    with pytest.raises(NotFound, match=f"lk{tid}a"):
        net.delete(f"lk{tid}a")
    monkeypatch.undo()
    with pytest.raises(NotFound):
        net.delete(f"lk{tid}a")


def tcp_get_host(ip: str, port: int) -> str:
    with socket.create_connection((ip, port), timeout=TIMEOUT) as c:
        return c.recv(200).decode()


def test_bridge_joins_two_namespaces(tid, canary):
    need_tool("busybox")
    br = f"lk{tid}br"
    with net.NetNS.create(f"labkit-t{tid}-a") as a, net.NetNS.create(f"labkit-t{tid}-b") as b:
        assert net.bridge(br).kind == "bridge"
        net.set_up(br)
        for ns, end, ip in ((a, f"lk{tid}a", "10.77.0.2/24"), (b, f"lk{tid}b", "10.77.0.3/24")):
            net.veth(end, "eth0", peer_netns=ns)
            net.set_master(end, br)
            net.set_up(end)
            net.add_address("eth0", ip, ns)
            net.set_up("eth0", ns)
            net.set_up("lo", ns)
            assert net.link(end).master == br
        assert ping(a, "10.77.0.3") and ping(b, "10.77.0.2")
        with tcp_server(b, 7001, "b"):
            assert tcp_get(a, "10.77.0.3", 7001) == "b 10.77.0.2"
        net.set_master(f"lk{tid}b", None)  # unplugged: b is out of reach
        assert net.link(f"lk{tid}b").master is None
        assert not ping(a, "10.77.0.3")


# -- routes, NAT, published ports: a world of the test's own ---------------------------------------------
@pytest.fixture
def world(tid):
    """host: br0 10.77.0.1/24 and up0 10.88.0.1/24, forwarding on, labkit's table;
    container: eth0 10.77.0.2/24 on br0, default via 10.77.0.1;
    upstream: eth0 10.88.0.2/24, and no route back to 10.77.0.0/24."""
    with contextlib.ExitStack() as stack:
        host, ctr, up = (stack.enter_context(net.NetNS.create(f"labkit-t{tid}-{n}")) for n in ("host", "ctr", "up"))
        for ns in (host, ctr, up):
            net.set_up("lo", ns)
        net.bridge("br0", netns=host)
        net.add_address("br0", "10.77.0.1/24", host)
        net.veth("veth0", "eth0", netns=host, peer_netns=ctr)
        net.set_master("veth0", "br0", host)
        net.veth("up0", "eth0", netns=host, peer_netns=up)
        net.add_address("up0", "10.88.0.1/24", host)
        for name in ("br0", "veth0", "up0"):
            net.set_up(name, host)
        net.add_address("eth0", "10.77.0.2/24", ctr)
        net.set_up("eth0", ctr)
        net.add_route("default", via="10.77.0.1", netns=ctr)
        net.add_address("eth0", "10.88.0.2/24", up)
        net.set_up("eth0", up)
        net.set_forwarding(True, host)
        canary = Canary(netns=host.name)
        table = net.Table(f"labkit-t{tid}", netns=host)
        yield {"host": host, "ctr": ctr, "up": up, "table": table, "canary": canary}
        assert canary.alive()
        table.remove()
        assert canary.alive() and table.name not in net.tables(host)


def test_route_and_masquerade_to_upstream(world, canary):
    host, ctr, up, table = world["host"], world["ctr"], world["up"], world["table"]
    assert net.forwarding(host) and net.Route("default", "10.77.0.1", "eth0") in net.routes(ctr)
    with tcp_server(up, 8000, "upstream"):
        # routed, not translated: upstream has no route back to 10.77.0.0/24
        with pytest.raises(OSError):
            tcp_get(ctr, "10.88.0.2", 8000)
        table.create()
        table.masquerade("10.77.0.0/24", bridge="br0", tag="c1")
        table.accept_forward("br0", tag="c1")
        assert world["canary"].alive()
        # upstream sees the host's address on its link, not the container's
        assert tcp_get(ctr, "10.88.0.2", 8000) == "upstream 10.88.0.1"
        assert [r.chain for r in table.rules() if r.tag == "c1"] == ["postrouting", "forward", "forward"]
        assert table.remove_rules("c1") == 3
        with pytest.raises(OSError):
            tcp_get(ctr, "10.88.0.2", 8000)


def test_published_port_reaches_the_container(world, canary):
    host, ctr, up, table = world["host"], world["ctr"], world["up"], world["table"]
    with table:  # created on entry, removed as a whole on exit
        table.masquerade("10.77.0.0/24", bridge="br0")
        table.publish(8080, "10.77.0.2", 80, tag="c1")
        table.publish(5353, "10.77.0.2", 53, proto="udp", tag="c1")
        assert [r.text for r in table.rules() if r.tag == "c1"] == [
            'tcp dport 8080 dnat to 10.77.0.2:80 comment "c1"', 'udp dport 5353 dnat to 10.77.0.2:53 comment "c1"']
        with tcp_server(ctr, 80, "container"):
            # from another namespace, through the host's address on its link (prerouting)
            assert tcp_get(up, "10.88.0.1", 8080) == "container 10.88.0.2"
            # from the host itself, to its own address on the bridge (output)
            assert tcp_get(host, "10.77.0.1", 8080) == "container 10.77.0.1"
            assert udp_ask(up, ctr, 53, "10.88.0.1", 5353) == "dns? 10.88.0.2"
            # the container's rules go, the port is closed: the host answers with a reset
            assert table.remove_rules("c1") == 2
            with pytest.raises(ConnectionRefusedError):
                tcp_get(up, "10.88.0.1", 8080)
        assert world["canary"].alive()
    assert table.name not in net.tables(host)


# -- bad input, cleanup -----------------------------------------------------------------------------
def test_bad_input_is_one_line_and_creates_nothing(tid, canary):
    with net.NetNS.create(f"labkit-t{tid}-a") as ns:
        before = ours(tid)
        table = net.Table(f"labkit-t{tid}")
        cases = [
            (lambda: net.NetNS.create(f"labkit-t{tid}-" + "x" * 60), "network namespace name"),
            (lambda: net.NetNS.create(f"other-{tid}"), "network namespace name"),
            (lambda: net.NetNS.create(f"labkit-t{tid} b"), "network namespace name"),
            (lambda: net.veth(f"lk{tid}toolongname", "eth0", peer_netns=ns), "link name"),
            (lambda: net.veth(f"eth{tid}", "eth0", peer_netns=ns), "link name"),  # no lk prefix on the host
            (lambda: net.veth(f"lk{tid}v", "bad/name", peer_netns=ns), "link name"),
            (lambda: net.veth(f"lk{tid}v", f"lk{tid}w", peer_netns=f"labkit-t{tid}-nosuch"), "no network namespace"),
            (lambda: net.bridge(f"lk{tid} br"), "link name"),
            (lambda: net.add_address("eth0", "10.0.0.300/24", ns), "address"),
            (lambda: net.add_address("eth0", "10.0.0.2", ns), "address"),
            (lambda: net.add_address("eth0", "10.0.0.2/33", ns), "address"),
            (lambda: net.add_address("nosuch0", "10.0.0.2/24", ns), "no link 'nosuch0'"),
            (lambda: net.add_route("10.0.0.1/24", dev="lo", netns=ns), "route destination"),
            (lambda: net.add_route("default", via="abc", netns=ns), "gateway"),
            (lambda: net.add_route("default", netns=ns), "route"),
            (lambda: net.Table("nope"), "nftables table name"),
            (lambda: table.publish(70000, "10.77.0.2", 80), "host port"),
            (lambda: table.publish(0, "10.77.0.2", 80), "host port"),
            (lambda: table.publish("abc", "10.77.0.2", 80), "host port"),
            (lambda: table.publish(8080, "10.77.0.2", 80, proto="icmp"), "protocol"),
            (lambda: table.publish(8080, "10.77.0.999", 80), "container IP"),
            (lambda: table.masquerade("10.77.0.1/24", bridge=f"lk{tid}br"), "subnet"),
            (lambda: table.masquerade("10.77.0.0/24", bridge="x" * 16), "link name"),
            (lambda: table.accept_forward(f"lk{tid}br", tag='a"b'), "rule tag"),
        ]
        for call, what in cases:
            with pytest.raises(LabkitError) as err:
                call()
            msg = err.value.one_line()
            assert "\n" not in msg and what in msg, msg
            if isinstance(err.value, InvalidValue):
                assert repr(err.value.value) in msg  # names the value, then the accepted form
                assert "expected" in msg
        assert ours(tid) == before
        # the kernel's refusal is one line too, in ip(8)'s words, and leaves nothing
        net.veth(f"lk{tid}v", "eth1", peer_netns=ns)
        with pytest.raises(NetlinkError, match=f"ip link add lk{tid}v type veth peer name eth1 netns {ns.name}: EEXIST"):
            net.veth(f"lk{tid}v", "eth1", peer_netns=ns)
        assert [link.name for link in net.links(ns)] == ["lo", "eth1"]


def test_a_second_create_keeps_the_rules_networks_added(tid, canary):
    """Every network's ensure() calls create(): the second network's must not wipe the
    first one's loopback jump, nor double the untagged ones."""
    with net.Table(f"labkit-t{tid}") as table:
        table.publish_loopback(f"lk{tid}a", tag=f"lk{tid}a")
        before = sorted((r.chain, r.tag, r.text) for r in table.rules())
        table.create()
        assert sorted((r.chain, r.tag, r.text) for r in table.rules()) == before
        assert [r.tag for r in table.rules() if r.chain == "output"].count(f"lk{tid}a") == 1
        assert [r.tag for r in table.rules() if r.chain == "output"].count("") == 1
    assert canary.alive()


def test_cleanup_removes_our_namespaces_links_and_table(tid, canary):
    """cleanup's network step, narrowed to this test's names: the real `labkit cleanup`
    would also remove other test runs' objects on this machine."""
    hand = f"labkit-t{tid}-hand"
    ns = net.NetNS.create(f"labkit-t{tid}-a")
    net.veth(f"lk{tid}h", "eth0", peer_netns=ns)
    net.bridge(f"lk{tid}br")
    # a namespace the way `ip netns add` keeps one: a bind mount in /run/netns itself
    # (made by hand, since `ip netns add` would also turn /run/netns into a mount point)
    (paths.IP_NETNS_DIR / hand).touch()
    mounts.bind(ns.path, paths.IP_NETNS_DIR / hand, recursive=False)
    ns.close()  # as after a crash: nothing holds them but their bind mounts
    table = net.Table(f"labkit-t{tid}").create()
    table.publish(8080, "10.77.0.2", 80)
    assert ours(tid) == {"netns": [f"labkit-t{tid}-a", hand], "links": [f"lk{tid}br", f"lk{tid}h"],
                         "tables": [f"labkit-t{tid}"]}
    done = cleanup._remove_network(f"labkit-t{tid}", f"lk{tid}", f"labkit-t{tid}")
    assert sorted(done) == sorted([f"removed link lk{tid}br", f"removed link lk{tid}h",
                                   f"removed network namespace labkit-t{tid}-a",
                                   f"removed network namespace {hand}",
                                   f"removed nftables table ip labkit-t{tid}"])
    assert ours(tid) == {"netns": [], "links": [], "tables": []}
    assert not [m for m in mounts.mountinfo() if f"labkit-t{tid}" in m.mountpoint]
    assert cleanup._remove_network(f"labkit-t{tid}", f"lk{tid}", f"labkit-t{tid}") == []  # twice is safe
    assert canary.alive()


def test_importing_the_network_module_does_not_load_pyroute2():
    code = "import sys, labkit.kernel.network, labkit.lab.cleanup; print('pyroute2' in sys.modules)"
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(paths.Path(__file__).parent.parent)})
    assert out.stdout.strip() == "False", out.stderr


def test_the_default_roots_bridge_name_is_one_labkit_accepts(monkeypatch):
    """Outside the tests (no LABKIT_ROOT) the default network's bridge is labkit0, like
    docker0; the link layer must accept it, or every `labkit run` of a student fails."""
    monkeypatch.delenv("LABKIT_ROOT", raising=False)
    assert paths.bridge_name() == paths.DEFAULT_BRIDGE
    assert net.check_link_name(paths.bridge_name()) == paths.DEFAULT_BRIDGE
    with pytest.raises(InvalidValue):
        net.check_link_name("labkit1")  # only that one name outside lk*
