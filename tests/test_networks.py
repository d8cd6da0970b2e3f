"""Docker's network model through `labkit run`: the default bridge, leases, -p, --network
modes, names on a user-defined network, /etc files, NAT out to an "outside", faults.

The state root is this session's own (conftest.py), so the bridge and the nftables table
are its own too (paths.bridge_name, paths.nft_table). Traffic goes only to loopback and
to namespaces these tests make: the "outside" is a namespace with a veth to the host and
a server socket made inside it. Other test runs make lk* links meanwhile: the checks
look at this root's objects only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time

import pytest
from bundles import LABKIT, SLOWDOWN, labkit, leftovers, until

from labkit import paths
from labkit.kernel import network as net

TIMEOUT = 3.0 * SLOWDOWN


@pytest.fixture(autouse=True)
def clean():
    yield
    for cid in labkit("ps", "-a", "-q").stdout.split():
        labkit("rm", "-f", cid)
    for n in _user_networks():
        labkit("network", "rm", n)
    assert leftovers() == []
    assert _our_rules() == []


def _user_networks() -> list[str]:
    d = paths.networks_dir()
    return sorted(f.stem for f in d.glob("*.json") if f.stem != "bridge") if d.is_dir() else []


def _our_rules() -> list[str]:
    """Rules of this root's table tagged with a container id (64 hex digits)."""
    table = net.Table(paths.nft_table())
    return [r.text for r in table.rules() if len(r.tag) == 64] if table.exists() else []


def run_d(*args: str) -> str:
    r = labkit("run", "-d", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def lease(cid: str) -> dict:
    return json.loads((paths.endpoints_dir() / f"{cid}.json").read_text())


def free_port() -> int:
    for _ in range(50):
        port = 20000 + secrets.randbelow(20000)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("0.0.0.0", port))
            return port
    raise AssertionError("no free port")


HTTPD = "mkdir -p /www && echo hello-from-c > /www/index.html && exec httpd -f -p 80 -h /www"


def http_get(host: str, port: int, netns: net.NetNS | None = None) -> str:
    """GET / over one connection (made inside ``netns`` if given), bounded in time."""
    def make() -> socket.socket:
        return socket.create_connection((host, port), timeout=TIMEOUT)

    deadline = time.monotonic() + 10
    while True:
        try:
            s = netns.call(make) if netns else make()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode(errors="replace")


@contextlib.contextmanager
def outside(tid: str):
    """A namespace wired to the host by a veth (host 10.251.N.1, outside 10.251.N.2):
    the upstream router and server of the tests. Yields (namespace, host's address)."""
    n = secrets.randbelow(250) + 1
    host_ip, out_ip = f"10.251.{n}.1", f"10.251.{n}.2"
    ns = net.NetNS.create(f"labkit-t{tid}out")
    try:
        net.veth(f"lk{tid}o", "eth0", peer_netns=ns)
        net.add_address(f"lk{tid}o", f"{host_ip}/30")
        net.set_up(f"lk{tid}o")
        for link in ("lo", "eth0"):
            net.set_up(link, netns=ns)
        net.add_address("eth0", f"{out_ip}/30", netns=ns)
        yield ns, host_ip, out_ip
    finally:
        net.remove_all(netns_prefix=f"labkit-t{tid}", link_prefix=f"lk{tid}", table_prefix=f"labkit-t{tid}")


