"""Hints for the exercises, in two steps: first the idea, then (only when asked) code.

    hint("04.1")      # step 1: what the kernel needs, which man page, which /proc file
    hint("04.1", 2)   # step 2: the code, for when the idea is not enough

An exercise's stub in a student notebook says only where to look (``look``); a failed
check says what is still wrong. Neither types the answer. The code of step 2 is a
sketch of the solution's shape, and the student asks for it on purpose.

Layer: lab. Used by the notebooks (``from labkit.lab.hints import hint``), by
labkit.lab.notebooks (the stubs' messages) and by tests/test_notebooks.py (no hint of
step 1 may contain a line of its solution).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from labkit.errors import InvalidValue


@dataclass(frozen=True)
class Hint:
    look: str  # where to look, a few words: a man page, a /proc or /sys file, a labkit name
    idea: str  # step 1: the concept, in the kernel's terms; no code
    code: str  # step 2: code


HINTS: dict[str, Hint] = {
    "00.1": Hint(
        "proc(5), /proc/PID/ns/",
        "Every entry of /proc/PID/ns/ is a symbolic link such as `uts:[4026531838]`; the number "
        "is the inode of the namespace it points to. A stat that *follows* the link tells you that "
        "inode; one that does not (lstat) describes the link itself. Use the pid you are given.",
        'os.stat(f"/proc/{pid}/ns/uts").st_ino',
    ),
    "01.1": Hint(
        "proc(5), /proc/PID/smaps_rollup",
        "/proc/PID/smaps_rollup sums the process's memory maps in lines like `Rss:  1234 kB`. "
        "The line you want counts each shared page divided by the number of its sharers. The "
        "kernel writes kB (KiB); the function returns MiB.",
        'with open(f"/proc/{pid}/smaps_rollup") as f:\n'
        '    kib = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))\n'
        "return kib / 1024",
    ),
    "01.2": Hint(
        "namespaces.run, uname(2), hostname(1)",
        "One child is enough: labkit's namespaces.run starts a command in the namespace kinds you "
        "name and can give a new UTS namespace a hostname. A new PID namespace makes the shell PID 1. "
        "What comes back is the command's output: one value per line.",
        'done = namespaces.run(["sh", "-c", "uname -r; hostname; echo $$"],\n'
        '                      new={"uts", "pid", "mnt", "ipc"}, hostname="box")\n'
        "return done.stdout.split()",
    ),
    "02.1": Hint(
        "namespaces.spawn, uts_namespaces(7)",
        "The hostname lives in the UTS namespace. spawn (not run) returns while the process still "
        "runs; it takes the kinds of namespace to make and a hostname for a new UTS namespace.",
        'return namespaces.spawn(["sleep", "30"], new={"uts"}, hostname=name)',
    ),
    "02.2": Hint(
        "ipc_namespaces(7), ipcs(1)",
        "System V message queues belong to an IPC namespace. Run the listing in a child made with "
        "exactly the kinds the caller asked for, and give back what it printed.",
        'return namespaces.run(["ipcs", "-q"], new=new).stdout',
    ),
    "02.3": Hint(
        "unshare(2), CLONE_NEWUTS, CLONE_NEWIPC",
        "unshare(2) moves the calling process into new namespaces of the kinds in its flag mask (the "
        "flags are bits: combine them bitwise). sethostname(2) renames the UTS namespace the caller "
        "is in *at that moment*.",
        "syscalls.unshare(syscalls.CloneFlags.CLONE_NEWUTS | syscalls.CloneFlags.CLONE_NEWIPC)\n"
        'syscalls.sethostname("raw")\n'
        'return namespaces.namespaces_of("self")',
    ),
    "03.1": Hint(
        "pid_namespaces(7), namespaces.spawn",
        "The first process of a new PID namespace is its PID 1. It also needs a mount namespace of "
        "its own, so that a /proc for its PID namespace can be mounted without touching ours.",
        'return namespaces.spawn(["sleep", "30"], new={"pid", "mnt"})',
    ),
    "03.2": Hint(
        "mount(2), proc(5)",
        "A proc filesystem shows the PID namespace of whoever mounted it. Mount a new one (source "
        "and type are both `proc`) over /proc in the child; then the numeric names in /proc are the "
        "pids it sees, as numbers.",
        'syscalls.mount("proc", "/proc", "proc")\n'
        'return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())',
    ),
    "03.3": Hint(
        "wait(2), ECHILD",
        "wait(2) blocks until *some* child exits and returns its pid; once there are no children "
        "left it fails with ECHILD (Python: ChildProcessError). Orphans handed to PID 1 count as its "
        "children.",
        "while True:\n"
        "    try:\n"
        "        pid, _status = os.wait()\n"
        "    except ChildProcessError:\n"
        "        break\n"
        "    reaped.append(pid)",
    ),
    "04.1": Hint(
        "mount_namespaces(7), SHARED SUBTREES; /proc/self/mountinfo",
        "After unshare(CLONE_NEWNS) the child has a copy of the mount table, but each shared mount "
        "is still in its old peer group: a mount below it propagates back. Change propagation only "
        "in the child's own namespace, and for the whole tree, before mounting. Anything done "
        "before the unshare is done to the caller's mounts.",
        "syscalls.unshare(CloneFlags.CLONE_NEWNS)\n"
        'mounts.make_private("/")\n'
        'syscalls.mount("tmpfs", target, "tmpfs")\n'
        "return mounts.is_mountpoint(target)",
    ),
    "04.2": Hint(
        "pivot_root(2), umount2(2) MNT_DETACH",
        "pivot_root(2) wants the new root to be a mount point, not a plain directory, and no shared "
        "propagation on the way. pivot_root(\".\", \".\") stacks the old root on top of the new one "
        "at /; until you detach it, / still shows the host.",
        'mounts.make_private("/")\n'
        "mounts.bind(root, root)\n"
        "os.chdir(root)\n"
        'syscalls.pivot_root(".", ".")\n'
        'syscalls.umount2(".", UmountFlags.MNT_DETACH)\n'
        'os.chdir("/")',
    ),
    "05.1": Hint(
        "kernel doc filesystems/overlayfs.rst, copy up",
        "Write through the merged directory only: opening a lower file for writing makes overlayfs "
        "copy it up; a file that no layer has is created in the upper layer. Paths are relative to "
        "root (a path that starts with / throws root away).",
        'with open(root / "etc/motd", "a") as f:\n'
        '    f.write("one more line\\n")\n'
        '(root / "hello.txt").write_text("hello\\n")',
    ),
    "05.2": Hint(
        "overlayfs.rst, whiteouts and opaque directories",
        "Deleting a lower file leaves a whiteout in the upper layer. A directory that is deleted "
        "*and made again* becomes opaque: it hides what the lower layers have below it.",
        '(root / "etc/issue").unlink()\n'
        'for f in (root / "data").iterdir():\n'
        "    f.unlink()\n"
        '(root / "data").rmdir()\n'
        '(root / "data").mkdir()',
    ),
    "05.3": Hint(
        "overlay.mount, namespaces.run(root=...)",
        "The zine's four steps: the image layers are the lowers; upper and work are fresh empty "
        "directories on one filesystem; the merged directory becomes the container's / (root=). "
        "Read the upper layer back while it still exists.",
        'with tempfile.TemporaryDirectory(dir=paths.run_root()) as d:\n'
        "    d = Path(d)\n"
        '    with overlay.mount(image_layers, d / "upper", d / "work", d / "merged") as root:\n'
        '        result = namespaces.run(argv, new={"mnt", "pid", "uts"}, root=root)\n'
        '    return result, overlay.inspect(d / "upper", image_layers)',
    ),
    "06.1": Hint(
        "cgroups(7), cgroup.procs",
        "A process joins a group when its pid is written (as text) into the group's cgroup.procs. On "
        "v1 the group is one directory per hierarchy, and each hierarchy has its own cgroup.procs.",
        "for directory in cg.dirs():\n"
        '    with open(directory / "cgroup.procs", "w") as f:\n'
        "        f.write(str(pid))",
    ),
    "06.2": Hint(
        "kernel doc scheduler/sched-bwc.rst",
        "Bandwidth control is a budget of *microseconds* of CPU per period. cpus=0.25 means a quarter "
        "of each period. v1 keeps period and quota in two files, v2 both in one line; write only "
        "the branch for this machine (cg.version).",
        "quota = round(cpus * period)\n"
        "v1: (cg.paths['cpu'] / 'cpu.cfs_period_us').write_text(str(period)), then cpu.cfs_quota_us\n"
        "v2: (cg.paths['cpu'] / 'cpu.max').write_text(f'{quota} {period}')",
    ),
    "06.3": Hint(
        "cpuacct.usage (v1), cpu.stat usage_usec (v2)",
        "The CPU counter only grows. A share of a CPU is a rate: how much it grew, in seconds, "
        "divided by how many seconds of wall time passed between the two readings.",
        "used_before, t_before = cg.stats().cpu_usage_ns, time.monotonic()\n"
        "time.sleep(seconds)\n"
        "return (cg.stats().cpu_usage_ns - used_before) / 1e9 / (time.monotonic() - t_before)",
    ),
    "06.4": Hint(
        "cpu.shares (v1), cpu.weight (v2)",
        "A weight is not a cap: it only matters when groups compete, and the scheduler splits in "
        "proportion to it. Keep light at the default of this machine's spelling, heavy three times "
        "that, and set no quota.",
        'cgroups.create("nb06-light", cpu_shares=1024), cgroups.create("nb06-heavy", cpu_shares=3072)  # v1\n'
        'cgroups.create("nb06-light", cpu_weight=100), cgroups.create("nb06-heavy", cpu_weight=300)  # v2',
    ),
    "06.5": Hint(
        "kernel doc cgroup-v1/cpusets.rst (v2: cgroup-v2.rst, Cpuset); /proc/PID/status",
        "A cpuset is a rule of the group, not of one process: every task in it, and every task that "
        "joins later, is bound to the CPUs of one file and the memory nodes of the other. Both take "
        "the kernel's list format, and the file names are the same on v1 and v2.",
        'd = cg.paths["cpuset"]\n'
        '(d / "cpuset.mems").write_text(nodes)\n'
        '(d / "cpuset.cpus").write_text(str(cpu))',
    ),
    "07.1": Hint(
        "docker run -m / --memory-swap; memory.memsw.limit_in_bytes (v1), memory.swap.max (v2)",
        "Docker's --memory-swap is memory *plus* swap. No swap on top of 32 MiB therefore means the "
        "same value twice.",
        'return cgroups.create("nb07-mem", memory="32m", memory_swap="32m")',
    ),
    "07.2": Hint(
        "kernel doc cgroup-v1/pids.rst, pids.max",
        "The pids controller refuses fork() once the group holds pids.max tasks; the number counts "
        "every task, the first one included. Its files are in the pids controller's directory.",
        '(cg.paths["pids"] / "pids.max").write_text(str(n))',
    ),
    "07.3": Hint(
        "stat(2) st_rdev; blkio.throttle.read_bps_device (v1), io.max (v2)",
        "A throttle rule names a block device by major:minor. For a device node, those are the "
        "numbers of the device it *is* (st_rdev), not of the filesystem that holds the node "
        "(st_dev). Limit reads, and write only the branch for this machine.",
        "rdev = os.stat(dev).st_rdev\n"
        'device = f"{os.major(rdev)}:{os.minor(rdev)}"\n'
        'v1: (cg.paths["blkio"] / "blkio.throttle.read_bps_device").write_text(f"{device} {bps}")\n'
        'v2: (cg.paths["io"] / "io.max").write_text(f"{device} rbps={bps}")',
    ),
    "07.4": Hint(
        "kernel doc cgroup-v1/freezer-subsystem.rst; cgroup.freeze (v2)",
        "The freezer is a state of the group, not a signal: a stopped process is not frozen. On v1 you "
        "write the state you want (the kernel may report FREEZING on the way); on v2 a 1 or a 0.",
        'v1: (cg.paths["freezer"] / "freezer.state").write_text("FROZEN")  # "THAWED" to resume\n'
        'v2: (cg.path / "cgroup.freeze").write_text("1")  # "0" to resume',
    ),
    "07.5": Hint(
        "trapezoidal rule",
        "The CPU column is a counter that started before the meter: take its growth. Memory is a "
        "level, so its cost is an area: for each interval between two samples, the mean of the two "
        "readings times the interval's length.",
        "cpu_seconds = (rows[-1][1] - rows[0][1]) / 1e9\n"
        "mib_seconds = sum((m0 + m1) / 2 / MiB * (t1 - t0)\n"
        "                  for (t0, _, m0), (t1, _, m1) in zip(rows, rows[1:]))",
    ),
    "07.6": Hint(
        "kernel doc admin-guide/cgroup-v1/devices.rst; stat(2) st_mode, st_rdev",
        "A rule names a device by what it is: its type (c for a character device, b for a block "
        "device), the numbers of the device the node stands for, and the accesses (r read, w write, "
        "m mknod). Opening for reading needs r. A rule in the deny file takes that access away.",
        "st = os.stat(dev)\n"
        'kind = "c" if stat.S_ISCHR(st.st_mode) else "b"\n'
        '(cg.paths["devices"] / "devices.deny").write_text(f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} rwm")',
    ),
    "08.1": Hint(
        "ip-link(8) type veth, peer name ... netns; ip-address(8); net.veth, net.add_address, net.set_up",
        "A veth pair is made in one go, with the peer created directly inside the namespace "
        "(peer_netns=). Each end is then configured in its own namespace: the inside one with "
        "netns=ns. A new link is down until you switch it on, on both sides.",
        'net.veth(host_end, "eth0", peer_netns=ns)\n'
        "net.add_address(host_end, host_cidr)\n"
        'net.add_address("eth0", ns_cidr, netns=ns)\n'
        "net.set_up(host_end)\n"
        'net.set_up("eth0", netns=ns)',
    ),
    "08.2": Hint(
        "ip-link(8) type bridge, ip link set DEV master BRIDGE; net.bridge, net.set_master",
        "A bridge is a switch: make it, make each host end one of its ports (the bridge is the "
        "port's master), and remember that a new bridge is down like any new link.",
        "net.bridge(name)\n"
        "for end in ends:\n"
        "    net.set_master(end, name)\n"
        "net.set_up(name)",
    ),
    "08.3": Hint(
        "nft(8) dnat; labkit.kernel.network.nat.Table.create, Table.publish",
        "The rule belongs in this notebook's table, net.Table(TABLE), which must exist first "
        "(create()). publish(host_port, container_ip, container_port): the host's port is what a "
        "client dials, the container's address and port are where the server listens.",
        "table = net.Table(TABLE).create()\n"
        'table.publish(host_port, ip, port, tag="nb08")\n'
        "return table",
    ),
    "09.1": Hint(
        "user_namespaces(7), /proc/PID/uid_map; namespaces.run(..., new={'user'}, uid_map=, gid_map=)",
        "A new user namespace needs a map from its ids to the host's; the parent writes it, which "
        "namespaces.run does for you when you pass the maps (both uid and gid). Inside, ls -ln prints "
        "numbers, as the kernel translates them at the boundary; the owner is the third field.",
        'done = namespaces.run(["ls", "-ln", str(path)], new={"user"}, uid_map=uid_map, gid_map=uid_map)\n'
        "return int(done.stdout.split()[2])",
    ),
    "09.2": Hint(
        "capabilities(7): the bounding, effective and permitted sets; security.capsets, security.keep_only",
        "Dropping a capability for good takes it out of the bounding set (so no execve brings it back) "
        "and out of the effective and permitted sets (so this process loses it now). Start from what the "
        "process holds and leave out only the one you were given.",
        'keep = [c for c in security.capsets().names("bounding") if c != cap]\n'
        "security.keep_only(keep)",
    ),
    "09.3": Hint(
        "seccomp(2), seccomp_rule_add(3); seccomp.Filter, seccomp.Rule",
        "A filter has a default action for every call no rule names, and rules for the names it does. "
        "To block one call, the default must let everything through, and the one rule must make the "
        "call fail with an errno the program can handle (EPERM), not kill it.",
        'return seccomp.Filter(default_action="SCMP_ACT_ALLOW",\n'
        '                      rules=(seccomp.Rule((name,), "SCMP_ACT_ERRNO", errno_ret=errno.EPERM),))',
    ),
    "10.1": Hint(
        "OCI image spec, config.md: Layer ChainID",
        "A chain ID names a layer together with every layer under it. The bottom one has nothing "
        "under it, so its chain ID is its own DiffID; each next one is the sha256 of a text: the "
        "previous chain ID, one space, this layer's DiffID. Written as 'sha256:' and hex, like a DiffID.",
        "out = []\n"
        "for d in diff_ids:  # the text to hash: f'{out[-1]} {d}', encoded\n"
        "    out.append(d if not out else 'sha256:' + hashlib.sha256(...).hexdigest())",
    ),
    "10.2": Hint(
        "OCI image spec, layer.md: Whiteouts; tarfile; stat(2) st_rdev",
        "A layer tar names its members relative to the layer's root. overlayfs marks a delete with "
        "a character device numbered 0/0; a tar cannot carry that meaning, so the spec uses an empty "
        "regular file named .wh. plus the deleted name, in the same directory. The DiffID is the "
        "sha256 of the very bytes of the tar you wrote.",
        "for p in sorted(upper.rglob('*')):  # a whiteout: S_ISCHR and st_rdev == 0\n"
        "    tar.addfile(tarfile.TarInfo(f'{rel.parent}/.wh.{rel.name}'))  # else tar.add(p, arcname=rel, recursive=False)\n"
        "return 'sha256:' + hashlib.sha256(out.read_bytes()).hexdigest()",
    ),
    "10.3": Hint(
        "Docker docs: build cache invalidation",
        "A step's cache key is its parent image plus the step; a COPY also counts the bytes it "
        "copies. Once one step misses, every step after it misses too. Put what changes rarely "
        "(the dependency list and the step that installs it) above what changes often.",
        "FROM busybox\nCOPY deps.txt ...\nRUN ... (the same command)\nCOPY app.sh ...",
    ),
    "12.1": Hint(
        "unix(7), socket.AF_UNIX; RFC 9112 (HTTP/1.1); Engine API 1.41: ContainerList",
        "An HTTP/1.1 request is text: a request line (method, path with its query, protocol), "
        "header lines, then an empty line, each line ending in CRLF. The CLI's paths carry the API "
        "version it agreed on at /_ping, and the list has a query parameter for containers that do "
        "not run. With Connection: close the server closes after its answer, so reading until recv() "
        "gives nothing reads the whole answer. The first empty line ends the head; the JSON body follows.",
        "with socket.socket(socket.AF_UNIX) as s:\n"
        "    s.connect(path)\n"
        '    s.sendall(b"GET /v1.41/containers/json?all=1 HTTP/1.1\\r\\nHost: docker\\r\\nConnection: close\\r\\n\\r\\n")\n'
        "    ...  # data += s.recv(65536) until it returns b\"\"\n"
        'return json.loads(data.partition(b"\\r\\n\\r\\n")[2])',
    ),
    "12.2": Hint(
        "Engine API 1.41: ContainerCreate (Config, HostConfig); the body the CLI sent, above",
        "The body is the container's Config with a HostConfig inside: what belongs to the process "
        "(the image, the command, its environment) at the top, what the host does for it (remove it "
        "after the exit, limit its memory) in HostConfig. A command is a list of arguments, as "
        "execve(2) takes it; a size is a number of bytes, and Docker's m means MiB.",
        'return {"Image": "busybox", "Cmd": [...], "Env": ["GREETING=hi"],\n'
        '        "HostConfig": {"AutoRemove": True, "Memory": 64 * 1024 * 1024}}',
    ),
    "12.3": Hint(
        "Engine API 1.41: ContainerAttach, the stream format; int.from_bytes",
        "The data is frames one after the other. Each starts with an 8-byte header: byte 0 names "
        "the stream (1 stdout, 2 stderr), bytes 1 to 3 are zero, bytes 4 to 7 are the payload's "
        "length as an unsigned 32-bit number with the most significant byte first (big-endian, "
        "network order). The payload follows the header, and the next header follows the payload. "
        "Add every payload to the bytes of its stream.",
        "i = 0\n"
        "while i + 8 <= len(data):\n"
        '    stream, size = data[i], int.from_bytes(data[i + 4:i + 8], "big")\n'
        "    ...  # the payload: data[i + 8:i + 8 + size]\n"
        "    i += 8 + size",
    ),
}

_ID = re.compile(r"^\d{2}\.\d{1,2}$")


def get(exercise_id: str) -> Hint:
    if not _ID.match(exercise_id) or exercise_id not in HINTS:
        raise InvalidValue("exercise id", exercise_id, f"one of {', '.join(sorted(HINTS))}")
    return HINTS[exercise_id]


def text(exercise_id: str, step: int = 1) -> str:
    """The hint as plain text: step 1 the idea, step 2 the code."""
    h = get(exercise_id)
    if step == 1:
        return (f"exercise {exercise_id}, hint 1 of 2 (look at: {h.look})\n{h.idea}\n"
                f"Still stuck? hint({exercise_id!r}, 2) shows code.")
    if step == 2:
        return f"exercise {exercise_id}, hint 2 of 2: code\n" + "\n".join("    " + line for line in h.code.splitlines())
    raise InvalidValue("hint step", str(step), "1 (the idea) or 2 (the code)")


def hint(exercise_id: str, step: int = 1) -> None:
    """Show a hint for an exercise: step 1 the idea, step 2 (asked for on purpose) code."""
    body = text(exercise_id, step)
    if "IPython" in sys.modules:
        from IPython import get_ipython

        if get_ipython() is not None and type(get_ipython()).__name__ == "ZMQInteractiveShell":
            from IPython.display import Markdown, display

            h = get(exercise_id)
            if step == 1:
                md = (f"**Exercise {exercise_id}, hint 1 of 2** (look at: {h.look})\n\n{h.idea}\n\n"
                      f"Still stuck? `hint({exercise_id!r}, 2)` shows code.")
            else:
                md = f"**Exercise {exercise_id}, hint 2 of 2: code**\n\n```python\n{h.code}\n```"
            display(Markdown(md))
            return
    print(body)
