"""How fast `labkit pull` is, next to `skopeo copy`, on a ~50 MB image from a local registry.

The registry is Debian's docker-registry on 127.0.0.1 (``labkit.lab.registry``), on a
free port, stopped afterwards; nothing else is contacted. The image is built by
``labkit build`` FROM busybox with three COPY steps of 17 MiB of random bytes each
(incompressible, and three big layers to fetch in parallel), then ``labkit push``ed;
its size as pushed (the manifest's blobs) is printed. Each round, in alternating order:

- ``python -m labkit pull -q ADDR/bench/big:v1`` into a fresh, empty LABKIT_ROOT;
- ``skopeo copy docker://ADDR/bench/big:v1 oci:DIR:v1`` into a fresh directory.

Both are new processes (labkit's with its bytecode cached, as an installed package's
is, and without labkitd); both copies are deleted after each round. labkit does more:
it also unpacks every layer into the store, which skopeo's ``oci:`` copy does not, so
the ratio is conservative. Target: labkit/skopeo <= 1.0 (median of each). One warm-up
of each is not counted. Writes bench/results/pull.json. LABKIT_QUICK=1 runs 3 rounds
instead of 10. Run as root: `sudo /opt/labkit/venv/bin/python bench/pull.py`.
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
sys.path.insert(0, str(HERE.parent))

ROUNDS = 3 if os.environ.get("LABKIT_QUICK") else 10
LAYERS, LAYER_BYTES = 3, 17 << 20
TARGET = 1.0
IMAGE = "bench/big:v1"


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Milliseconds ``argv`` took; the bench stops if it fails."""
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {r.stderr.strip()[-500:]}")
    return took * 1000


def pushed_bytes(address: str) -> tuple[int, int]:
    """The number of layers and the bytes of the manifest's blobs (config and layers)."""
    from labkit.engine import content
    from labkit.engine.registry import Client, scope

    client = Client(address)
    try:
        repo, tag = IMAGE.split(":")
        resp = client.request("GET", f"/v2/{repo}/manifests/{tag}", scope=scope(repo),
                              headers={"Accept": content.OCI_MANIFEST})  # fmt: skip
        doc = json.loads(resp.read())
    finally:
        client.close()
    return len(doc["layers"]), doc["config"]["size"] + sum(layer["size"] for layer in doc["layers"])


def main() -> int:
    from labkit.lab.registry import local_registry

    skopeo = shutil.which("skopeo")
    if not skopeo:
        raise SystemExit("skopeo is not installed: apt-get install skopeo (vagrant/provision.sh installs it)")
    if not shutil.which("docker-registry"):
        raise SystemExit("docker-registry is not installed: apt-get install docker-registry (provision.sh --dev)")
    tmp = Path(tempfile.mkdtemp(prefix="labkit-bench-pull-"))
    env = {**os.environ, "LABKIT_ROOT": str(tmp / "build-root"), "PYTHONPATH": str(HERE.parent),
           "PYTHONPYCACHEPREFIX": str(tmp / "pycache"), "LABKIT_NO_DAEMON": "1"}  # fmt: skip
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # labkit's bytecode is cached, as an install's is
    labkit = [sys.executable, "-m", "labkit"]
    times: dict[str, list[float]] = {"labkit": [], "skopeo": []}
    try:
        with local_registry() as reg:
            name = f"{reg.address}/{IMAGE}"
            ctx = tmp / "ctx"
            ctx.mkdir()
            steps = []
            for i in range(LAYERS):
                (ctx / f"blob{i}").write_bytes(os.urandom(LAYER_BYTES))
                steps.append(f"COPY blob{i} /data/blob{i}")
            (ctx / "Containerfile").write_text("FROM busybox\n" + "\n".join(steps) + "\n")
            for argv in ([*labkit, "build", "-t", name, "-f", str(ctx / "Containerfile"), str(ctx)],
                         [*labkit, "push", "-q", name]):  # fmt: skip
                timed(argv, env)
            layers, size = pushed_bytes(reg.address)
            print(f"image {name}: {layers} layers, {size / 1e6:.1f} MB as pushed")

            def labkit_pull(i: int) -> float:
                root = tmp / f"pull-{i}"
                try:
                    return timed([*labkit, "pull", "-q", name], {**env, "LABKIT_ROOT": str(root)})
                finally:
                    shutil.rmtree(root, ignore_errors=True)

            def skopeo_copy(i: int) -> float:
                oci = tmp / f"oci-{i}"
                try:
                    return timed([skopeo, "copy", "-q", "--src-tls-verify=false", f"docker://{name}",
                                  f"oci:{oci}:v1"], env)  # fmt: skip
                finally:
                    shutil.rmtree(oci, ignore_errors=True)

            labkit_pull(-1), skopeo_copy(-1)  # warm-up: the registry's files into the page cache
            for i in range(ROUNDS):
                order = [("labkit", labkit_pull), ("skopeo", skopeo_copy)]
                for who, step in order if i % 2 == 0 else reversed(order):
                    times[who].append(step(i))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"rounds": ROUNDS, "image_layers": layers, "image_bytes": size, "median_ms": med, "samples_ms": times,
              "ratio": med["labkit"] / med["skopeo"], "targets": {"ratio": TARGET}}  # fmt: skip
    print(f"pull {size / 1e6:.0f} MB: labkit {med['labkit']:7.1f} ms   skopeo {med['skopeo']:7.1f} ms"
          f"   ratio {result['ratio']:.2f} (target <= {TARGET}; median of {ROUNDS})")  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "pull.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