# -- the default network --------------------------------------------------------------------------
def test_default_bridge_gives_an_address_a_route_and_docker_s_etc_files():
    r = labkit("run", "--rm", "--hostname", "box1", "busybox", "sh", "-c",
               "ip -4 -o addr show eth0; ip route; cat /etc/hostname /etc/hosts /etc/resolv.conf")
    assert r.returncode == 0, r.stderr
    bridge = json.loads(labkit("network", "inspect", "bridge").stdout)[0]
    subnet = ipaddress.IPv4Network(bridge["IPAM"]["Config"][0]["Subnet"])
    address = r.stdout.split("inet ")[1].split()[0]
    assert ipaddress.IPv4Interface(address).network == subnet
    assert f"default via {subnet.network_address + 1} dev eth0" in r.stdout
    assert f"{address.split('/')[0]}\tbox1" in r.stdout and "127.0.0.1\tlocalhost" in r.stdout
    assert "box1\n" in r.stdout and "127.0.0.53" not in r.stdout and "nameserver" in r.stdout
    # the bridge is this root's own, and its subnet is on no other route of the host
    assert bridge["Options"]["com.docker.network.bridge.name"] == paths.bridge_name()
    others = [ipaddress.IPv4Network(x.dst) for x in net.routes() if x.dst != "default" and x.dev != paths.bridge_name()]
    assert not any(subnet.overlaps(o) for o in others)
    assert leftovers() == []  # --rm released the lease, the veth and the namespace


def test_exec_joins_the_containers_network_namespace():
    cid = run_d("busybox", "sleep", "60")
    try:
        inside = labkit("run", "--rm", "--network", f"container:{cid}", "busybox", "ls", "/sys/class/net").stdout
        r = labkit("exec", cid, "ls", "/sys/class/net")
        assert r.returncode == 0 and r.stdout.split() == inside.split() == ["eth0", "lo"], (r.stdout, inside)
    finally:
        labkit("rm", "-f", cid)


def test_network_none_and_host():
    r = labkit("run", "--rm", "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net; cat /etc/hosts")
    assert r.returncode == 0 and r.stdout.split()[0] == "lo" and "127.0.0.1" in r.stdout, r.stderr
    r = labkit("run", "--rm", "--network", "host", "busybox", "ls", "/sys/class/net")
    assert sorted(r.stdout.split()) == sorted(os.listdir("/sys/class/net"))


