"""The isolation scorecard: the same escape attempts, tried in one set-up after another.

Each *attempt* is data: a busybox shell command that prints ``YES`` when the act worked,
``HELD`` when a limit stopped it, and nothing of the kind (or ``NO``) when the kernel
refused. Each *set-up* is a way to start that command: a plain process, a chroot, the
stages notebooks 02-07 built from the kernel layer, ``labkit run`` with its flags, and
runc's own default bundle. ``run()`` fills the grid, ``plot()`` draws it (notebook 09;
the capstone compares a student's container with runc's).

An outcome is one of three words:
- **denied**: the kernel said no (EPERM, a read-only or masked path, no such process);
- **contained**: the act happened, but only to the container's own copy (its hostname,
  its mount table, its PID namespace) or a limit held it (pids, memory);
- **succeeded**: the act reached the host (or, for a probe, the host would allow it).

Safety first: nothing here may hurt the machine. Acts that would (mount on the host's
tree, rename it, reboot it) have a ``host_cmd``: in the set-ups that share the host (a
plain process, chroot) that harmless probe runs instead and tests the *permission*, e.g.
reboot(2) with a wrong magic number answers EINVAL when allowed and EPERM when not. A
real reboot(2) runs only as PID 1 of a new PID namespace, where it just ends that
namespace. The fork bomb and the memory hog are finite (200 sleeps, one 256 MiB buffer)
and run under the attempt's limits where the set-up can apply them.

Layer: lab (imports the kernel and the engine; drives the CLI through ``python -m labkit``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from labkit.lab.scorecard_probe import build_probe

OUTCOMES = ("denied", "contained", "succeeded")
NA = "n/a"


@dataclass(frozen=True)
class Attempt:
    name: str
    cmd: str  # busybox sh; $T a scratch dir, $P the probe, the other variables from _env()
    host_cmd: str | None = None  # the harmless probe, where the set-up shares the host
    shared_means: str = "succeeded"  # an allowed act in a set-up that shares the host
    isolated_by: str = ""  # the namespace that turns an allowed act into "contained"
    refused: str = "denied"  # what no YES means (ps that finds no host process: contained)
    alone: bool = False  # in a container of its own (it ends it, or fills it)
    limits: tuple[tuple[str, str], ...] = ()  # applied where the set-up can: ("pids", "64")
    host_file: bool = False  # succeeded only if $HOSTFILE appeared on the host
    silent: str = ""  # what it means when it printed no word at all (default: refused)


ATTEMPTS: tuple[Attempt, ...] = (
    Attempt("mount a tmpfs", "mount -t tmpfs nb09 /mnt && echo YES",
            host_cmd='mount -t nb09-nofs none "$T" 2>&1 | grep -q "No such device" && echo YES',
            isolated_by="mnt"),  # ENODEV: allowed to mount, the type just does not exist
    Attempt("open /proc/sys for writing", ': >> /proc/sys/vm/drop_caches && echo YES'),  # opened, never written
    Attempt("read /proc/kcore (or timer_list)",  # a kernel without /proc/kcore: its masked neighbour
            'f=/proc/kcore; [ -e $f ] || f=/proc/timer_list; [ "$(head -c 8 $f | wc -c)" -gt 0 ] && echo YES'),
    Attempt("mknod + read the disk",
            'mknod "$T/nb09-disk" b $DISK && [ "$(head -c 512 "$T/nb09-disk" | wc -c)" = 512 ] && echo YES;'
            ' rm -f "$T/nb09-disk"'),
    Attempt("sethostname", "hostname nb09-box && echo YES",
            host_cmd='hostname "$(hostname)" && echo YES', isolated_by="uts"),  # the same name again
    Attempt("see host processes", 'grep -qs "nb09-sent[i]nel" /proc/[0-9]*/cmdline && echo YES',
            refused="contained"),  # [i]: the pattern does not match grep's own command line
    Attempt("double-chroot escape", '"$P" escape "$HOSTONLY"', refused="contained"),
    Attempt("see the host's network", 'ip -o link | grep -qi "$HOSTMAC" && echo YES', refused="contained"),
    Attempt("fork bomb (200, pids 64)",
            '( i=0; while [ $i -lt 200 ]; do sleep 2 & i=$((i+1)); done; wait; echo YES ) 2>&1 | grep -q YES'
            ' && echo YES || echo HELD', alone=True, limits=(("pids", "64"),)),
    Attempt("memory hog (256M, limit 64m)",
            'dd if=/dev/zero of=/dev/null bs=256M count=1; r=$?; [ $r = 0 ] && echo YES; [ $r -gt 128 ] && echo HELD',
            alone=True, limits=(("memory", "64m"),)),
    Attempt("unshare -U (a user namespace)", "unshare -U true && echo YES"),
    Attempt("ptrace a host process", '"$P" ptrace "$SENTINEL"'),
    Attempt("load a kernel module",  # not a module: EPERM when refused, "invalid module format" when allowed
            'insmod /proc/version 2>&1 | grep -qiE "format|invalid" && echo YES'),
    Attempt("reboot", 'if [ "$$" = 1 ] && [ "$(readlink /proc/self/ns/pid)" != "$HOSTPIDNS" ]; then reboot -f || echo NO;'
            ' else echo NO not PID 1 of a new PID namespace; fi',
            host_cmd='"$P" reboot', alone=True, silent="contained"),  # killed by SIGHUP (no NO): the namespace ended
    Attempt("keyctl (the kernel keyring)", '"$P" keyctl'),
    Attempt("raw socket", '"$P" raw', isolated_by="net"),
    Attempt("open_by_handle_at (shocker)", '"$P" shocker'),
    Attempt("write a host file via /proc/PID/root",  # PID 1, else a host process (the sentinel)
            'for p in 1 $SENTINEL; do echo nb09 2>/dev/null > "/proc/$p/root$HOSTFILE" && echo YES && break; done',
            refused="contained", host_file=True),
)


@dataclass(frozen=True)
class Setup:
    key: str
    label: str  # the column's heading
    isolates: frozenset[str] = frozenset()  # namespaces of its own
    cli: tuple[str, ...] | None = None  # labkit run's flags, for the CLI's columns
    stage: int = -1  # the kernel-layer stages: 0 namespaces, 1 pivot_root, 2 cgroups, 3 capabilities


_NS = frozenset({"uts", "ipc", "pid", "mnt", "net"})
SETUPS: tuple[Setup, ...] = (
    Setup("plain", "a plain\nprocess"),
    Setup("chroot", "chroot"),
    Setup("ns", "namespaces\nonly (02-03)", _NS, stage=0),
    Setup("pivot", "+ pivot_root\n(04)", _NS, stage=1),
    Setup("cgroups", "+ cgroups\n(06-07)", _NS, stage=2),
    Setup("caps", "+ Docker's\ncapabilities", _NS, stage=3),
    Setup("default", "labkit run", _NS, cli=()),
    Setup("privileged", "--privileged", _NS, cli=("--privileged",)),
    Setup("userns", "--userns=auto", _NS | {"user"}, cli=("--userns=auto",)),
    Setup("rootless", "rootless", _NS | {"user"}, cli=()),
    Setup("runc", "runc spec\n(its default)", _NS),
)


@dataclass
class Card:
    """The grid: outcome[attempt][setup] (an OUTCOMES word or NA), why a column is n/a,
    and what each command printed (for a reader who doubts a cell)."""

    attempts: list[str]
    setups: list[Setup]
    outcome: dict[str, dict[str, str]] = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)
    output: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a column had to do without

    def letter(self, attempt: str, setup: str) -> str:
        o = self.outcome[attempt][setup]
        return "-" if o == NA else o[0].upper()

    def text(self) -> str:
        width = max(map(len, self.attempts))
        head = " " * width + " " + " ".join(f"{s.key[:5]:>5}" for s in self.setups)
        rows = [f"{a:<{width}} " + " ".join(f"{self.letter(a, s.key):>5}" for s in self.setups) for a in self.attempts]
        return "\n".join([head, *rows])


# --- the runners: one per kind of set-up -------------------------------------------------


def _script(attempts: list[Attempt], host: bool) -> str:
    """One shell script for several attempts: each one's output after its own @@N line."""
    parts = []
    for i, a in enumerate(attempts):
        cmd = a.host_cmd if host and a.host_cmd else a.cmd
        parts.append(f"echo @@{i}; ( {cmd} ) 2>&1")
    return "\n".join(parts) + "\n"


