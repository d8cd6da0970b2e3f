"""A dockerd and a labkitd of the bench's own, side by side, for the benches against Docker.

    with _dockerd.session("labkit-bench-net-") as s:
        timed([DOCKER, "run", "--rm", "busybox", "true"], s.docker_env)   # dockerd
        timed([*LABKIT, "run", "--rm", "busybox", "true"], s.env)          # labkitd

Docker is Debian's docker.io with a dockerd of the bench's own: data, exec root, pid file,
socket and trust key in a temp dir, the containers' cgroups below the bench's own (a relative
--cgroup-parent), the daemon in a network namespace of its own (`unshare --net`), so that
docker0 and its iptables rules die with it. labkitd runs in the host's namespace, with a
LABKIT_ROOT in the same temp dir; it serves labkit's own socket and the Engine API
(docker.sock). Busybox is labkit's, handed over by `labkit save` and `docker load` (no
registry). At the end the session stops both daemons, removes labkit's bridge and nftables
table, and checks that nothing is left behind on the host: the bench fails if something is,
and says so if nothing is.

Not a bench itself (the leading _ keeps `make bench` from running it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCKER, DOCKERD = "/usr/bin/docker", "/usr/sbin/dockerd"  # docker.io's, not a client found on PATH
HARDCODED = ("/run/docker/plugins", "/run/docker", "/run/containerd/s", "/run/containerd")  # dockerd's own
LABKIT = [sys.executable, "-S", "-m", "labkit"]  # as the installed `labkit` command starts


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one command, in ms; the bench stops if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()[-500:]}")
    return (time.perf_counter() - t0) * 1000


def alternately(runs: dict[str, tuple[list[str], dict[str, str]]], rounds: int) -> dict[str, list[float]]:
    """Each of ``runs`` (name: argv, environment) once as a warm-up, then ``rounds`` times,
    one after the other in each round; the times in ms, by name."""
    for argv, env in runs.values():
        timed(argv, env)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (argv, env) in runs.items():
            times[name].append(timed(argv, env))
    return times


@dataclass
class Session:
    tmp: Path  # everything both daemons write
    env: dict[str, str]  # for labkit: LABKIT_ROOT, PYTHONPATH, the bytecode cache in tmp
    cold: dict[str, str]  # the same, with LABKIT_NO_DAEMON=1: labkit in-process
    docker_env: dict[str, str]  # env, with DOCKER_HOST at the bench's dockerd


@contextlib.contextmanager
def session(prefix: str) -> Iterator[Session]:
    """Start dockerd and labkitd in a new temp dir; stop both and check for leftovers after."""
    if not (os.path.exists(DOCKER) and os.path.exists(DOCKERD)):
        raise SystemExit("docker.io is not installed: apt-get install docker.io")
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    parent = tmp.name  # unique: the cgroup parent of Docker's containers, below the bench's cgroup
    existed = {d for d in HARDCODED if os.path.exists(d)}
    # in os.environ too: labkitd, started from here, and this process's labkit calls use them
    os.environ.update(LABKIT_ROOT=str(tmp / "labkit"), PYTHONPATH=str(HERE.parent),
                      PYTHONPYCACHEPREFIX=str(tmp / "pycache"))  # fmt: skip
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # children cache bytecode, as after pip install
    env = dict(os.environ)
    s = Session(tmp, env, {**env, "LABKIT_NO_DAEMON": "1"}, {**env, "DOCKER_HOST": f"unix://{tmp}/docker.sock"})
    from labkit.cli.daemon import start as start_labkitd
    from labkit.engine import daemon, networks

    dockerd = None
    try:
        subprocess.run([*LABKIT, "images"], env=s.cold, check=True, capture_output=True, timeout=120)
        subprocess.run([*LABKIT, "save", "-o", str(tmp / "busybox.tar"), "busybox"], env=s.cold, check=True,
                       timeout=120)  # fmt: skip
        dockerd = _start_dockerd(tmp, parent, s.docker_env)
        subprocess.run([DOCKER, "load", "-i", str(tmp / "busybox.tar")], env=s.docker_env, check=True,
                       capture_output=True)  # fmt: skip
        _check_cgroups(parent, s.docker_env)
        start_labkitd()
        yield s
    finally:
        if daemon.running_pid():
            daemon.stop()
        if dockerd is not None:
            _stop_dockerd(dockerd)
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
        raise SystemExit(1)
    print("left behind: nothing (no docker0, Docker rules, daemons, mounts or cgroups; labkit's bridge and table gone)")


def save(name: str, result: dict) -> None:
    """bench/results/NAME.json."""
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def _start_dockerd(tmp: Path, parent: str, env: dict[str, str]) -> subprocess.Popen:
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
            _stop_dockerd(dockerd)
            raise SystemExit("dockerd did not start: " + (tmp / "dockerd.log").read_text().strip()[-500:])
        time.sleep(0.1)
    return dockerd


def _stop_dockerd(dockerd: subprocess.Popen) -> None:
    dockerd.terminate()  # it stops its containerd and removes its mounts
    with contextlib.suppress(subprocess.TimeoutExpired):  # still there: leftovers() says so
        dockerd.wait(timeout=60)


def _check_cgroups(parent: str, env: dict[str, str]) -> None:
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


def served(pattern: str) -> int:
    """How many lines of labkitd's log contain ``pattern`` (a worker's, an API request's)."""
    from labkit.engine import daemon

    return daemon.log_path().read_text().count(pattern)
