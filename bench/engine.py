"""`docker run --rm busybox true` through labkitd's Engine API, next to the same through dockerd.

One docker CLI (Debian's /usr/bin/docker), two daemons: DOCKER_HOST points once at labkitd's
docker.sock and once at the bench's own dockerd (bench/_dockerd.py starts both, and checks
that nothing is left behind). The CLI does the same on both: GET /_ping, POST
/containers/create, attach, wait, start, each on its own connection, and it exits with the
container once wait answers. So the difference is the daemons' work: the API, the image,
the container's setup and start, its exit and, with --rm, its removal.

Both on the default bridge (each makes a veth pair and plugs it into its bridge), and both
with `--network none`, as a second line. All four alternately in one run, after a warm-up of
each; the medians and the ratio labkitd/dockerd. Target: on the bridge <= 0.5.
Writes bench/results/engine.json; LABKIT_QUICK=1 runs fewer rounds. Run as root:
`sudo /opt/labkit/venv/bin/python bench/engine.py`.
"""

from __future__ import annotations

import os
import statistics
import sys

import _dockerd
from _dockerd import DOCKER

ROUNDS = 5 if os.environ.get("LABKIT_QUICK") else 20
TARGET = 0.5


def main() -> int:
    from labkit import paths

    with _dockerd.session("labkit-bench-engine-") as s:
        hosts = {"labkitd": {**s.env, "DOCKER_HOST": f"unix://{paths.api_socket()}"}, "dockerd": s.docker_env}
        runs = {  # name: (argv, environment)
            f"{daemon} {net}": ([DOCKER, "run", "--rm", *(["--network", "none"] if net == "none" else []),
                                 "busybox", "true"], env)
            for daemon, env in hosts.items() for net in ("bridge", "none")
        }  # fmt: skip
        times = _dockerd.alternately(runs, ROUNDS)
        created = _dockerd.served("POST /containers/create")
        if created < 2 * (ROUNDS + 1):
            raise SystemExit(f"labkitd created {created} of {2 * (ROUNDS + 1)} containers: the numbers would be wrong")
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"rounds": ROUNDS, "command": "docker run --rm busybox true", "median_ms": med, "samples_ms": times,
              "ratio_bridge": med["labkitd bridge"] / med["dockerd bridge"],
              "ratio_none": med["labkitd none"] / med["dockerd none"],
              "targets": {"ratio_bridge": TARGET}}  # fmt: skip
    for k, v in med.items():
        print(f"docker run --rm via {k:<15} {v:7.1f} ms (median of {ROUNDS})")
    print(f"labkitd / dockerd = {result['ratio_bridge']:.2f} on the bridge (target <= {TARGET}), "
          f"{result['ratio_none']:.2f} with --network none")
    _dockerd.save("engine", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