class _Bench:
    """The scratch directory, the probe, the host-side sentinels, one busybox rootfs."""

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}-{os.getpid()}"  # its cgroup and runc's containers: unique per run
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
        self.dir.chmod(0o755)  # the rootless column's user reads the probe
        try:
            self.probe = build_probe(self.dir)
            self._unpack()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        busybox = shutil.which("busybox") or "/bin/busybox"
        self.busybox = busybox
        # a host process to look for and to ptrace: a shell and its sleep, in a group of their own
        self.sentinel = subprocess.Popen([busybox, "sh", "-c", "sleep 600; :", "nb09-sentinel"], start_new_session=True)

    def _unpack(self) -> None:
        from labkit.engine import rootfs

        self.rootfs = self.dir / "rootfs"
        with tarfile.open(fileobj=io.BytesIO(rootfs.busybox_tar())) as tar:
            # our own tar: trusted (the filter argument exists from Python 3.12 on)
            trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            tar.extractall(self.rootfs, **trusted)
        shutil.copy2(self.probe, self.rootfs / "nb09-probe")
        for name, minor in (("null", 3), ("zero", 5)):  # the two devices the attempts read
            os.mknod(self.rootfs / "dev" / name, 0o20666, os.makedev(1, minor))
        (self.dir / "host-only").write_text("only on the host\n")
        self.hostfile = self.dir / "written-from-inside"

    def env(self, inside: bool) -> dict[str, str]:
        return {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin", "T": "/tmp" if inside else str(self.dir),
                "P": "/nb09-probe" if inside else str(self.probe), "DISK": _disk(), "HOSTMAC": _host_mac(),
                "HOSTPIDNS": os.readlink("/proc/self/ns/pid"), "HOSTFILE": str(self.hostfile),
                "HOSTONLY": str(self.dir / "host-only"), "SENTINEL": str(self.sentinel.pid)}

    def close(self) -> None:
        os.killpg(self.sentinel.pid, signal.SIGKILL)  # the shell and its sleep
        self.sentinel.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _disk() -> str:
    """'MAJOR MINOR' of the first real disk (not a loop, ram or zram device)."""
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "ram", "zram", "dm-", "sr")):
            return Path(f"/sys/block/{name}/dev").read_text().strip().replace(":", " ")
    return "8 0"


