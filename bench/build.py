"""How fast `labkit build` is, next to `podman build`, on the same 6-step Containerfile.

Both build FROM the same local base: labkit's busybox, saved by `labkit save` (a
docker-archive that is also an OCI layout) and loaded by podman into a store of its own
(`--root`/`--runroot` in a temp dir, `--storage-driver vfs`), so the machine's podman
store is never touched and no registry is contacted. Measured in one run, alternately:

1. a cold build (`--no-cache`): target labkit/podman <= 1.5;
2. a cached rebuild (every step from the cache): target <= 1.0.

Prints the medians and the ratios; writes bench/results/build.json. LABKIT_QUICK=1 runs
fewer rounds. Run as root: `sudo /opt/labkit/venv/bin/python bench/build.py`.
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
ROUNDS = 3 if os.environ.get("LABKIT_QUICK") else 10
CONTAINERFILE = """\
FROM {base}
ENV APP_HOME=/srv/app
COPY app.txt $APP_HOME/
RUN echo built > $APP_HOME/stamp && ls $APP_HOME
WORKDIR /srv/app
CMD ["cat", "stamp"]
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {r.stderr.strip()[-500:]}")
    return seconds


def main() -> int:
    if not shutil.which("podman"):
        raise SystemExit("podman is not installed (vagrant/provision.sh --dev installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="labkit-bench-build-"))
    env = {**os.environ, "LABKIT_ROOT": str(tmp / "labkit"), "PYTHONPATH": str(HERE.parent)}
    labkit = [sys.executable, "-m", "labkit"]
    podman = ["podman", "--root", str(tmp / "podman-root"), "--runroot", str(tmp / "podman-run"),
              "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]  # fmt: skip
    try:
        subprocess.run([*labkit, "images"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([*labkit, "save", "-o", str(tmp / "busybox.tar"), "busybox"], env=env, check=True, timeout=120)
        out = subprocess.run([*podman, "load", "-i", str(tmp / "busybox.tar")], env=env, check=True,
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        base = next(line.split(": ", 1)[1].strip() for line in out.splitlines() if line.startswith("Loaded image"))
        for who, name in (("labkit", "busybox"), ("podman", base)):
            ctx = tmp / f"ctx-{who}"
            ctx.mkdir()
            (ctx / "Containerfile").write_text(CONTAINERFILE.format(base=name))
            (ctx / "app.txt").write_text("the app\n")
        lk = [*labkit, "build", "-f", str(tmp / "ctx-labkit" / "Containerfile"), "-t", "bench:1", str(tmp / "ctx-labkit")]
        pm = [*podman, "build", "--pull=never", "--network=none", "--layers", "-f",
              str(tmp / "ctx-podman" / "Containerfile"), "-t", "bench:1", str(tmp / "ctx-podman")]  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in ("labkit_cold", "podman_cold", "labkit_cached", "podman_cached")}
        for _ in range(ROUNDS):
            times["labkit_cold"].append(timed([*lk[:4], "--no-cache", *lk[4:]], env))
            times["podman_cold"].append(timed([*pm[:-1], "--no-cache", pm[-1]], env))
            times["labkit_cached"].append(timed(lk, env))
            times["podman_cached"].append(timed(pm, env))
    finally:
        subprocess.run([*podman, "system", "reset", "-f"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"rounds": ROUNDS, "median_seconds": med, "samples": times,
              "ratio_cold": med["labkit_cold"] / med["podman_cold"],
              "ratio_cached": med["labkit_cached"] / med["podman_cached"],
              "targets": {"ratio_cold": 1.5, "ratio_cached": 1.0}}  # fmt: skip
    for kind in ("cold", "cached"):
        print(f"{kind:>6}: labkit {med['labkit_' + kind] * 1000:7.1f} ms   podman {med['podman_' + kind] * 1000:7.1f} ms"
              f"   ratio {result['ratio_' + kind]:.2f} (target <= {result['targets']['ratio_' + kind]})")  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