def test_twenty_parallel_starts_get_twenty_addresses_and_rm_releases_them():
    procs = [subprocess.Popen([*LABKIT, "run", "-d", "busybox", "sleep", "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) for _ in range(20)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=120 * SLOWDOWN)
        assert p.returncode == 0, err
        ids.append(out.strip())
    ips = {lease(c)["ip"] for c in ids}
    assert len(ips) == 20
    links = [lease(c)["host_link"] for c in ids]
    namespaces = [lease(c)["netns"] for c in ids]
    assert all(os.path.exists(f"/sys/class/net/{n}") for n in links)
    assert labkit("rm", "-f", *ids).returncode == 0
    # the leases and namespaces at once; each veth goes with its namespace, in the kernel's
    # own cleanup work, a few ms later (endpoints._undo)
    assert not any((paths.netns_dir() / lease_ns).exists() for lease_ns in namespaces)
    until(lambda: not any(os.path.exists(f"/sys/class/net/{n}") for n in links), 10)
    assert leftovers() == []


def test_labkitd_restart_keeps_the_leases():
    from labkit.cli.daemon import start
    from labkit.engine import daemon

    start()
    try:
        first = run_d("busybox", "sleep", "60")
        daemon.stop()
        start()
        second = run_d("busybox", "sleep", "60")
        assert lease(first)["ip"] != lease(second)["ip"]
    finally:
        if daemon.running_pid():
            daemon.stop()


# -- published ports ----------------------------------------------------------------------------
def test_a_published_port_answers_on_loopback_and_from_another_namespace():
    port = free_port()
    cid = run_d("--name", "web-p", "-p", f"{port}:80", "busybox", "sh", "-c", HTTPD)
    assert "hello-from-c" in http_get("127.0.0.1", port)
    tid = secrets.token_hex(2)
    with outside(tid) as (ns, host_ip, _):
        assert "hello-from-c" in http_get(host_ip, port, netns=ns)  # through the host's address
    assert labkit("port", "web-p").stdout == f"80/tcp -> 0.0.0.0:{port}\n"
    assert f"0.0.0.0:{port}->80/tcp" in labkit("ps").stdout
    labkit("rm", "-f", cid)
    assert _our_rules() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_ranges_and_ephemeral_ports():
    port = free_port()
    run_d("--name", "ranges", "-p", f"127.0.0.1:{port}-{port + 1}:80-81/udp", "-p", "80", "busybox", "sleep", "60")
    lines = labkit("port", "ranges").stdout.splitlines()
    assert lines[:2] == [f"80/udp -> 127.0.0.1:{port}", f"81/udp -> 127.0.0.1:{port + 1}"]
    assert lines[2].startswith("80/tcp -> 0.0.0.0:") and int(lines[2].rsplit(":", 1)[1]) >= 49153


def test_a_port_taken_by_a_container_or_a_host_process_is_one_line_and_nothing_made():
    port = free_port()
    run_d("--name", "first", "-p", f"{port}:80", "busybox", "sleep", "60")
    before = sorted(paths.endpoints_dir().iterdir())
    r = labkit("run", "-d", "--name", "second", "-p", f"{port}:80", "busybox", "sleep", "60")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "already published" in r.stderr, r.stderr
    other = free_port()
    with socket.socket() as s:
        s.bind(("0.0.0.0", other))
        s.listen()
        r = labkit("run", "-d", "--name", "third", "-p", f"{other}:80", "busybox", "sleep", "60")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "in use by a host process" in r.stderr, r.stderr
    assert sorted(paths.endpoints_dir().iterdir()) == before
    assert labkit("ps", "-a", "-q").stdout.count("\n") == 1


# -- outbound NAT ---------------------------------------------------------------------------------
def test_outbound_traffic_is_masqueraded_to_an_outside_the_test_made():
    tid = secrets.token_hex(2)
    with outside(tid) as (ns, host_ip, out_ip):
        server = ns.call(lambda: socket.create_server(("0.0.0.0", 7000)))
        server.settimeout(10 * SLOWDOWN)
        seen = []

        def accept() -> None:
            with contextlib.suppress(OSError):
                conn, peer = server.accept()
                seen.append(peer[0])
                conn.sendall(b"hi-from-outside\n")
                conn.close()

        t = threading.Thread(target=accept)
        t.start()
        # the outside knows no route to the container's subnet: only NAT brings the answer back
        r = labkit("run", "--rm", "busybox", "sh", "-c", f"nc -w 3 {out_ip} 7000 </dev/null")
        t.join(12)
        server.close()
    assert r.returncode == 0 and "hi-from-outside" in r.stdout, r.stderr
    assert seen == [host_ip]  # the host's address, not the container's


# -- user-defined networks and names ----------------------------------------------------------------
def test_containers_on_a_user_network_reach_each_other_by_name():
    name = f"nt{secrets.token_hex(2)}"
    assert labkit("network", "create", "--subnet", "10.252.7.0/24", name).returncode == 0
    run_d("--name", "alpha", "--network", name, "busybox", "sleep", "60")
    r = labkit("run", "--rm", "--name", "beta", "--network", name, "busybox", "sh", "-c",
               "ping -c 1 -W 2 alpha && cat /etc/hosts")
    assert r.returncode == 0 and "10.252.7.2\talpha" in r.stdout, r.stdout + r.stderr
    r = labkit("network", "rm", name)
    assert r.returncode != 0 and "in use by container(s) alpha" in r.stderr and r.stderr.count("\n") == 1
    assert name in labkit("network", "ls").stdout


def test_network_create_refuses_overlaps_and_nosuch():
    # a route of the host's own, made here, so the test does not depend on the machine's
    link = f"lk{secrets.token_hex(2)}r"
    net.veth(link, link + "p")
    try:
        net.add_address(link, "10.252.77.1/24")
        net.set_up(link + "p")
        net.set_up(link)
        routes = [x.dst for x in net.routes() if x.dst != "default"]
        assert "10.252.77.0/24" in routes, routes
        r = labkit("network", "create", "--subnet", "10.252.77.0/25", "ovl")
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "overlaps" in r.stderr, (r.stderr, routes)
        assert "10.252.77.0/24" in r.stderr and link in r.stderr, r.stderr  # it names what is in the way
    finally:
        net.delete(link)
    name = f"nt{secrets.token_hex(2)}"
    assert labkit("network", "create", "--subnet", "10.252.9.0/24", name).returncode == 0
    r = labkit("network", "create", "--subnet", "10.252.9.128/25", "ovl2")
    assert r.returncode != 0 and f"10.252.9.0/24 is taken: network {name})" in r.stderr, r.stderr
    assert "ovl" not in _user_networks() and "ovl2" not in _user_networks()
    r = labkit("run", "--network", "nosuch", "busybox", "true")
    assert r.returncode != 0 and r.stderr == "labkit: no such network: nosuch (labkit network ls lists them)\n"


def test_network_container_joins_another_s_namespace():
    cid = run_d("--name", "pod", "busybox", "sleep", "60")
    r = labkit("run", "--rm", "--network", "container:pod", "busybox", "ip", "-4", "-o", "addr", "show", "eth0")
    assert r.returncode == 0 and lease(cid)["ip"] in r.stdout, r.stderr


def test_rm_gives_the_veth_to_the_namespace_s_end_but_takes_it_from_a_sharer_at_once():
    # --rm: the namespace goes at once, and with it, in the kernel's cleanup, the veth
    cid = run_d("busybox", "sleep", "60")
    link, ns = lease(cid)["host_link"], lease(cid)["netns"]
    assert os.path.exists(f"/sys/class/net/{link}")
    assert labkit("rm", "-f", cid).returncode == 0
    assert not (paths.netns_dir() / ns).exists()
    until(lambda: not os.path.exists(f"/sys/class/net/{link}"), 10)
    # a container that shares the namespace keeps it alive: removing its owner takes the
    # veth away at once, so that the address given back is used by nobody
    owner = run_d("busybox", "sleep", "60")
    sharer = run_d("--network", f"container:{owner}", "busybox", "sleep", "60")
    link = lease(owner)["host_link"]
    assert labkit("rm", "-f", owner).returncode == 0
    assert not os.path.exists(f"/sys/class/net/{link}")
    r = labkit("exec", sharer, "ls", "/sys/class/net")  # the namespace lives on, without its veth
    assert r.returncode == 0 and r.stdout.split() == ["lo"], r.stdout + r.stderr
    assert labkit("rm", "-f", sharer).returncode == 0


# -- faults ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6])
def test_sigkill_of_run_then_cleanup_leaves_nothing(delay):
    from labkit.lab import cleanup

    port = free_port()
    p = subprocess.Popen([*LABKIT, "run", "--rm", "-p", f"{port}:80", "busybox", "sleep", "30"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "LABKIT_NO_DAEMON": "1"}, start_new_session=True)
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)
    leases = [json.loads(f.read_text()) for f in paths.endpoints_dir().glob("*.json")]
    # what `labkit cleanup` does, narrowed to this root: its containers, leases, bridge, table
    from labkit.kernel import cgroups

    run_dir = paths.run_root() / "containers"
    for cid in os.listdir(run_dir) if run_dir.is_dir() else []:
        with contextlib.suppress(Exception):
            cgroups.open(f"containers/{cid}").kill()
    time.sleep(0.05)
    cleanup._release_leases()
    for cid in labkit("ps", "-a", "-q").stdout.split():
        labkit("rm", "-f", cid)
    assert [f for f in paths.endpoints_dir().glob("*.json")] == []
    assert [n for n in os.listdir(paths.netns_dir())] == [] if paths.netns_dir().is_dir() else True
    until(lambda: not any(os.path.exists(f"/sys/class/net/{x['host_link']}") for x in leases if x["host_link"]), 10)
    until(lambda: not os.listdir(f"/sys/class/net/{paths.bridge_name()}/brif"), 10)
    assert _our_rules() == []
    until(lambda: leftovers() == [], 10)
