#!/usr/bin/env python3
"""How long does it take to start a process in new namespaces?

Median time to run /bin/true in new uts+ipc+pid+mnt namespaces (with /proc mounted
again) from a warm Python process, next to a plain fork+exec of the same binary, and
their ratio. Target: under 5 ms, and within 3x of fork+exec.

    sudo /opt/labkit/venv/bin/python bench/spawn.py        (LABKIT_QUICK=1: fewer runs)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.kernel import namespaces

RUNS = 50 if os.environ.get("LABKIT_QUICK") else 300
TRUE = "/bin/true"


def plain() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(TRUE, [TRUE])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


def isolated() -> None:
    with namespaces.spawn([TRUE], new={"uts", "ipc", "pid", "mnt"}) as p:
        if p.wait() != 0:
            raise SystemExit("the isolated /bin/true failed")


def median_ms(fn) -> float:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    for fn in (plain, isolated):  # warm up: page cache, the namespace code paths
        for _ in range(10):
            fn()
    # alternate the two, so a noisy neighbour slows both alike
    a, b = [], []
    for _ in range(3):
        a.append(median_ms(plain))
        b.append(median_ms(isolated))
    base, ns = statistics.median(a), statistics.median(b)
    result = {"fork_exec_ms": round(base, 3), "namespaces_ms": round(ns, 3), "ratio": round(ns / base, 2),
              "runs": RUNS * 3, "target": "namespaces_ms < 5 and ratio <= 3"}
    print(f"fork+exec /bin/true:                     {base:6.2f} ms (median)")
    print(f"same in new uts+ipc+pid+mnt (+ /proc):   {ns:6.2f} ms (median)")
    print(f"ratio namespaces / plain: {ns / base:.2f}x   (target: < 5 ms and <= 3x)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "spawn.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