def _host_mac() -> str:
    for name in sorted(os.listdir("/sys/class/net")):
        mac = Path(f"/sys/class/net/{name}/address").read_text().strip()
        if name != "lo" and mac != "00:00:00:00:00:00":
            return mac
    return "no-such-mac"


def _run_host(bench: _Bench, script: str, chroot: bool, timeout: float) -> tuple[int, str]:
    from labkit.kernel import syscalls

    root = bench.rootfs
    if chroot:  # chroot as tutorials do it: with /proc mounted inside
        syscalls.mount("proc", str(root / "proc"), "proc")

    def enter() -> None:
        os.chroot(root)
        os.chdir("/")

    try:
        argv = ["/bin/sh", "-c", script] if chroot else [bench.busybox, "sh", "-c", script]
        r = subprocess.run(argv, env=bench.env(inside=chroot), preexec_fn=enter if chroot else None,
                           cwd=None if chroot else bench.dir, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    finally:
        if chroot:
            syscalls.umount2(str(root / "proc"), syscalls.UmountFlags.MNT_DETACH)


def _run_stage(bench: _Bench, script: str, stage: int, limits: dict, timeout: float) -> tuple[int, str]:
    """The kernel layer's container, stage by stage: new namespaces (0), a new root (1),
    a cgroup with the attempt's limits (2), Docker's capabilities only (3)."""
    from labkit.kernel import cgroups, mounts, namespaces, security, syscalls
    from labkit.kernel.syscalls import MountFlags

    cg = cgroups.create(f"{bench.prefix}-stage", **limits) if stage >= 2 else None
    env = bench.env(inside=stage >= 1)

    def init() -> None:  # runs as PID 1 of the new namespaces, /proc already remounted
        if cg is not None:
            cg.join()
        if stage >= 1:
            mounts.bind(bench.rootfs, bench.rootfs)
            mounts.pivot_into(bench.rootfs)
            syscalls.mount("proc", "/proc", "proc", MountFlags.MS_NOSUID | MountFlags.MS_NODEV | MountFlags.MS_NOEXEC)
        if stage >= 3:
            security.keep_only(security.DOCKER_DEFAULT_CAPS)
        os.execve("/bin/sh" if stage >= 1 else bench.busybox, ["sh", "-c", script], env)

    try:
        done = namespaces.run(init, new=_NS, timeout=timeout)
        return done.returncode, (done.stdout or "") + (done.stderr or "")
    finally:
        if cg is not None:
            cg.remove()


@dataclass(frozen=True)
class User:
    """An ordinary user for the rootless column: its name and the environment it runs in."""

    name: str
    env: dict[str, str]


@contextlib.contextmanager
def ordinary_user(name: str = "nb09-rootless", subids: str = "400000:65536") -> Iterator[User]:
    """A new unprivileged user with a subordinate id range (/etc/subuid, /etc/subgid) and a
    runtime dir of its own; removed afterwards, with its home and the lines added here."""
    subprocess.run(["userdel", "-r", name], capture_output=True)  # from a run that was killed
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    added = []
    for path in ("/etc/subuid", "/etc/subgid"):  # useradd may have added one (SUB_UID_COUNT)
        if not any(line.startswith(name + ":") for line in Path(path).read_text().splitlines()):
            with open(path, "a") as f:
                f.write(f"{name}:{subids}\n")
            added.append(path)
    entry = pwd.getpwnam(name)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-run-"))
    os.chown(run_dir, entry.pw_uid, entry.pw_gid)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": entry.pw_dir, "XDG_RUNTIME_DIR": str(run_dir),
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "LANG": "C.UTF-8"}
    try:
        yield User(name, env)
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True)
        for path in added:  # only our own line, in case userdel left it
            lines = Path(path).read_text().splitlines(keepends=True)
            Path(path).write_text("".join(line for line in lines if line != f"{name}:{subids}\n"))
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_cli(bench: _Bench, script: str, setup: Setup, limits: dict, timeout: float, user: User | None):
    flags = ["--rm", "--network", "none", "-v", f"{bench.probe}:/nb09-probe:ro", *setup.cli]
    flags += [f"--{'pids-limit' if k == 'pids' else k}={v}" for k, v in limits.items()]
    for k, v in bench.env(inside=True).items():
        flags += ["-e", f"{k}={v}"]
    argv = [sys.executable, "-m", "labkit", "run", *flags, "busybox", "sh", "-c", script]
    if user:  # rootless: the same command as an ordinary user, with this labkit
        argv = ["runuser", "-u", user.name, "--", "env", "-i", *(f"{k}={v}" for k, v in user.env.items()), *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout + r.stderr


def _run_runc(bench: _Bench, script: str, limits: dict, timeout: float, n: int):
    runc = shutil.which("runc")
    bundle = bench.dir / f"runc-{n}"
    bundle.mkdir()
    subprocess.run([runc, "spec"], cwd=bundle, check=True, capture_output=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"]["path"] = str(bench.rootfs)  # the one rootfs copy; runc keeps it read-only
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]})
    spec["process"].update(terminal=False, args=["sh", "-c", script],
                           env=[f"{k}={v}" for k, v in bench.env(inside=True).items()])
    res = {}
    if "pids" in limits:
        res["pids"] = {"limit": int(limits["pids"])}
    if "memory" in limits:
        res["memory"] = {"limit": 64 << 20, "swap": 128 << 20}
    spec["linux"]["resources"] = {**spec["linux"].get("resources", {}), **res}
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"{bench.prefix}-runc-{n}"
    try:
        r = subprocess.run([runc, "run", "--bundle", str(bundle), name], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        return r.returncode, r.stdout + r.stderr
    finally:
        subprocess.run([runc, "delete", "-f", name], capture_output=True)


# --- reading the outcomes ----------------------------------------------------------------


def read(a: Attempt, s: Setup, text: str, bench: _Bench | None = None) -> str:
    """One cell's outcome from what its command printed (and, for host_file, the host)."""
    words = text.split()
    if a.host_file and bench is not None and bench.hostfile.exists():
        bench.hostfile.unlink()  # the marker reached the host: remove it for the next column
        return "succeeded"
    if "HELD" in words:
        return "contained"
    if "YES" not in words:
        return a.refused if "NO" in words or not a.silent else a.silent
    if not s.isolates:
        return "succeeded"  # a plain process or a chroot: the host's own hostname, mounts...
    if a.host_file or a.isolated_by in s.isolates:
        return "contained"
    return "succeeded"


def _sections(out: str, count: int) -> list[str]:
    parts = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@@") and line[2:].isdigit():
            current = int(line[2:])
            parts[current] = ""
        elif current is not None:
            parts[current] += line + "\n"
    return [parts.get(i, "") for i in range(count)]


def run(setups: tuple[Setup, ...] = SETUPS, attempts: tuple[Attempt, ...] = ATTEMPTS, *,
        rootless_user: User | None = None, prefix: str = "nb09-score", timeout: float = 60) -> Card:
    """Every attempt in every set-up, once: a Card. A set-up that cannot run here is n/a."""
    card = Card([a.name for a in attempts], list(setups))
    bench = _Bench(prefix)
    try:
        for n, s in enumerate(setups):
            # the ordinary attempts share one container; those that end or fill it get their own
            groups = [[a for a in attempts if not a.alone]] + [[a] for a in attempts if a.alone]
            texts: dict[str, str] = {}
            for k, group in enumerate(g for g in groups if g):
                limits = dict(kv for a in group for kv in a.limits)
                # host_cmd (the harmless probe) wherever there is no PID namespace of its own
                script = _script(group, host="pid" not in s.isolates)
                try:
                    _rc, out = _one(bench, s, script, limits, timeout, rootless_user, n * 10 + k, card.notes)
                except _NotHere as why:
                    card.na[s.key] = str(why)
                    break
                texts.update(zip((a.name for a in group), _sections(out, len(group))))
            for a in attempts:
                row, said = card.outcome.setdefault(a.name, {}), card.output.setdefault(a.name, {})
                said[s.key] = texts.get(a.name, "")
                row[s.key] = NA if s.key in card.na else read(a, s, said[s.key], bench)
    finally:
        bench.close()
    return card


class _NotHere(Exception):
    """A set-up that cannot run on this machine; the message is the figure's reason."""


def _one(bench, s: Setup, script, limits, timeout, rootless_user, n, notes: list[str]) -> tuple[int, str]:
    if s.key in ("plain", "chroot"):
        return _ran(s, *_run_host(bench, script, s.key == "chroot", timeout))
    if s.stage >= 0:
        return _ran(s, *_run_stage(bench, script, s.stage, limits if s.stage >= 2 else {}, timeout))
    if s.key == "runc":
        if not shutil.which("runc"):
            raise _NotHere("runc is not installed")
        return _ran(s, *_run_runc(bench, script, limits, timeout, n))
    if s.key == "rootless" and not rootless_user:
        raise _NotHere("no ordinary user given (scorecard.ordinary_user() makes one)")
    user = rootless_user if s.key == "rootless" else None
    rc, out = _run_cli(bench, script, s, limits, timeout, user)
    if limits and "@@" not in out and "not available" in out:  # rootless without delegated cgroups
        notes.append(f"{s.label.replace(chr(10), ' ')}: no limits here ({out.strip().splitlines()[0][8:90]}...),"
                     " so the finite fork bomb and hog ran unheld")
        rc, out = _run_cli(bench, script, s, {}, timeout, user)
    return _ran(s, rc, out)


def _ran(s: Setup, rc: int, out: str) -> tuple[int, str]:
    if "@@" not in out:  # the container never ran: the flag or the mode is not there
        lines = [line for line in out.strip().splitlines() if not line.startswith("See ")] or [f"exit {rc}"]
        said = next((line for line in lines if "error" in line.lower() or line.startswith("labkit:")), lines[-1])
        raise _NotHere(f"{s.label.replace(chr(10), ' ')}: {said[:120]}")
    return rc, out


# --- the figure ----------------------------------------------------------------------------

COLOURS = {"denied": "#2e7d32", "contained": "#f9a825", "succeeded": "#c62828", NA: "#dddddd"}


def plot(card: Card, title: str = "09 · The isolation scorecard: escape attempts against set-ups",
         path: str | os.PathLike | None = None, n: int = 1):
    """A heat map: attempts (rows) x set-ups (columns), one colour per outcome; a column
    that cannot run here is grey and hatched, its reason in the footer."""
    from matplotlib.patches import Patch, Rectangle

    from labkit.lab import plots

    reasons = "; ".join([f"n/a {k}: {why}" for k, why in card.na.items()] + sorted(set(card.notes)))
    if not os.path.exists("/proc/kcore"):
        reasons += "; this kernel has no /proc/kcore: its row reads /proc/timer_list"
    if card.outcome.get("mknod + read the disk", {}).get("plain") == "denied":
        reasons += "; even a plain process may not read the disk here: this machine's own device cgroup"
    if not os.path.exists("/proc/modules"):
        reasons += "; this kernel loads no modules (ENOSYS before any permission check): its row is all denied"
    what = (f"each attempt run {'once' if n == 1 else f'{n} times'} per set-up (n={n}), busybox image, "
            "--network none; plain process and chroot run harmless probes of the permission "
            "(mount of a made-up type, reboot(2) with a wrong magic), never the act. " + reasons)
    fig, ax = plots.figure(title, what, size=(12, 8.5))
    for row, a in enumerate(card.attempts):
        for col, s in enumerate(card.setups):
            o = card.outcome[a][s.key]
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fc=COLOURS[o], ec="white",
                                   hatch="//" if o == NA else None))
            ax.text(col, row, "n/a" if o == NA else o[0].upper(), ha="center", va="center", fontsize=8,
                    color="#555555" if o == NA else "white")
    ax.set_xlim(-0.5, len(card.setups) - 0.5)
    ax.set_ylim(len(card.attempts) - 0.5, -0.5)
    ax.set_xticks(range(len(card.setups)), [s.label for s in card.setups], fontsize=8)
    ax.set_yticks(range(len(card.attempts)), card.attempts, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_xlabel("set-up: how the busybox shell was started (left: least isolated)")
    ax.set_ylabel("attempt (a busybox shell command)")
    ax.legend(handles=[Patch(fc=COLOURS[o], label=o) for o in OUTCOMES] + [Patch(fc=COLOURS[NA], hatch="//", label=NA)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="outcome")
    return plots.done(fig, path)
