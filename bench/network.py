"""`labkit run --rm busybox true` on the default bridge, next to `docker run --rm busybox true`.

Both also with `--network none`, to show what the bridge costs: the median of the round-by-
round differences, in ms (SOCK, Oakes et al., USENIX ATC 2018, found the network namespace
the slowest primitive of a container start). All alternately in one run, after a warm-up of
each. Target: labkit/docker on the bridge <= 0.25, for labkit via labkitd, the way the
`labkit` command runs where labkitd is up (the course VM's service, as dockerd is Docker's);
labkit in-process (LABKIT_NO_DAEMON=1) is shown too.

Docker is Debian's docker.io with a dockerd of the bench's own: data, exec root, pid file,
socket and trust key in a temp dir, the containers' cgroups below the bench's own (a relative
--cgroup-parent), the daemon in a network namespace of its own (`unshare --net`), so that
docker0 and its iptables rules die with it. labkit runs in the host's namespace: each side
still makes a veth pair and plugs it into a bridge per container, which is what is measured.
Busybox is labkit's, handed over by `labkit save` and `docker load` (no registry). At the end
the bench checks that nothing is left behind. Writes bench/results/network.json; LABKIT_QUICK=1
runs fewer rounds. Run as root: `sudo /opt/labkit/venv/bin/python bench/network.py`.
"""

from __future__ import annotations

import contextlib
import glob
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
ROUNDS = 5 if os.environ.get("LABKIT_QUICK") else 20
DOCKER, DOCKERD = "/usr/bin/docker", "/usr/sbin/dockerd"  # docker.io's, not a client found on PATH
HARDCODED = ("/run/docker/plugins", "/run/docker", "/run/containerd/s", "/run/containerd")  # dockerd's own


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one command, in ms."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()[-500:]}")
    return (time.perf_counter() - t0) * 1000


def start_dockerd(tmp: Path, parent: str, env: dict[str, str]) -> subprocess.Popen:
    # not the host's /etc/docker/daemon.json, nor its /etc/docker/key.json
    (tmp / "daemon.json").write_text(json.dumps({"deprecated-key-path": f"{tmp}/key.json"}))
    argv = ["unshare", "--net", DOCKERD, "--data-root", f"{tmp}/data", "--exec-root", f"{tmp}/exec",
            "--pidfile", f"{tmp}/docker.pid", "-H", f"unix://{tmp}/docker.sock", "--config-file",
            f"{tmp}/daemon.json", "--cgroup-parent", parent, "--storage-driver", "overlay2"]  # fmt: skip
    with open(tmp / "dockerd.log", "w") as log:
        dockerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while subprocess.run([DOCKER, "version"], env=env, capture_output=True).returncode != 0:
        if dockerd.poll() is not None or time.monotonic() > deadline:
            stop_dockerd(dockerd)
            raise SystemExit("dockerd did not start: " + (tmp / "dockerd.log").read_text().strip()[-500:])
        time.sleep(0.1)
    return dockerd


def stop_dockerd(dockerd: subprocess.Popen) -> None:
    dockerd.terminate()  # it stops its containerd and removes its mounts
    with contextlib.suppress(subprocess.TimeoutExpired):  # still there: leftovers() says so
        dockerd.wait(timeout=60)


