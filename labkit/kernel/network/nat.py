"""NAT and published ports with nftables, in one table of labkit's own.

A container on a bridge has a private address (10.77.0.2). Two address translations
make it useful, and both are rules in the kernel's netfilter hooks:

- **masquerade** (source NAT): a packet from the container's subnet that leaves through
  another link than the bridge gets the host's address on that link as its source, so
  the answer comes back to the host, which translates it back (conntrack remembers);
- **DNAT** (destination NAT, a "published port"): a packet for one of the host's own
  addresses on HOST_PORT is rewritten to CONTAINER_IP:PORT before routing. Packets from
  outside pass the *prerouting* hook; packets the host itself sends pass *output*.

Everything labkit adds sits in one table, ``table ip labkit`` (``paths.NFT_TABLE``),
made and deleted as a whole; no rule ever goes into another table. In nftables every
table's base chains see every packet of their hook, so other software's tables go on
working beside it. The price: an ``accept`` in our forward chain ends only our chain,
and cannot overrule a ``drop`` in another table (iptables' FORWARD policy DROP, as
Docker sets it, still wins). The table, as ``nft list table ip labkit`` prints it::

    chain prerouting  { type nat hook prerouting priority dstnat; fib daddr type local jump published }
    chain output      { type nat hook output priority -100; ip daddr != 127.0.0.0/8 fib daddr type local jump published }
    chain published   { tcp dport 8080 dnat to 10.77.0.2:80 comment "c1" }   # one per published port
    chain postrouting { type nat hook postrouting priority srcnat; ip saddr 10.77.0.0/24 oifname != "lkbr0" masquerade }
    chain forward     { type filter hook forward priority filter; iifname "lkbr0" accept; oifname "lkbr0" accept }

Docker's iptables version of the same: ``nat POSTROUTING -s SUBNET ! -o docker0 -j
MASQUERADE``, and a ``DOCKER`` chain jumped to from PREROUTING and OUTPUT for
``--dst-type LOCAL`` (OUTPUT without 127.0.0.0/8). Traffic to 127.0.0.1 is not DNAT'd
here: the kernel drops a packet to a 127/8 address routed out of the host unless
``route_localnet`` is set (Docker runs docker-proxy instead); that choice is the engine's.

**Which library, and why.** libnftables' JSON API (libnftables(3), libnftables-json(5)),
the library that nft(8) itself is built on, called through ctypes in ``_Nft`` below:
five documented C functions (``nft_ctx_new``, ``nft_ctx_output_set_flags``,
``nft_ctx_buffer_output``/``_error``, ``nft_run_cmd_from_buffer``, ``nft_ctx_free``).
A list of commands in one buffer is one netlink batch: the kernel applies it whole or
not at all. It needs only libnftables1, which Debian's and Ubuntu's ``nftables`` package
brings (vagrant/provision.sh installs it already). Not chosen:

- pyroute2 0.9.7's ``pyroute2.nftables`` can list and add tables and chains, but of NAT
  expressions it ships only ``masq``: a DNAT or an ``oifname`` match would have to be
  written as raw netfilter bytecode (payload loads, registers, cmp), which nobody can
  check against ``nft list``;
- Debian's ``python3-nftables`` is the same ctypes wrapper around the same library, but
  installed for the system Python only: labkit's venv would have to load it by path from
  dist-packages, and PyPI's copies of it (ansibleguy-nftables) are not maintained by
  netfilter. The five calls are short enough to read here, like syscalls.py's libc calls.

The JSON is what ``nft -j list ruleset`` prints, so a student can compare the two.

Man pages: nft(8), libnftables(3), libnftables-json(5); the nftables wiki "Performing
Network Address Translation (NAT)".
Layer: kernel. Used by the engine (outbound NAT and ``-p``), cleanup, notebook 08 and the tests.
"""

from __future__ import annotations

import ctypes
import json
import re
from dataclasses import dataclass

