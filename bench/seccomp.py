"""What Docker's seccomp profile costs a container start, next to runc loading the same one.

1. `labkit run --rm busybox true` with the default profile, and with
   `--security-opt seccomp=unconfined`, through labkitd and without it (one fresh
   process), against `runc run` of a busybox bundle whose config.json holds the same
   filter (Docker's default profile for Docker's default capabilities). The median of
   each, run alternately; the ratio labkit/runc with the profile (target <= 1.0).
   The target is taken like for like: runc's bundle has a network namespace of its own
   with nothing in it, as `labkit run --network none` has. On labkit's default bridge a
   container also gets a veth, an address and a route (runc alone has no network: that
   is CNI's or Docker's work); that ratio is printed too, with what the bridge adds.
2. The filter alone, each in a fresh forked child as a container's init would be:
   compile cold (import pyseccomp, libseccomp generates the BPF) and load, against the
   cached path (read the state root's entry, check its hash, prctl(PR_SET_SECCOMP)),
   target <= 2 ms.

LABKIT_QUICK=1 runs 5 rounds instead of 20. Writes bench/results/seccomp.json.
Run as root: `sudo /opt/labkit/venv/bin/python bench/seccomp.py`.
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
sys.path.insert(0, str(HERE.parent))

ROUNDS = 5 if os.environ.get("LABKIT_QUICK") else 20


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
                       check=False, env=env)  # fmt: skip
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.decode().strip()}")
    return took * 1000


def in_child(step) -> float:
    """``step()``'s time in ms, in a forked child with no_new_privs (its filter dies with it)."""
    from labkit.kernel import security

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            security.set_no_new_privs()
            started = time.perf_counter()
            step()
            os.write(w, str(1e3 * (time.perf_counter() - started)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    if not out:
        raise SystemExit("the filter's child failed")
    return float(out)


def filter_times(cache: Path) -> dict[str, float]:
    """Median ms of cold compile + load, and cached read + load, each in a fresh child."""
    from labkit.kernel import seccomp, seccomp_cache, security

    filt = seccomp.default(security.DOCKER_DEFAULT_CAPS)
    assert "pyseccomp" not in sys.modules  # so that each cold child pays the import, as init would
    cold = [in_child(lambda: seccomp.load(seccomp.compile(filt))) for _ in range(ROUNDS)]
    seccomp_cache.program(filt, cache)  # fill the cache
    cached = [in_child(lambda: seccomp.load(seccomp_cache.program(filt, cache))) for _ in range(ROUNDS)]
    return {"compile_cold_and_load_ms": statistics.median(cold), "cached_read_and_load_ms": statistics.median(cached)}


def main() -> int:
    from _command import labkit_command
    from bundles import bundle

    from labkit.kernel import seccomp, security

    runc = shutil.which("runc") or "/usr/sbin/runc"
    root = Path(tempfile.mkdtemp(prefix="labkit-bench-seccomp-"))
    labkit = labkit_command(root)  # the compiled command, built as provisioning builds it
    os.environ["LABKIT_ROOT"] = str(root / "state")
    os.environ["PYTHONPATH"] = str(HERE.parent)  # the children run this checkout's labkit
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the children cache bytecode, as an install does
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    cold_env = {**os.environ, "LABKIT_NO_DAEMON": "1"}
    run_default = [*labkit, "run", "--rm", "busybox", "true"]
    run_unconfined = [*labkit, "run", "--rm", "--security-opt", "seccomp=unconfined", "busybox", "true"]
    run_none = [*labkit, "run", "--rm", "--network", "none", "busybox", "true"]
    started_daemon = False
    try:
        b = bundle(root / "bundle", ["true"], seccomp=seccomp.default(security.DOCKER_DEFAULT_CAPS))
        assert "seccomp" in json.loads((b / "config.json").read_text())["linux"]
        subprocess.run(run_default, check=True, capture_output=True, env=cold_env)  # the image, the BPF cache
        subprocess.run([*labkit, "daemon", "start"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
        started_daemon = True
        runs = {
            "runc run, default profile": ([runc, "run", "--bundle", str(b), "bench-sc{i}"], None),
            "labkit run --network none, default profile": (run_none, None),
            "labkit run, default profile": (run_default, None),
            "labkit run, unconfined": (run_unconfined, None),
            "labkit run, default profile, no labkitd": (run_default, cold_env),
            "labkit run, unconfined, no labkitd": (run_unconfined, cold_env),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(ROUNDS):
            for name, (cmd, env) in runs.items():
                times[name].append(timed([a.format(i=i) for a in cmd], env))
        med = {k: statistics.median(v) for k, v in times.items()}
        # each round's labkit time over runc's in the same round: drift in the machine's
        # speed over the run cancels out; the quartiles say how far rounds spread
        rounds = [a / b for a, b in zip(times["labkit run --network none, default profile"],
                                        times["runc run, default profile"])]  # fmt: skip
        quart = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else rounds * 3
        result = {
            "rounds": ROUNDS,
            "median_ms": med,
            "ratio_default_vs_runc": med["labkit run --network none, default profile"] / med["runc run, default profile"],
            "paired_ratio_default_vs_runc": statistics.median(rounds),
            "paired_ratio_quartiles": [quart[0], quart[2]],
            "ratio_default_bridge_vs_runc": med["labkit run, default profile"] / med["runc run, default profile"],
            **filter_times(root / "bpf-cache"),
        }
    finally:
        if started_daemon:
            subprocess.run([*labkit, "daemon", "stop"], capture_output=True, stdin=subprocess.DEVNULL, check=False)
        from labkit.engine import networks

        networks.discard()  # this root's default bridge and its nftables table
        if str(root) not in Path("/proc/self/mountinfo").read_text():
            shutil.rmtree(root, ignore_errors=True)
    for k, v in med.items():
        print(f"{k:<42} {v:7.1f} ms (median of {ROUNDS})")
    print(f"labkit run --network none (default profile) / runc run (same filter) = {result['ratio_default_vs_runc']:.2f}"
          f"  (target <= 1.0; the same namespaces; round by round {result['paired_ratio_default_vs_runc']:.2f}, "
          f"quartiles {quart[0]:.2f}-{quart[2]:.2f})")  # fmt: skip
    bridge = med["labkit run, default profile"] - med["labkit run --network none, default profile"]
    print(f"labkit run on the default bridge / runc run = {result['ratio_default_bridge_vs_runc']:.2f}"
          f"  (no target: the bridge adds {bridge:.1f} ms, which runc's bundle does without)")  # fmt: skip
    print(f"filter, cold: import pyseccomp + compile + load  {result['compile_cold_and_load_ms']:6.2f} ms")
    print(f"filter, cached: read + check hash + load         {result['cached_read_and_load_ms']:6.2f} ms"
          "  (target <= 2)")  # fmt: skip
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "seccomp.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
