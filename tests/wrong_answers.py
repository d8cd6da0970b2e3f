"""Plausible wrong answers, per exercise: data for tests/test_wrong_answers.py.

Each string replaces the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` of
its exercise (written here without the region's indentation; the test adds it). An
exercise whose cell has several regions (07.4: pause, resume) may give a tuple instead,
one entry per region, None where that region keeps its solution. Each
one is a mistake a student plausibly makes: the test runs the notebook with it and
asserts that the exercise's check reports a failure (not "not done yet", and not a
crash of some other cell), and that the machine is unchanged afterwards.

When a check is made stricter, add the wrong answer that showed the gap here.
"""

WRONG: dict[str, list[str]] = {
    # --- 00: /proc/PID/ns
    "00.1": [
        'return os.stat("/proc/self/ns/uts").st_ino  # ignores pid: our own namespace',
        'return os.lstat(f"/proc/{pid}/ns/uts").st_ino  # the symbolic link\'s own inode',
        'return os.readlink(f"/proc/{pid}/ns/uts")  # the text "uts:[N]", not the number',
    ],
    # --- 01: PSS, the kernel inside
    "01.1": [
        'with open(f"/proc/{pid}/smaps_rollup") as f:\n'
        '    kib = next(int(line.split()[1]) for line in f if line.startswith("Rss:"))\n'
        'return kib / 1024  # RSS, not PSS',
        'with open(f"/proc/{pid}/smaps_rollup") as f:\n'
        '    return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))  # kB, not MiB',
    ],
    "01.2": [
        'return [os.uname().release, os.uname().nodename, str(os.getpid())]  # no container at all',
        'return namespaces.run(["sh", "-c", "uname -r; hostname; echo $$"], new={"uts"}, hostname="box").stdout.split()',
        'return namespaces.run(["sh", "-c", "uname -r; hostname; echo $$"], new={"uts", "pid", "mnt", "ipc"}).stdout.split()',
    ],
    # --- 02: UTS and IPC
    "02.1": [
        'return namespaces.spawn(["sleep", "30"], hostname=name)  # no new UTS namespace: labkit refuses',
        'return namespaces.spawn(["sleep", "30"], new={"uts"})  # its own namespace, but the old name',
    ],
    "02.2": [
        'return namespaces.run(["ipcs", "-q"], new={"ipc"}).stdout  # ignores new',
        'return namespaces.run(["ipcs", "-q"]).stdout  # ignores new the other way',
    ],
    "02.3": [
        'syscalls.sethostname("raw")  # before unshare: renames the caller\n'
        'syscalls.unshare(syscalls.CloneFlags.CLONE_NEWUTS | syscalls.CloneFlags.CLONE_NEWIPC)\n'
        'return namespaces.namespaces_of("self")',
        'syscalls.unshare(syscalls.CloneFlags.CLONE_NEWUTS)  # IPC forgotten\n'
        'syscalls.sethostname("raw")\n'
        'return namespaces.namespaces_of("self")',
        'syscalls.unshare(syscalls.CloneFlags.CLONE_NEWUTS and syscalls.CloneFlags.CLONE_NEWIPC)  # `and`, not `|`\n'
        'syscalls.sethostname("raw")\n'
        'return namespaces.namespaces_of("self")',
    ],
    # --- 03: PID namespace
    "03.1": [
        'return namespaces.spawn(["sleep", "30"], new={"pid"})  # no mount namespace for its /proc',
        'return namespaces.spawn(["sleep", "30"], new={"mnt"})  # no PID namespace',
    ],
    "03.2": [
        'return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())  # the old /proc',
        'syscalls.mount("proc", "/proc", "proc")\n'
        'return sorted(n for n in os.listdir("/proc") if n.isdigit())  # names, not numbers',
    ],
    "03.3": [
        'pid, _status = os.wait()  # reaps one orphan, not all\n'
        'reaped.append(pid)',
        'while True:\n'
        '    pid, _status = os.waitpid(-1, os.WNOHANG)  # does not wait: nothing has exited yet\n'
        '    if pid == 0:\n'
        '        break\n'
        '    reaped.append(pid)',
    ],
    # --- 04: mount namespace, pivot_root
    "04.1": [
        'mounts.make_private("/")  # before unshare: changes the caller\'s mounts\n'
        'syscalls.unshare(CloneFlags.CLONE_NEWNS)\n'
        'syscalls.mount("tmpfs", target, "tmpfs")\n'
        'return mounts.is_mountpoint(target)',
        'syscalls.unshare(CloneFlags.CLONE_NEWNS)  # still in the caller\'s peer groups\n'
        'syscalls.mount("tmpfs", target, "tmpfs")\n'
        'return mounts.is_mountpoint(target)',
        'mounts.make_private("/")  # never unshares: mounts in the caller\'s namespace\n'
        'syscalls.mount("tmpfs", target, "tmpfs")\n'
        'return mounts.is_mountpoint(target)',
    ],
    "04.2": [
        'os.chroot(root)  # chroot, not pivot_root\n'
        'os.chdir("/")',
        'mounts.make_private("/")\n'
        'mounts.bind(root, root)\n'
        'os.chdir(root)\n'
        'syscalls.pivot_root(".", ".")  # the old root is never detached\n'
        'os.chdir("/")',
        'mounts.make_private("/")\n'
        'os.chdir(root)  # root is no mount point: pivot_root refuses\n'
        'syscalls.pivot_root(".", ".")\n'
        'syscalls.umount2(".", UmountFlags.MNT_DETACH)\n'
        'os.chdir("/")',
    ],
    # --- 05: overlayfs
    "05.1": [
        '(root / "hello.txt").write_text("hello\\n")  # motd forgotten',
        'with open(root / "etc/motd", "a") as f:\n'
        '    f.write("one more line\\n")\n'
        '(root / "etc/hello.txt").write_text("hello\\n")  # in etc/, not at the top',
        'with open(root / "/etc/motd", "a") as f:  # a leading /: the host\'s own /etc/motd\n'
        '    f.write("one more line\\n")\n'
        '(root / "hello.txt").write_text("hello\\n")',
    ],
    "05.2": [
        'import shutil\n'
        '(root / "etc/issue").unlink()\n'
        'shutil.rmtree(root / "data")  # deleted, never made again: a whiteout, not an opaque dir',
        '(root / "etc/issue").unlink()\n'
        'for f in (root / "data").iterdir():  # the files go, the directory stays\n'
        '    f.unlink()',
    ],
    "05.3": [
        'with tempfile.TemporaryDirectory(prefix="nb05-", dir=paths.run_root()) as d:\n'
        '    d = Path(d)\n'
        '    with overlay.mount(image_layers, d / "upper", d / "work", d / "merged") as root:\n'
        '        result = namespaces.run(argv, new={"mnt", "pid", "uts"}, hostname="nb05")  # root= forgotten\n'
        '    return result, overlay.inspect(d / "upper", image_layers)',
        'with tempfile.TemporaryDirectory(prefix="nb05-", dir=paths.run_root()) as d:\n'
        '    d = Path(d)\n'
        '    with overlay.mount(image_layers, d / "upper", d / "work", d / "merged") as root:\n'
        '        result = namespaces.run(argv, new={"mnt", "pid", "uts"}, root=root, hostname="nb05")\n'
        'return result, overlay.inspect(d / "upper", image_layers)  # read after the upper is deleted',
    ],
    # --- 06: CPU
    "06.1": [
        'with open(cg.paths["cpu"] / "cgroup.procs", "w") as f:  # one hierarchy of several\n'
        '    f.write(str(pid))',
        'for directory in cg.dirs():\n'
        '    with open(directory / "cgroup.procs", "w") as f:\n'
        '        f.write(pid)  # an int: write() wants text',
    ],
    "06.2": [
        'quota = round(cpus * 1000)  # milliseconds, not microseconds\n'
        'd = cg.paths["cpu"]\n'
        'if cg.version == 1:\n'
        '    (d / "cpu.cfs_period_us").write_text(str(period))\n'
        '    (d / "cpu.cfs_quota_us").write_text(str(quota))\n'
        'else:\n'
        '    (d / "cpu.max").write_text(f"{quota} {period}")',
        'quota = round(period / cpus)  # upside down: four CPUs\' worth\n'
        'd = cg.paths["cpu"]\n'
        'if cg.version == 1:\n'
        '    (d / "cpu.cfs_period_us").write_text(str(period))\n'
        '    (d / "cpu.cfs_quota_us").write_text(str(quota))\n'
        'else:\n'
        '    (d / "cpu.max").write_text(f"{quota} {period}")',
        'name = "cpu.shares" if cg.version == 1 else "cpu.weight"  # a weight is no cap\n'
        '(cg.paths["cpu"] / name).write_text(str(round(cpus * 100)))',
    ],
    "06.3": [
        'used_before = cg.stats().cpu_usage_ns\n'
        'time.sleep(seconds)\n'
        'return (cg.stats().cpu_usage_ns - used_before) / 1e9  # CPU seconds, not per second',
        'used_before, t_before = cg.stats().cpu_usage_ns, time.monotonic()\n'
        'time.sleep(seconds)\n'
        'return (cg.stats().cpu_usage_ns - used_before) / (time.monotonic() - t_before)  # nanoseconds per second',
    ],
    "06.4": [
        'if cgroups.version() == 2:  # light and heavy the wrong way round\n'
        '    return cgroups.create("nb06-light", cpu_weight=300), cgroups.create("nb06-heavy", cpu_weight=100)\n'
        'return cgroups.create("nb06-light", cpu_shares=3072), cgroups.create("nb06-heavy", cpu_shares=1024)',
        'return cgroups.create("nb06-light", cpus=0.25), cgroups.create("nb06-heavy", cpus=0.75)  # caps, not weights',
    ],
    "06.5": [
        'for pid in cg.procs():  # the processes there now, not a rule of the group\n'
        '    os.sched_setaffinity(pid, {cpu})',
        'd = cg.paths["cpuset"]  # the two files swapped\n'
        '(d / "cpuset.mems").write_text(str(cpu))\n'
        '(d / "cpuset.cpus").write_text(nodes)',
        'd = cg.paths["cpuset"]\n'
        '(d / "cpuset.mems").write_text(nodes)\n'
        '(d / "cpuset.cpus").write_text(f"0-{cpu}")  # every CPU up to it, not the one',
    ],
    # --- 07: memory, pids, io, freezer, billing
    "07.1": [
        'return cgroups.create("nb07-mem", memory="32m")  # swap left open',
        'return cgroups.create("nb07-mem", memory="32m", memory_swap="64m")  # 32m of swap on top',
    ],
    "07.2": [
        '(cg.paths["pids"] / "pids.max").write_text(str(n + 1))  # "plus the one that starts it"',
        '(cg.paths["memory"] / "pids.max").write_text(str(n))  # another controller\'s directory',
    ],
    "07.3": [
        'rdev = os.stat(dev).st_dev  # the device that holds the /dev entry, not the loop device\n'
        'device = f"{os.major(rdev)}:{os.minor(rdev)}"\n'
        'if cg.version == 1:\n'
        '    (cg.paths["blkio"] / "blkio.throttle.read_bps_device").write_text(f"{device} {bps}")\n'
        'else:\n'
        '    (cg.paths["io"] / "io.max").write_text(f"{device} rbps={bps}")',
        'rdev = os.stat(dev).st_rdev\n'
        'device = f"{os.major(rdev)}:{os.minor(rdev)}"\n'
        'if cg.version == 1:  # the write limit, not the read limit\n'
        '    (cg.paths["blkio"] / "blkio.throttle.write_bps_device").write_text(f"{device} {bps}")\n'
        'else:\n'
        '    (cg.paths["io"] / "io.max").write_text(f"{device} wbps={bps}")',
    ],
    "07.4": [
        'import signal  # a signal, not the freezer: the group never reaches FROZEN\n'
        'for pid in cg.procs():\n'
        '    os.kill(pid, signal.SIGSTOP)',
        'if cg.version == 1:  # FROZEN is what the kernel reports; it is also what you write\n'
        '    (cg.paths["freezer"] / "freezer.state").write_text("FREEZING")\n'
        'else:\n'
        '    (cg.path / "cgroup.freeze").write_text("freeze")',
        (None,  # pause is right; resume sends a signal, which does not thaw a frozen group
         'import signal\n'
         'for pid in cg.procs():\n'
         '    os.kill(pid, signal.SIGCONT)'),
    ],
    "07.5": [
        'cpu_seconds = rows[-1][1] / 1e9  # the counter, not its growth\n'
        'mib_seconds = 0.0\n'
        'for (t0, _, m0), (t1, _, m1) in zip(rows, rows[1:]):\n'
        '    mib_seconds += (m0 + m1) / 2 / MiB * (t1 - t0)\n'
        'return cpu_seconds, mib_seconds',
        'cpu_seconds = (rows[-1][1] - rows[0][1]) / 1e9\n'
        'return cpu_seconds, sum(m for _, _, m in rows) / MiB  # readings added up, time forgotten',
        'cpu_seconds = (rows[-1][1] - rows[0][1]) / 1e9\n'
        'mib_seconds = sum(m1 / MiB * (t1 - t0) for (t0, _, _), (t1, _, m1) in zip(rows, rows[1:]))  # right edges only\n'
        'return cpu_seconds, mib_seconds',
    ],
    "07.6": [
        'st = os.stat(dev)  # st_dev: the file system that holds the node (devtmpfs), not the device\n'
        '(cg.paths["devices"] / "devices.deny").write_text(f"c {os.major(st.st_dev)}:{os.minor(st.st_dev)} rwm")',
        'st = os.stat(dev)  # into the allow file: the group allows everything already\n'
        '(cg.paths["devices"] / "devices.allow").write_text(f"c {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} rwm")',
        'st = os.stat(dev)  # m only: making the node is refused, opening it is not\n'
        '(cg.paths["devices"] / "devices.deny").write_text(f"c {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} m")',
    ],
    # --- 08: network namespace, veth, bridge, DNAT
    "08.1": [
        'net.veth(host_end, "eth0", peer_netns=ns)\n'
        'net.add_address(host_end, host_cidr)\n'
        'net.add_address("eth0", ns_cidr, netns=ns)\n'
        'net.set_up(host_end)  # the inside end left down',
        'net.veth(host_end, "eth0", peer_netns=ns)\n'
        'net.add_address(host_end, host_cidr)\n'
        'net.add_address(host_end, ns_cidr)  # both addresses on the host end\n'
        'net.set_up(host_end)\n'
        'net.set_up("eth0", netns=ns)',
        'net.veth(host_end, "lk8-peer")  # both ends on the host, then one moved: it keeps its name\n'
        'net.move("lk8-peer", ns)\n'
        'net.add_address(host_end, host_cidr)\n'
        'net.add_address("eth0", ns_cidr, netns=ns)\n'
        'net.set_up(host_end)\n'
        'net.set_up("eth0", netns=ns)',
    ],
    "08.2": [
        'net.bridge(name)\n'
        'for end in ends:\n'
        '    net.set_master(end, name)  # the bridge left down',
        'net.bridge(name)\n'
        'net.set_master(ends[0], name)  # only the first port\n'
        'net.set_up(name)',
        'net.bridge(name)\n'
        'for end in ends:\n'
        '    net.set_master(name, end)  # the other way round\n'
        'net.set_up(name)',
    ],
    "08.3": [
        'table = net.Table(TABLE + "x").create()  # a table of its own, not the notebook\'s\n'
        'table.publish(host_port, ip, port, tag="nb08")\n'
        'return table',
        'table = net.Table(TABLE).create()\n'
        'table.publish(port, ip, host_port, tag="nb08")  # the two ports swapped\n'
        'return table',
        'table = net.Table(TABLE).create()\n'
        'table.publish(host_port, "10.208.5.1", port, tag="nb08")  # to the bridge\'s address, not the container\'s\n'
        'return table',
    ],
    # --- 10: images and builds
    # --- 09: user namespaces, capabilities, seccomp
    "09.1": [
        "return os.stat(path).st_uid  # the host's view: 100005",
        'done = namespaces.run(["ls", "-ln", str(path)], new={"user"})  # no map: every owner is nobody\n'
        "return int(done.stdout.split()[2])",
        "swapped = [(outside, inside, n) for inside, outside, n in uid_map]  # inside and outside swapped\n"
        'done = namespaces.run(["ls", "-ln", str(path)], new={"user"}, uid_map=swapped, gid_map=swapped)\n'
        "return int(done.stdout.split()[2])",
        'done = namespaces.run(["ls", "-ln", str(path)], new={"user"}, uid_map=uid_map, gid_map=uid_map)\n'
        "return done.stdout.split()[2]  # a str, not an int",
    ],
    "09.2": [
        'security.drop_bounding([c for c in security.capsets().names("bounding") if c != cap])  # bounding set only',
        "security.keep_only([cap])  # keeps the one it should drop, drops the rest",
        'keep = [c for c in security.capsets().names("effective") if c != cap]\n'
        "security.set_caps(keep, keep)  # the bounding set still has it",
    ],
    "09.3": [
        'return seccomp.Filter(default_action="SCMP_ACT_ALLOW",\n'
        '                      rules=(seccomp.Rule((name,), "SCMP_ACT_KILL"),))  # kills instead of failing',
        'return seccomp.Filter(default_action="SCMP_ACT_ALLOW",\n'
        '                      rules=(seccomp.Rule((name,), "SCMP_ACT_ERRNO", errno_ret=errno.ENOSYS),))  # another errno',
        'return seccomp.Filter(default_action="SCMP_ACT_ERRNO",\n'
        '                      rules=(seccomp.Rule((name,), "SCMP_ACT_ALLOW"),))  # the other way round: all else fails',
    ],
    "10.1": [
        'return [d for d in diff_ids]  # DiffIDs, not chain IDs',
        'out = []\n'
        'for d in diff_ids:\n'
        '    out.append("sha256:" + hashlib.sha256(f"{out[-1] if out else \'\'} {d}".encode()).hexdigest())  # hashes L0 too\n'
        'return out',
        'out = []\n'
        'for d in diff_ids:\n'
        '    out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]}{d}".encode()).hexdigest())  # no space\n'
        'return out',
    ],
    "10.2": [
        'with tarfile.open(out, "w") as tar:\n'
        '    for p in sorted(upper.rglob("*")):\n'
        '        tar.add(p, arcname=str(p.relative_to(upper)), recursive=False)  # the whiteout stays a device\n'
        'return "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()',
        'with tarfile.open(out, "w") as tar:\n'
        '    tar.add(upper, arcname=str(upper))  # absolute names, whiteout as a device\n'
        'return "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()',
        'with tarfile.open(out, "w:gz") as tar:  # compressed: its sha256 is the digest, not the DiffID\n'
        '    for p in sorted(upper.rglob("*")):\n'
        '        rel, st = p.relative_to(upper), os.lstat(p)\n'
        '        if st.st_mode >> 12 == 2:\n'
        '            tar.addfile(tarfile.TarInfo(str(rel.parent / (".wh." + rel.name))))\n'
        '        else:\n'
        '            tar.add(p, arcname=str(rel), recursive=False)\n'
        'return "sha256:" + hashlib.sha256(gzip.decompress(out.read_bytes())).hexdigest()',
    ],
    "10.3": [
        'return BAD  # the order of the slide: app code before the dependencies',
        'return "FROM busybox\\nCOPY . /app/\\nRUN sleep 1 && cp /app/deps.txt /app/installed\\n"  # the whole context first',
        'return "FROM busybox\\nCOPY deps.txt /app/deps.txt\\nCOPY app.sh /app/app.sh\\n"'
        ' "RUN sleep 1 && cp /app/deps.txt /app/installed\\n"  # app.sh still above the RUN',
    ],
    # --- 12: the Engine API, by hand
    "12.1": [
        'with socket.socket(socket.AF_UNIX) as s:\n'
        '    s.connect(path)\n'
        '    s.sendall(b"GET /containers/json?all=1 HTTP/1.1\\r\\nHost: docker\\r\\nConnection: close\\r\\n\\r\\n")  # no /v1.41\n'
        '    data = b""\n'
        '    while piece := s.recv(65536):\n'
        '        data += piece\n'
        'return json.loads(data.partition(b"\\r\\n\\r\\n")[2])',
        'with socket.socket(socket.AF_UNIX) as s:\n'
        '    s.connect(path)\n'
        '    s.sendall(b"GET /v1.41/containers/json HTTP/1.1\\r\\nHost: docker\\r\\nConnection: close\\r\\n\\r\\n")  # running ones only\n'
        '    data = b""\n'
        '    while piece := s.recv(65536):\n'
        '        data += piece\n'
        'return json.loads(data.partition(b"\\r\\n\\r\\n")[2])',
        'with socket.socket(socket.AF_UNIX) as s:\n'
        '    s.connect(path)\n'
        '    s.sendall(b"GET /v1.41/containers/json?all=1 HTTP/1.1\\r\\nHost: docker\\r\\nConnection: close\\r\\n\\r\\n")\n'
        '    data = b""\n'
        '    while piece := s.recv(65536):\n'
        '        data += piece\n'
        'return data.partition(b"\\r\\n\\r\\n")[2]  # the bytes of the body, not parsed',
        'with socket.socket(socket.AF_UNIX) as s:\n'
        '    s.connect(path)\n'
        '    s.sendall(b"GET /v1.41/containers/json?all=1 HTTP/1.1\\r\\nHost: docker\\r\\n\\r\\n")  # keep-alive: no end comes\n'
        '    data = b""\n'
        '    while piece := s.recv(65536):\n'
        '        data += piece\n'
        'return json.loads(data.partition(b"\\r\\n\\r\\n")[2])',
    ],
    "12.2": [
        'return {"Image": "busybox", "Cmd": ["echo", "hi"], "Env": ["GREETING=hi"],\n'
        '        "HostConfig": {"AutoRemove": True, "Memory": "64m"}}  # the CLI\'s spelling, not bytes',
        'return {"Image": "busybox", "Cmd": ["echo", "hi"], "Env": ["GREETING=hi"],\n'
        '        "HostConfig": {"AutoRemove": True, "Memory": 64_000_000}}  # MB, not MiB',
        'return {"Image": "busybox", "Cmd": ["echo", "hi"], "Env": ["GREETING=hi"], "AutoRemove": True,\n'
        '        "HostConfig": {"Memory": 64 * 1024 * 1024}}  # AutoRemove outside HostConfig',
        'return {"Image": "busybox", "Cmd": "echo hi", "Env": ["GREETING=hi"],  # one string, not a list\n'
        '        "HostConfig": {"AutoRemove": True, "Memory": 64 * 1024 * 1024}}',
    ],
    "12.3": [
        'out = {1: b"", 2: b""}\n'
        'i = 0\n'
        'while i + 8 <= len(data):\n'
        '    stream, size = data[i], int.from_bytes(data[i + 4:i + 8], "little")  # little-endian\n'
        '    out[stream] = out.get(stream, b"") + data[i + 8:i + 8 + size]\n'
        '    i += 8 + size\n'
        'return out[1], out[2]',
        'out = b""\n'
        'i = 0\n'
        'while i + 8 <= len(data):\n'
        '    size = int.from_bytes(data[i + 4:i + 8], "big")\n'
        '    out += data[i + 8:i + 8 + size]  # every frame counted as stdout\n'
        '    i += 8 + size\n'
        'return out, b""',
        'stream, size = data[0], int.from_bytes(data[4:8], "big")  # the first frame only\n'
        'payload = data[8:8 + size]\n'
        'return (payload, b"") if stream == 1 else (b"", payload)',
    ],
}
