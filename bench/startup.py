"""How fast labkit starts a container, next to runc, on the same bundle.

1. `labkit runtime run` vs `runc run`: the same OCI bundle (busybox, `true`), the same
   namespaces and cgroup limits, run alternately; the median wall time of each and
   their ratio (target: labkit/runc <= 1.0), also taken round by round.
2. `labkit run --rm busybox true` (image, overlay, Docker's defaults) vs the runc run
   (target <= 1.5). Not like for like: the runc bundle has a plain directory as its root,
   no seccomp filter (runc spec writes none) and an empty network namespace, where
   `labkit run` mounts an overlay of the image's layers, loads Docker's default seccomp
   filter and puts the container on the default bridge (a namespace of its own, a veth
   pair, an address, and the veth's removal at --rm). So it also runs with
   `--network none`, which leaves the bridge out (no target: it shows what the bridge costs).
   Both are measured the way Docker works, with labkitd running (the `labkit` command is
   a thin client; the daemon forks a warm worker), and without it (the whole command in
   one fresh Python process), each with the `labkit` command as installed: the client
   compiled from C (labkit/cli/client.c). `labkit runtime run` also runs with the same
   client in Python (labkit/cli/client.py), to show what the compiled one saves.
3. The CLI's import time (`python -X importtime`), which the in-process path pays each run.
4. What one idle detached container costs on the host besides its own processes: the
   shim's memory (RSS, and PSS, which splits pages shared with other processes fairly),
   and what labkitd itself costs, idle, once for all containers.
5. The floor under any Python command: the interpreter's start, and the interpreter plus
   the standard modules labkit's in-process path cannot do without.

Every command runs with Python's bytecode cache on (in the bench's temp dir), as after
`pip install`: with PYTHONDONTWRITEBYTECODE=1 set, each run would compile labkit from
source again (~15 ms). LABKIT_QUICK=1 runs fewer rounds. Writes bench/results/startup.json.
Run as root, after `make setup`: `sudo /opt/labkit/venv/bin/python bench/startup.py`.
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
COLD: dict[str, str] = {}
LABKIT: list[str] = []  # this checkout's command, built as the installed one is (bench/_command.py)
FLOOR = "import argparse, json, dataclasses, pathlib, ctypes"


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
                       check=False, env=env)  # fmt: skip
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


def memory_kib(pid: int) -> tuple[int, int]:
    """RSS and PSS of a process, in KiB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().split("\n")
    values = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in rollup[1:] if line}
    return values["Rss"], values["Pss"]


