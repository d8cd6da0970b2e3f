"""Runs last (see conftest.py): after the whole suite, nothing labkit made is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from labkit import paths
from labkit.kernel import cgroups


def labkit_mounts() -> list[str]:
    roots = [str(r) for r in paths.roots()] + [os.environ["LABKIT_ROOT"]]
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if "labkit" in p or any(p.startswith(r) for r in roots)]


def test_no_mounts_left():
    assert labkit_mounts() == []


def test_no_cgroups_left():
    # Containers share one parent group, "containers", that stays from one container to
    # the next. Nothing else may be left; the parent must be empty, and it goes the way
    # `labkit cleanup` removes it.
    left = cgroups.list_all()
    assert [n for n in left if n != "containers"] == []
    if left:
        cgroups.open("containers").remove(timeout=1.0)
    assert cgroups.list_all() == []


def test_no_network_namespaces_or_links_left():
    # The tests' state root keeps its default network's bridge between containers, as
    # Docker keeps docker0. Nothing may be plugged into it any more; then it goes the way
    # a discarded state root's networks go (networks.discard), with the root's table.
    from labkit.engine import networks

    for n in networks.list_networks():
        ports = f"/sys/class/net/{n.bridge}/brif"
        if n.is_bridge and os.path.isdir(ports):
            assert os.listdir(ports) == [], f"{n.bridge} still has ports"
    networks.discard()
    # labkit's namespaces are bind mounts under the run root (test_no_mounts_left sees
    # those), each with a symlink in /run/netns for ip(8)
    for netns in (paths.IP_NETNS_DIR, paths.netns_dir()):
        names = os.listdir(netns) if netns.is_dir() else []
        assert [n for n in names if n.startswith(paths.NETNS_PREFIX)] == []
    # a removed container's veth goes with its namespace, in the kernel's cleanup work: a
    # few ms after the namespace, so a link still here is given a moment (at most 10 s)
    deadline = time.monotonic() + 10
    while [n for n in os.listdir("/sys/class/net") if n.startswith(paths.LINK_PREFIX)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [n for n in os.listdir("/sys/class/net") if n.startswith(paths.LINK_PREFIX)] == []


def test_no_nftables_table_left():
    """No table named labkit or labkit-* (labkit's own and the tests'), in any family."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(nft):
        pytest.skip("nft is not installed: no table can have been made")
    out = subprocess.run([nft, "-j", "list", "tables"], capture_output=True, text=True, timeout=30, check=True)
    names = [t["table"]["name"] for t in json.loads(out.stdout)["nftables"] if "table" in t]
    assert [n for n in names if n == paths.NFT_TABLE or n.startswith(paths.NFT_TABLE + "-")] == []


def test_no_loop_devices_left():
    roots = (os.environ["LABKIT_ROOT"], "/var/lib/labkit", "/run/labkit")
    backing = []
    for dev in Path("/sys/block").glob("loop*"):
        f = dev / "loop" / "backing_file"
        if f.exists() and f.read_text().strip().startswith(roots):
            backing.append(dev.name)
    assert backing == []


def test_no_processes_left():
    """No child of the test run is alive, no container shim, labkitd or labkitd worker of
    this run's state root remains, and no labkit VM outlived its launcher."""
    from labkit.lab.vm import stray_vms

    me = psutil.Process()
    alive = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    ours = os.environ["LABKIT_ROOT"]
    shims = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("labkit-shim", "labkitd", "labkit"):
            try:
                # its environment names our state root, or it holds a file below it
                # (labkitd and its workers keep labkitd.log open)
                if p.environ().get("LABKIT_ROOT") == ours or any(f.path.startswith(ours + "/")
                                                                 for f in p.open_files()):  # fmt: skip
                    shims.append(p.pid)
            except psutil.Error:
                pass
    assert shims == []
    assert stray_vms() == []
