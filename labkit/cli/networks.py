"""``labkit network create / ls / inspect / rm``: Docker's network commands.

``create [--subnet CIDR] NAME`` defines a bridge network and makes its bridge and NAT
(labkit.engine.networks); containers join it with ``labkit run --network NAME`` and find
each other there by name. ``rm`` refuses a network that a container is on.

Layer: the CLI. Calls labkit.engine.networks and labkit.engine.endpoints.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verbs.add_parser("create", help="make a bridge network")
    create.add_argument("--subnet", help="its subnet, e.g. 10.10.0.0/24 (default: the next free pool)")
    create.add_argument("name")
    verbs.add_parser("ls", help="list networks")
    inspect = verbs.add_parser("inspect", help="show networks as JSON")
    inspect.add_argument("names", nargs="+")
    rm = verbs.add_parser("rm", help="remove networks")
    rm.add_argument("names", nargs="+")


def run(command: str, args: argparse.Namespace) -> int:
    from labkit.engine import endpoints, networks

    if args.verb == "create":
        print(networks.create(args.name, args.subnet).name)
    elif args.verb == "ls":
        rows = [("NAME", "DRIVER", "SUBNET", "BRIDGE")]
        rows += [(n.name, n.driver, n.subnet or "-", n.bridge or "-") for n in networks.list_networks()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    elif args.verb == "inspect":
        out = []
        for name in args.names:
            n = networks.get(name)
            members = {e.container_id: {"Name": e.name, "IPv4Address": f"{e.ip}/{e.prefixlen}" if e.ip else ""}
                       for e in endpoints.all_endpoints() if e.network == n.name}
            out.append({"Name": n.name, "Driver": n.driver, "Created": n.created,
                        "IPAM": {"Config": [{"Subnet": n.subnet, "Gateway": n.gateway}] if n.subnet else []},
                        "Options": {"com.docker.network.bridge.name": n.bridge} if n.bridge else {},
                        "Containers": members})  # fmt: skip
        print(json.dumps(out, indent=4))
    else:
        for name in args.names:
            networks.remove(name, endpoints.users(name))
            print(name)
    return 0
