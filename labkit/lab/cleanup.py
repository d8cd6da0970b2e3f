"""``labkit cleanup``: remove everything labkit made, and nothing else.

labkit names every kernel object it creates so that it can be found again after a crash
(see labkit/paths.py):

1. processes: labkitd (its socket lives in the run root, removed below; under systemd
   the service starts a fresh one), everything in a cgroup below a ``labkit`` parent,
   and qemu VMs named ``labkit-vm-*`` whose launching process has gone;
2. mounts: everything mounted below the state roots (/var/lib/labkit, /run/labkit);
3. links whose name starts with ``lk`` (and the default bridge ``labkit0``), network namespaces named ``labkit-*`` (bind
   mounts under the run root, symlinked from /run/netns, or bind mounts in /run/netns)
   and labkit's nftables tables (``labkit``, ``labkit-*``);
4. loop devices whose backing file lies below a state root;
5. cgroups below the ``labkit`` parents (the empty parents stay, as Docker's do);
6. live state: the run root (pid files, container state), which is stale once its
   processes are gone, and the containers' own directories (upper layers, logs).

Images stay, and so does the download cache (/var/cache/labkit). Running it twice is safe: the second run finds nothing.

Layer: lab. Uses the kernel layer (mounts, cgroups, safe), the engine's daemon (to stop
labkitd) and the lab's VM module (stray qemu processes); pyroute2 only when there are
links to remove, since it is slow to import.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

from labkit import paths
from labkit.engine import daemon
from labkit.errors import NotFound, require_root
from labkit.kernel import cgroups, mounts, safe
from labkit.lab.vm.strays import kill_stray_vms

LOOP_CLR_FD = 0x4C01


def _gone(err: Exception) -> bool:
    """A cgroup may vanish while we walk the tree: a container's shim removes its own
    group once the container has exited. That is not an error for cleanup."""
    return isinstance(err, NotFound) or getattr(err, "errno", None) in (errno.ENOENT, errno.ENODEV)


def _each_cgroup(action) -> list[str]:
    """Run ``action(cgroup)`` on every labkit cgroup, deepest first; collect its lines."""
    done = []
    for name in sorted(cgroups.list_all(), key=lambda n: n.count("/"), reverse=True):
        try:
            line = action(cgroups.open(name))
        except Exception as e:  # noqa: BLE001
            if not _gone(e):
                raise
        else:
            if line:
                done.append(line)
    return done


def _kill(cg) -> str | None:
    pids = cg.procs()
    if not pids:
        return None
    cg.kill()
    return f"killed {len(pids)} process(es) in cgroup {cg.name}"


def _remove(cg) -> str:
    cg.remove()
    return f"removed cgroup {cg.name}"


def _kill_vms() -> list[str]:
    """qemu processes named labkit-vm-<launcher pid>-... whose launcher is gone. A VM
    whose launcher still runs is in use (a test, a notebook cell) and stays."""
    return [f"killed VM process {pid}" for pid in kill_stray_vms()]


def _unmount_roots() -> list[str]:
    done = []
    for root in paths.roots():
        if root.exists():
            done += [f"unmounted {m}" for m in mounts.unmount_below(root)]
    return done


def _release_leases() -> list[str]:
    """Undo every network lease of this state root (engine/endpoints.py): its rules,
    veth and namespace, named in the lease that was written before any of them."""
    from labkit.engine import endpoints

    d = paths.endpoints_dir()
    leases = sorted(f.stem for f in d.glob("*.json")) if d.is_dir() else []
    return [f"released the network of container {cid[:12]}" for cid in leases if endpoints.release(cid)]


def _remove_network(netns_prefix: str = paths.NETNS_PREFIX, link_prefix: str = paths.LINK_PREFIX,
                    table_prefix: str = paths.NFT_TABLE) -> list[str]:
    """Host links named lk*, network namespaces named labkit-* (in /run/netns and under the
    run root) and labkit's nftables tables: see labkit/kernel/network. Tests narrow the
    prefixes to their own objects."""
    from labkit.kernel import network  # cheap: pyroute2 loads only if there is a link to delete

    done = network.remove_all(netns_prefix, link_prefix, table_prefix)
    bridge = paths.bridge_name()  # labkit0, the one name outside lk*, and only for the default root
    if link_prefix == paths.LINK_PREFIX and not bridge.startswith(link_prefix) and Path(f"/sys/class/net/{bridge}").exists():
        network.delete(bridge)
        done.append(f"removed link {bridge}")
    return done


def _detach_loops() -> list[str]:
    done = []
    roots = [str(r) + "/" for r in paths.roots()]
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if any(backing.startswith(r) for r in roots):
            fd = os.open(f"/dev/{dev.name}", os.O_RDONLY)
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD)
            finally:
                os.close(fd)
            done.append(f"detached /dev/{dev.name} ({backing})")
    return done


def _remove_containers() -> list[str]:
    """Container directories (their upper layers, logs, bundles): with the live state gone
    they belong to no container any more. Deleted without following a symlink or
    crossing a mount, so a bind mount of a host directory cannot lose a file."""
    top = paths.containers_dir()
    if not top.is_dir():
        return []
    done = []
    for entry in sorted(top.iterdir()):
        safe.remove_tree(entry, within=paths.lib_root())
        done.append(f"removed container {entry.name}")
    return done


def _stop_daemon() -> list[str]:
    if daemon.running_pid() is None:
        return []
    return [f"stopped labkitd (pid {daemon.stop()})"]


def _remove_run_state() -> list[str]:
    run = paths.run_root()
    if not run.exists() or not any(run.iterdir()):
        return []
    if mounts.mounts_below(run):  # never delete through a mount
        return [f"left {run}: still has mounts"]
    shutil.rmtree(run)
    return [f"removed live state {run}"]


def cleanup() -> list[str]:
    """Remove what labkit made; return one line per thing removed."""
    require_root("removing mounts, cgroups and namespaces")
    done = _stop_daemon() + _each_cgroup(_kill) + _kill_vms()
    if done:
        time.sleep(0.05)  # let the killed processes exit before unmounting their roots
    steps = (_unmount_roots, _release_leases, _remove_network, _detach_loops, lambda: _each_cgroup(_remove),
             _remove_run_state, _remove_containers)
    for step in steps:
        done += step()
    return done


def main() -> int:
    done = cleanup()
    for line in done:
        print(line)
    if not done:
        print("nothing to clean up")
    return 0
