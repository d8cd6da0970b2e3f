"""How fast labkit starts a container, next to runc, on the same bundle.

1. `labkit runtime run` vs `runc run`: the same OCI bundle (busybox, `true`), the same
   namespaces and cgroup limits, run alternately; the median wall time of each and
   their ratio (target: labkit/runc <= 1.0).
2. `labkit run --rm busybox true` (image, overlay, Docker's defaults) vs the runc run
   (target <= 1.5).
3. The CLI's import time (`python -X importtime`), since a Python CLI pays it each run.
4. What one idle detached container costs on the host besides its own processes: the
   shim's memory (RSS, and PSS, which splits pages shared with other processes fairly).
5. The floor under any Python runtime: the interpreter's start plus the standard
   modules labkit cannot do without (argparse, json, dataclasses, pathlib, ctypes).

Every command runs with Python's bytecode cache on (in the bench's temp dir), as after
`pip install`: with PYTHONDONTWRITEBYTECODE=1 set, each run would compile labkit from
source again (~15 ms). LABKIT_QUICK=1 runs fewer rounds. Writes bench/results/startup.json.
Run as root: `sudo /opt/labkit/venv/bin/python bench/startup.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

ROUNDS = 5 if os.environ.get("LABKIT_QUICK") else 25
LABKIT = [sys.executable, "-m", "labkit"]
FLOOR = "import argparse, json, dataclasses, pathlib, ctypes"


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, check=False)
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.decode().strip()}")
    return took


def import_ms() -> float:
    """Cumulative import time of the modules `labkit runtime run` loads, in ms."""
    code = "import labkit.cli, labkit.cli.runtime, labkit.runtime.container, labkit.kernel.cgroups"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=False).stderr
    total = 0
    for line in err.splitlines()[1:]:
        _, cumulative, name_col = line.removeprefix("import time:").split("|")
        top_level = len(name_col) - len(name_col.lstrip()) == 1  # nested imports are indented more
        if top_level and name_col.strip().startswith("labkit"):
            total += int(cumulative)
    return total / 1000


def shim_memory() -> dict[str, float]:
    out = subprocess.run([*LABKIT, "run", "-d", "--rm", "busybox", "sleep", "60"], capture_output=True, text=True, check=False)
    cid = out.stdout.strip()
    try:
        state = json.loads((Path(os.environ["LABKIT_ROOT"]) / "run" / "containers" / cid / "state.json").read_text())
        shim = state["shim_pid"]
        rollup = Path(f"/proc/{shim}/smaps_rollup").read_text().split("\n")
        values = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in rollup[1:] if line}
        return {"shim_rss_kib": values["Rss"], "shim_pss_kib": values["Pss"]}
    finally:
        subprocess.run([*LABKIT, "rm", "-f", cid], capture_output=True, check=False)


def main() -> int:
    from bundles import bundle, edit_config

    runc = shutil.which("runc") or "/usr/sbin/runc"
    root = Path(tempfile.mkdtemp(prefix="labkit-bench-"))
    os.environ.setdefault("LABKIT_ROOT", str(root / "state"))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the children cache bytecode, as an install does
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")  # ... in our temp dir, not the source tree
    try:
        b = bundle(root / "bundle", ["true"])

        def limits(doc):
            doc["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 50}}

        edit_config(b, limits)
        # warm up: build the busybox image, fill the bytecode cache
        subprocess.run([*LABKIT, "run", "--rm", "busybox", "true"], check=True, capture_output=True)
        subprocess.run([*LABKIT, "runtime", "run", "--bundle", str(b), "bench-warm"], check=True, capture_output=True)
        times: dict[str, list[float]] = {"labkit runtime run": [], "runc run": [], "labkit run --rm": []}
        for i in range(ROUNDS):
            times["runc run"].append(timed([runc, "run", "--bundle", str(b), f"bench-rc{i}"]))
            times["labkit runtime run"].append(timed([*LABKIT, "runtime", "run", "--bundle", str(b), f"bench-lk{i}"]))
            times["labkit run --rm"].append(timed([*LABKIT, "run", "--rm", "busybox", "true"]))
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        result = {
            "rounds": ROUNDS,
            "median_ms": med,
            "ratio_runtime_vs_runc": med["labkit runtime run"] / med["runc run"],
            "ratio_run_vs_runc": med["labkit run --rm"] / med["runc run"],
            "python_startup_ms": statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(5)) * 1000,
            "python_floor_ms": statistics.median(timed([sys.executable, "-c", FLOOR]) for _ in range(5)) * 1000,
            "labkit_import_ms": import_ms(),
            **shim_memory(),
        }
    finally:
        if str(root) not in Path("/proc/self/mountinfo").read_text():
            shutil.rmtree(root, ignore_errors=True)
    for k, v in med.items():
        print(f"{k:<22} {v:7.1f} ms (median of {ROUNDS})")
    print(f"labkit runtime run / runc run = {result['ratio_runtime_vs_runc']:.2f}  (target <= 1.0)")
    print(f"labkit run --rm / runc run    = {result['ratio_run_vs_runc']:.2f}  (target <= 1.5)")
    print(f"python startup {result['python_startup_ms']:.1f} ms, labkit imports {result['labkit_import_ms']:.1f} ms")
    print(f"python + {FLOOR.removeprefix('import ')}: {result['python_floor_ms']:.1f} ms (the floor)")
    print(f"idle container's shim: RSS {result['shim_rss_kib']} KiB, PSS {result['shim_pss_kib']} KiB")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