def shim_memory(prefix: str, env: dict | None = None) -> dict[str, float]:
    out = subprocess.run([*LABKIT, "run", "-d", "--rm", "busybox", "sleep", "60"], capture_output=True, text=True,
                         check=False, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    cid = out.stdout.strip()
    try:
        state = json.loads((Path(os.environ["LABKIT_ROOT"]) / "run" / "containers" / cid / "state.json").read_text())
        rss, pss = memory_kib(state["shim_pid"])
        return {f"{prefix}_rss_kib": rss, f"{prefix}_pss_kib": pss}
    finally:
        subprocess.run([*LABKIT, "rm", "-f", cid], capture_output=True, check=False, stdin=subprocess.DEVNULL)


def main() -> int:
    global COLD, LABKIT
    from _command import labkit_command, python_command
    from bundles import bundle, edit_config

    runc = shutil.which("runc") or "/usr/sbin/runc"
    root = Path(tempfile.mkdtemp(prefix="labkit-bench-"))
    LABKIT = labkit_command(root)
    os.environ.setdefault("LABKIT_ROOT", str(root / "state"))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the children cache bytecode, as an install does
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")  # ... in our temp dir, not the source tree
    COLD = {**os.environ, "LABKIT_NO_DAEMON": "1"}  # the whole command in one fresh process
    try:
        b = bundle(root / "bundle", ["true"])

        def limits(doc):
            doc["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 50}}

        edit_config(b, limits)
        from labkit.cli.daemon import start as start_labkitd
        from labkit.engine import daemon

        # warm up: build the busybox image, fill the bytecode cache
        subprocess.run([*LABKIT, "run", "--rm", "busybox", "true"], check=True, capture_output=True, env=COLD)
        subprocess.run([*LABKIT, "runtime", "run", "--bundle", str(b), "bench-warm"], check=True, capture_output=True,
                       env=COLD)  # fmt: skip
        daemon_pid = start_labkitd()
        runs = {
            "runc run": ([runc, "run", "--bundle", str(b), "bench-rc{i}"], None),
            "labkit runtime run": ([*LABKIT, "runtime", "run", "--bundle", str(b), "bench-lk{i}"], None),
            "labkit runtime run, Python client": ([*python_command(root), "runtime", "run", "--bundle", str(b),
                                                   "bench-py{i}"], None),  # fmt: skip
            "labkit run --rm": ([*LABKIT, "run", "--rm", "busybox", "true"], None),
            "labkit run --rm --network none": ([*LABKIT, "run", "--rm", "--network", "none", "busybox", "true"], None),
            "labkit runtime run, no labkitd": ([*LABKIT, "runtime", "run", "--bundle", str(b), "bench-nd{i}"], COLD),
            "labkit run --rm, no labkitd": ([*LABKIT, "run", "--rm", "busybox", "true"], COLD),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(ROUNDS):
            for name, (cmd, env) in runs.items():
                times[name].append(timed([a.format(i=i) for a in cmd], env))
        served = daemon.log_path().read_text().count("labkitd: worker ")
        if served < 4 * ROUNDS:
            raise SystemExit(f"labkitd served {served} of {4 * ROUNDS} runs: the numbers would be wrong")
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}

        def paired(name: str) -> float:
            return statistics.median(a / b for a, b in zip(times[name], times["runc run"]))

        rss, pss = memory_kib(daemon_pid)
        result = {
            "rounds": ROUNDS,
            "command": LABKIT,
            "median_ms": med,
            "ratio_runtime_vs_runc": med["labkit runtime run"] / med["runc run"],
            "ratio_runtime_python_client_vs_runc": med["labkit runtime run, Python client"] / med["runc run"],
            "ratio_run_vs_runc": med["labkit run --rm"] / med["runc run"],
            "ratio_run_network_none_vs_runc": med["labkit run --rm --network none"] / med["runc run"],
            "ratio_runtime_vs_runc_no_labkitd": med["labkit runtime run, no labkitd"] / med["runc run"],
            "ratio_run_vs_runc_no_labkitd": med["labkit run --rm, no labkitd"] / med["runc run"],
            # each round's labkit time over the runc time measured just before it: drift in
            # the machine's speed over the run cancels out
            "paired_ratio_runtime_vs_runc": paired("labkit runtime run"),
            "paired_ratio_run_vs_runc": paired("labkit run --rm"),
            "python_startup_ms": statistics.median(timed([sys.executable, "-S", "-c", "pass"]) for _ in range(5)) * 1000,
            "python_floor_ms": statistics.median(timed([sys.executable, "-c", FLOOR]) for _ in range(5)) * 1000,
            "labkit_import_ms": import_ms(),
            "labkitd_rss_kib": rss,
            "labkitd_pss_kib": pss,
            **shim_memory("shim", COLD),
            **shim_memory("shim_via_labkitd"),
        }
    finally:
        from labkit.engine import daemon

        if daemon.running_pid():
            daemon.stop()
        from labkit.engine import networks

        networks.discard()  # this root's default bridge and its nftables table
        if str(root) not in Path("/proc/self/mountinfo").read_text():
            shutil.rmtree(root, ignore_errors=True)
    for k, v in med.items():
        print(f"{k:<32} {v:7.1f} ms (median of {ROUNDS})")
    print(f"labkit runtime run / runc run = {result['ratio_runtime_vs_runc']:.2f}  (target <= 1.0; "
          f"round by round {result['paired_ratio_runtime_vs_runc']:.2f}; "
          f"{result['ratio_runtime_vs_runc_no_labkitd']:.2f} without labkitd)")
    saved = med["labkit runtime run, Python client"] - med["labkit runtime run"]
    print(f"labkit runtime run, Python client / runc run = {result['ratio_runtime_python_client_vs_runc']:.2f}  "
          f"(the compiled client saves {saved:.1f} ms)")  # fmt: skip
    print(f"labkit run --rm / runc run    = {result['ratio_run_vs_runc']:.2f}  (target <= 1.5; "
          f"round by round {result['paired_ratio_run_vs_runc']:.2f}; "
          f"{result['ratio_run_vs_runc_no_labkitd']:.2f} without labkitd)")
    print(f"labkit run --rm --network none / runc run = {result['ratio_run_network_none_vs_runc']:.2f}  (no target: "
          f"the bridge left out)")
    print(f"python -S startup {result['python_startup_ms']:.1f} ms (the Python client's floor), "
          f"labkit imports {result['labkit_import_ms']:.1f} ms (paid in-process)")
    print(f"python + {FLOOR.removeprefix('import ')}: {result['python_floor_ms']:.1f} ms (the in-process floor)")
    print(f"idle container's shim: RSS {result['shim_rss_kib']} KiB, PSS {result['shim_pss_kib']} KiB "
          f"(forked by labkitd: RSS {result['shim_via_labkitd_rss_kib']} KiB, PSS {result['shim_via_labkitd_pss_kib']} KiB)")
    print(f"labkitd, idle, once for all containers: RSS {result['labkitd_rss_kib']} KiB, PSS {result['labkitd_pss_kib']} KiB")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
