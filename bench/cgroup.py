"""How long a container's cgroup costs: create with three limits, add a process, remove.

Each run forks a child that waits on a pipe (not timed), then times
``cgroups.create("bench", memory="64m", cpus=0.5, pids=20)``, ``add(child)``, letting the
child exit and reaping it, and ``remove()``. The peer, timed in the same loop so both
see the same machine load, is the least any cgroup can cost: one os.mkdir + os.rmdir
of a bare directory in the same cgroup tree, next to labkit's parent. On v1 labkit
makes one directory per hierarchy (eight here) and its parent, so the ratio shows
what the v1 layout costs.

Run as root: ``sudo /opt/labkit/venv/bin/python bench/cgroup.py``; LABKIT_QUICK=1 runs
fewer repetitions. Prints one summary line and writes bench/results/cgroup.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from labkit.errors import LabkitError, require_root
from labkit.kernel import cgroups

TARGET_MS = 5.0
RUNS = 50 if os.environ.get("LABKIT_QUICK") == "1" else 200


def one_group() -> float:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait until the parent closes the pipe, then exit
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    start = time.perf_counter()
    cg = cgroups.create("bench", memory="64m", cpus=0.5, pids=20)
    cg.add(pid)
    os.close(write_end)
    os.waitpid(pid, 0)
    cg.remove()
    return time.perf_counter() - start


def one_mkdir(peer: str) -> float:
    start = time.perf_counter()
    os.mkdir(peer)
    os.rmdir(peer)
    return time.perf_counter() - start


def main() -> int:
    try:
        require_root("create cgroups")
        # beside where labkit's own parent goes, in the same tree (memory's on v1)
        peer = str(cgroups.where("bench")["memory"].parent.parent / f"labkit-bench-peer-{os.getpid()}")
        one_group()  # warm up: imports, the cached mount table, the labkit parents
        ours, bare = [], []
        for _ in range(RUNS):
            ours.append(one_group())
            bare.append(one_mkdir(peer))
    except LabkitError as err:
        print(f"bench/cgroup.py: {err.one_line()}", file=sys.stderr)
        return 2
    finally:
        if "peer" in locals() and os.path.isdir(peer):
            os.rmdir(peer)
    median, peer_median = statistics.median(ours) * 1e3, statistics.median(bare) * 1e3
    verdict = "ok" if median < TARGET_MS else "SLOW"
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    result = {"cgroup_mode": cgroups.mode(), "runs": RUNS, "median_ms": round(median, 3),
              "peer_mkdir_rmdir_ms": round(peer_median, 4), "ratio": round(median / peer_median, 2),
              "target_ms": TARGET_MS}
    (out / "cgroup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"cgroup create+3 limits+add+remove (cgroup {cgroups.mode()}, {RUNS} runs): median {median:.2f} ms "
          f"(target < {TARGET_MS:.0f} ms: {verdict}); peer mkdir+rmdir {peer_median:.3f} ms; "
          f"ratio {median / peer_median:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
