"""`labkit run --rm busybox true` on the default bridge, next to `docker run --rm busybox true`.

Both also with `--network none`, to show what the bridge costs: the median of the round-by-
round differences, in ms (SOCK, Oakes et al., USENIX ATC 2018, found the network namespace
the slowest primitive of a container start). All alternately in one run, after a warm-up of
each. Target: labkit/docker on the bridge <= 0.25, for labkit via labkitd, the way the
`labkit` command runs where labkitd is up (the course VM's service, as dockerd is Docker's);
labkit in-process (LABKIT_NO_DAEMON=1) is shown too.

Docker is Debian's docker.io with a dockerd of the bench's own, in a network namespace of its
own, so that docker0 and its iptables rules die with it (bench/_dockerd.py starts it and
labkitd, and checks that nothing is left behind). labkit runs in the host's namespace: each
side still makes a veth pair and plugs it into a bridge per container, which is what is
measured. Writes bench/results/network.json; LABKIT_QUICK=1 runs fewer rounds. Run as root:
`sudo /opt/labkit/venv/bin/python bench/network.py`.
"""

from __future__ import annotations

import os
import statistics
import sys

import _dockerd
from _dockerd import DOCKER, LABKIT

ROUNDS = 5 if os.environ.get("LABKIT_QUICK") else 20


def main() -> int:
    with _dockerd.session("labkit-bench-net-") as s:
        runs = {  # name: (argv, environment); labkit's are served by labkitd unless `cold`
            f"{who} {net}": ([*cmd, "run", "--rm", *(["--network", "none"] if net == "none" else []), "busybox", "true"], e)
            for who, cmd, e in (("labkit", LABKIT, s.env), ("labkit in-process", LABKIT, s.cold),
                                ("docker", [DOCKER], s.docker_env))
            for net in ("bridge", "none")
        }  # fmt: skip
        times = _dockerd.alternately(runs, ROUNDS)
        served = _dockerd.served("labkitd: worker ")
        if served < 2 * (ROUNDS + 1):
            raise SystemExit(f"labkitd served {served} of {2 * (ROUNDS + 1)} runs: the numbers would be wrong")
    med = {k: statistics.median(v) for k, v in times.items()}

    def cost(who: str) -> float:  # the bridge over none, round by round
        return statistics.median(b - n for b, n in zip(times[f"{who} bridge"], times[f"{who} none"]))

    result = {"rounds": ROUNDS, "median_ms": med, "samples_ms": times,
              "ratio_bridge": med["labkit bridge"] / med["docker bridge"],
              "ratio_bridge_in_process": med["labkit in-process bridge"] / med["docker bridge"],
              "ratio_none": med["labkit none"] / med["docker none"],
              "bridge_cost_ms": {who: cost(who) for who in ("labkit", "labkit in-process", "docker")},
              "targets": {"ratio_bridge": 0.25}}  # fmt: skip
    for k, v in med.items():
        print(f"{k:<26} {v:7.1f} ms (median of {ROUNDS})")
    print(f"labkit / docker on the bridge = {result['ratio_bridge']:.2f} via labkitd (target <= 0.25), "
          f"{result['ratio_bridge_in_process']:.2f} in-process; with --network none {result['ratio_none']:.2f}")  # fmt: skip
    print("the bridge over --network none: " + ", ".join(f"{k} {v:+.1f} ms" for k, v in result["bridge_cost_ms"].items()))
    _dockerd.save("network", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