from labkit import paths
from labkit.errors import InvalidValue, NftError, Unsupported, require_root
from labkit.kernel.network.links import Netns, _ns, check_ip, check_link_name, check_network

NFT_CTX_OUTPUT_HANDLE = 1 << 3  # include/nftables/libnftables.h
NFT_CTX_OUTPUT_JSON = 1 << 4
FAMILY = "ip"  # IPv4 only, as Docker's default networks
TABLE_RE = re.compile(re.escape(paths.NFT_TABLE) + r"(-[a-z0-9_]{1,24})?")
TAG_RE = re.compile(r"[A-Za-z0-9_.:/-]{0,64}")


class _Nft:
    """One libnftables context: a netlink socket to nf_tables in the caller's thread's
    network namespace, plus buffers for what nft would print."""

    _lib = None

    def __init__(self, json_output: bool = True) -> None:
        lib = _Nft.library()
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_output_set_flags(self.ctx, NFT_CTX_OUTPUT_HANDLE | (NFT_CTX_OUTPUT_JSON if json_output else 0))
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    @classmethod
    def library(cls) -> ctypes.CDLL:
        if cls._lib is None:
            try:
                lib = ctypes.CDLL("libnftables.so.1")
            except OSError:
                raise Unsupported("libnftables.so.1 not found (install Debian's nftables package)") from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            cls._lib = lib
        return cls._lib

    def run(self, text: str) -> str:
        """Run commands (JSON or nft's own syntax); return the output, raise on error."""
        lib = _Nft.library()
        rc = lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
        out = (lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode()
        if rc != 0:
            raise NftError(_describe(text), (lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode())
        return out

    def close(self) -> None:
        if self.ctx:
            _Nft.library().nft_ctx_free(self.ctx)
            self.ctx = None


def _describe(text: str) -> str:
    """'add rule ip labkit published' for a JSON batch: what the error message names."""
    try:
        cmds = json.loads(text)["nftables"]
    except (ValueError, KeyError, TypeError):
        return text.strip().splitlines()[0] if text.strip() else "''"
    parts = []
    for cmd in cmds:
        for verb, obj in cmd.items():
            for kind, spec in obj.items():
                spec = spec or {}
                parts.append(" ".join(str(x) for x in (verb, kind, spec.get("family", ""), spec.get("table", ""),
                                                       spec.get("chain", spec.get("name", ""))) if x))
    return "; ".join(parts)


def nft(commands: list[dict] | str, netns: Netns = None) -> list[dict] | str:
    """Run nft commands in ``netns`` (None: the host's): a list of JSON command objects,
    applied as one transaction (returns the parsed JSON output), or nft(8) text (returns
    its text output). Runs inside the namespace's own thread, where the context's netlink
    socket is made."""
    require_root("changing nftables rules")

    def go() -> list[dict] | str:
        ctx = _Nft(json_output=not isinstance(commands, str))
        try:
            if isinstance(commands, str):
                return ctx.run(commands)
            out = ctx.run(json.dumps({"nftables": commands}))
            return json.loads(out)["nftables"] if out.strip() else []
        finally:
            ctx.close()

    with _ns(netns) as ns:
        return go() if ns is None else ns.call(go)


# -- expressions (libnftables-json(5), "EXPRESSIONS" and "STATEMENTS") ---------------------------
def _match(left: dict, right: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _ip(field: str) -> dict:
    return {"payload": {"protocol": "ip", "field": field}}


def _prefix(net) -> dict:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


LOCAL = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")  # fib daddr type local


@dataclass(frozen=True)
class Rule:
    """One rule of labkit's table: its chain, kernel handle, tag (the rule's comment, e.g.
    a container's id) and the rule as ``nft list`` prints it."""

    chain: str
    handle: int
    tag: str
    text: str


def check_port(value: object, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidValue(what, value, "a port number from 1 to 65535")
    return value


class Table:
    """labkit's nftables table in one network namespace (``netns=None``: the host's).

    ``create()`` makes the table and its five chains in one transaction; ``remove()``
    deletes it whole. As a context manager: created on entry, removed on exit.

    >>> Table("nope")
    Traceback (most recent call last):
    ...
    labkit.errors.InvalidValue: invalid nftables table name 'nope': expected labkit or labkit-NAME (NAME: 1-24 of a-z 0-9 _)
    """

    def __init__(self, name: str = paths.NFT_TABLE, *, netns: Netns = None) -> None:
        if not isinstance(name, str) or not TABLE_RE.fullmatch(name):
            raise InvalidValue("nftables table name", name,
                               f"{paths.NFT_TABLE} or {paths.NFT_TABLE}-NAME (NAME: 1-24 of a-z 0-9 _)")
        self.name = name
        self.netns = netns

    def _obj(self, **extra: object) -> dict:
        return {"family": FAMILY, "table": self.name, **extra}

    def _rule(self, chain: str, expr: list[dict], tag: str) -> dict:
        if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
            raise InvalidValue("rule tag", tag, "up to 64 of A-Z a-z 0-9 _ . : / -")
        rule = self._obj(chain=chain, expr=expr)
        if tag:
            rule["comment"] = tag
        return {"add": {"rule": rule}}

    def create(self) -> Table:
        """``nft add table ip labkit`` and its chains (``add``: nothing changes if they exist)."""
        def base(name: str, kind: str, hook: str, prio: int) -> dict:
            return {"add": {"chain": self._obj(name=name, type=kind, hook=hook, prio=prio, policy="accept")}}

        published = {"jump": {"target": "published"}}
        not_loopback = _match(_ip("daddr"), {"prefix": {"addr": "127.0.0.0", "len": 8}}, "!=")
        nft([{"add": {"table": {"family": FAMILY, "name": self.name}}},
             {"add": {"chain": self._obj(name="published")}},
             base("prerouting", "nat", "prerouting", -100),  # dstnat
             base("output", "nat", "output", -100),
             base("postrouting", "nat", "postrouting", 100),  # srcnat
             base("forward", "filter", "forward", 0)], self.netns)
        # the two untagged jumps into `published`, once: a second create() must neither
        # double them nor touch the tagged rules that networks added beside them
        have = {r.chain for r in self.rules() if not r.tag}
        wanted = [("prerouting", [LOCAL, published]), ("output", [not_loopback, LOCAL, published])]
        missing = [self._rule(chain, expr, "") for chain, expr in wanted if chain not in have]
        if missing:
            nft(missing, self.netns)
        return self

    def exists(self) -> bool:
        return self.name in tables(self.netns)

    def masquerade(self, subnet: str, *, bridge: str, tag: str = "") -> None:
        """Source NAT for ``subnet`` leaving through any link but ``bridge``."""
        net = check_network(subnet, "subnet")
        check_link_name(bridge, on_host=False)
        nft([self._rule("postrouting", [_match(_ip("saddr"), _prefix(net)),
                                        _match(_meta("oifname"), bridge, "!="), {"masquerade": None}], tag)],
            self.netns)

    def publish(self, host_port: int, container_ip: str, container_port: int | None = None, *,
                proto: str = "tcp", host_ip: str | None = None, tag: str = "") -> None:
        """DNAT ``[host_ip:]host_port/proto`` on the host's own addresses to
        ``container_ip:container_port`` (Docker's ``-p [IP:]HOST:CONTAINER[/proto]``)."""
        check_port(host_port, "host port")
        cport = check_port(host_port if container_port is None else container_port, "container port")
        ip = check_ip(container_ip, "container IP")
        if proto not in ("tcp", "udp"):
            raise InvalidValue("protocol", proto, "tcp or udp")
        expr = [_match(_ip("daddr"), str(check_ip(host_ip, "host IP")))] if host_ip is not None else []
        expr += [_match({"payload": {"protocol": proto, "field": "dport"}}, host_port),
                 {"dnat": {"addr": str(ip), "port": cport}}]
        nft([self._rule("published", expr, tag)], self.netns)

    def accept_forward(self, bridge: str, *, tag: str = "") -> None:
        """Let the kernel forward packets into and out of ``bridge`` (see the module's
        note: this cannot overrule a drop in another table)."""
        check_link_name(bridge, on_host=False)
        nft([self._rule("forward", [_match(_meta("iifname"), bridge), {"accept": None}], tag),
             self._rule("forward", [_match(_meta("oifname"), bridge), {"accept": None}], tag)], self.netns)

    def publish_loopback(self, bridge: str, *, tag: str = "") -> None:
        """Published ports on 127.0.0.1 too: DNAT what the host sends to its loopback
        addresses, and masquerade it as it leaves into ``bridge`` (a container cannot
        answer 127.0.0.1). The kernel routes a 127/8 packet out of a link only where that
        link's ``route_localnet`` is 1 (``links.set_conf``): Docker's ``userland-proxy:
        false`` does the same."""
        check_link_name(bridge, on_host=False)
        loopback = {"prefix": {"addr": "127.0.0.0", "len": 8}}
        nft([self._rule("output", [_match(_ip("daddr"), loopback), LOCAL, {"jump": {"target": "published"}}], tag),
             self._rule("postrouting", [_match(_ip("saddr"), loopback), _match(_meta("oifname"), bridge),
                                        {"masquerade": None}], tag)], self.netns)

    def rules(self) -> list[Rule]:
        """The table's rules, in chain order, each with its handle and its nft text."""
        found = nft([{"list": {"table": {"family": FAMILY, "name": self.name}}}], self.netns)
        text = nft(f"list table {FAMILY} {self.name}", self.netns)
        lines = {int(m.group(2)): m.group(1).strip() for m in re.finditer(r"^\s*(.*?)\s*# handle (\d+)$", text, re.M)}
        return [Rule(r["chain"], r["handle"], r.get("comment", ""), lines.get(r["handle"], ""))
                for r in (item["rule"] for item in found if "rule" in item)]

    def remove_rules(self, tag: str) -> int:
        """Delete every rule tagged ``tag`` (a container's, when it goes); return how many."""
        if not tag:
            raise InvalidValue("rule tag", tag, "the non-empty tag the rules were added with")
        doomed = [r for r in self.rules() if r.tag == tag]
        if doomed:
            nft([{"delete": {"rule": self._obj(chain=r.chain, handle=r.handle)}} for r in doomed], self.netns)
        return len(doomed)

    def text(self) -> str:
        """The table as ``nft list table ip labkit`` prints it."""
        return nft(f"list table {FAMILY} {self.name}", self.netns)  # type: ignore[return-value]

    def remove(self) -> None:
        """``nft delete table ip labkit``: the table, its chains and rules, at once."""
        if self.exists():
            nft([{"delete": {"table": {"family": FAMILY, "name": self.name}}}], self.netns)

    def __enter__(self) -> Table:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def tables(netns: Netns = None) -> list[str]:
    """Names of labkit's tables (``labkit`` and ``labkit-*``, any family) in ``netns``."""
    found = nft([{"list": {"tables": None}}], netns)
    return sorted(t["table"]["name"] for t in found if "table" in t and TABLE_RE.fullmatch(t["table"]["name"]))


def remove_all(prefix: str = paths.NFT_TABLE) -> list[str]:
    """Delete labkit's tables in the host's namespace whose name starts with ``prefix``
    (cleanup's step); a table of any other name is never touched. Without libnftables
    there is nothing labkit could have made."""
    try:
        found = nft([{"list": {"tables": None}}])
    except Unsupported:
        return []
    doomed = [t["table"] for t in found if "table" in t
              and TABLE_RE.fullmatch(t["table"]["name"]) and t["table"]["name"].startswith(prefix)]
    for t in doomed:
        nft([{"delete": {"table": {"family": t["family"], "name": t["name"]}}}])
    return [f"removed nftables table {t['family']} {t['name']}" for t in doomed]