def check_cgroups(parent: str, env: dict[str, str]) -> None:
    """A Docker container's cgroup, in every hierarchy, is below the bench's own."""
    mine = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
    out = subprocess.run([DOCKER, "run", "--rm", "busybox", "cat", "/proc/self/cgroup"], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    for key, path in (line.split(":", 2)[1:] for line in out.splitlines()):
        if not path.startswith(os.path.join(mine[key], parent) + "/"):
            raise SystemExit(f"a Docker container's cgroup {key}:{path} is not below the bench's {mine[key]}")


def leftovers(tmp: Path, parent: str, existed: set[str]) -> list[str]:
    """What Docker or labkit left behind on the host, in words (nothing: [])."""
    from labkit import paths

    found = [f"link {n}" for n in ("docker0", paths.bridge_name()) if os.path.exists(f"/sys/class/net/{n}")]
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    found += ["Docker's rules in nft list ruleset"] if "docker" in ruleset.lower() else []
    found += [f"nft table {paths.nft_table()}"] if f"table ip {paths.nft_table()} " in ruleset else []
    for proc in glob.glob("/proc/[0-9]*"):
        with contextlib.suppress(OSError):  # it ended
            if str(tmp) in Path(proc, "cmdline").read_text():  # dockerd, containerd, a shim, labkitd
                found.append(f"process {Path(proc, 'comm').read_text().strip()} ({proc})")
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(tmp) in line]  # fmt: skip
    found += [f"cgroup {d}" for d in glob.glob(f"/sys/fs/cgroup/**/{parent}", recursive=True)]
    return found + [d for d in HARDCODED if os.path.exists(d) and d not in existed]


def main() -> int:
    if not (os.path.exists(DOCKER) and os.path.exists(DOCKERD)):
        raise SystemExit("docker.io is not installed: apt-get install docker.io")
    tmp = Path(tempfile.mkdtemp(prefix="labkit-bench-net-"))
    parent = tmp.name  # unique: the cgroup parent of Docker's containers, below the bench's cgroup
    existed = {d for d in HARDCODED if os.path.exists(d)}
    os.environ.update(LABKIT_ROOT=str(tmp / "labkit"), PYTHONPATH=str(HERE.parent),
                      PYTHONPYCACHEPREFIX=str(tmp / "pycache"), DOCKER_HOST=f"unix://{tmp}/docker.sock")  # fmt: skip
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # children cache bytecode, as after pip install
    env, cold = dict(os.environ), {**os.environ, "LABKIT_NO_DAEMON": "1"}
    labkit = [sys.executable, "-S", "-m", "labkit"]  # as the installed `labkit` command starts
    from labkit.cli.daemon import start as start_labkitd
    from labkit.engine import daemon, networks

    dockerd = None
    try:
        subprocess.run([*labkit, "images"], env=cold, check=True, capture_output=True, timeout=120)
        subprocess.run([*labkit, "save", "-o", str(tmp / "busybox.tar"), "busybox"], env=cold, check=True, timeout=120)
        dockerd = start_dockerd(tmp, parent, env)
        subprocess.run([DOCKER, "load", "-i", str(tmp / "busybox.tar")], env=env, check=True, capture_output=True)
        check_cgroups(parent, env)
        start_labkitd()
        runs = {  # name: (argv, environment); labkit's are served by labkitd unless `cold`
            f"{who} {net}": ([*cmd, "run", "--rm", *(["--network", "none"] if net == "none" else []), "busybox", "true"], e)
            for who, cmd, e in (("labkit", labkit, env), ("labkit in-process", labkit, cold), ("docker", [DOCKER], env))
            for net in ("bridge", "none")
        }
        for argv, e in runs.values():  # warm-up
            timed(argv, e)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(ROUNDS):
            for name, (argv, e) in runs.items():
                times[name].append(timed(argv, e))
        served = daemon.log_path().read_text().count("labkitd: worker ")
        if served < 2 * (ROUNDS + 1):
            raise SystemExit(f"labkitd served {served} of {2 * (ROUNDS + 1)} runs: the numbers would be wrong")
    finally:
        if daemon.running_pid():
            daemon.stop()
        if dockerd is not None:
            stop_dockerd(dockerd)
        networks.discard()  # this root's bridge and nftables table
        # the parent runc made in each hierarchy (the containers' own are gone), and the
        # directories dockerd makes at fixed places: only empty ones, only if they are new
        made = glob.glob(f"/sys/fs/cgroup/**/{parent}/**/", recursive=True)
        made += [d for d in HARDCODED if d not in existed and os.path.isdir(d)]
        for d in sorted(made, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        left = leftovers(tmp, parent, existed)
        if left:
            print(f"left behind (see {tmp}): {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if left:
        return 1
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
    print("left behind: nothing (no docker0, Docker rules, daemons, mounts or cgroups; labkit's bridge and table gone)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "network.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
