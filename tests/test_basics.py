"""The package as a whole: cheap to import, one-line errors, doctor, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

from labkit.lab import cleanup, doctor

HEAVY = ["matplotlib", "pyroute2", "ipywidgets", "numpy"]


def labkit_cmd(*args, user=None, **kw):
    cmd = [sys.executable, "-m", "labkit", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}",
               "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def as_nobody():
    """The environment for running labkit as the user nobody, with a copy of the package
    that nobody can read: the checkout may sit where only root can enter (/root/labkit)."""
    with tempfile.TemporaryDirectory(prefix="labkit-pkg-") as d:
        shutil.copytree(REPO / "labkit", Path(d, "labkit"), ignore=shutil.ignore_patterns("__pycache__"))
        for path in [Path(d), *Path(d).rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield {**os.environ, "PYTHONPATH": d, "PYTHONDONTWRITEBYTECODE": "1"}


def test_import_is_cheap():
    code = (
        "import sys, json; import labkit, labkit.cli, labkit.kernel.namespaces, labkit.kernel.overlay, "
        "labkit.kernel.mounts, labkit.kernel.cgroups, labkit.errors, labkit.paths; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("command", [["cleanup"], ["run", "busybox", "true"]])
def test_cli_as_non_root_prints_one_line(command, as_nobody):
    r = labkit_cmd(*command, user="nobody", cwd="/", env=as_nobody)
    assert r.returncode == 1
    assert r.stderr.startswith("labkit: needs root: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_command():
    r = labkit_cmd("frobnicate")
    assert r.returncode == 2 and r.stderr.strip() == "labkit: unknown command 'frobnicate'; 'labkit --help' lists them"


def test_doctor_passes_here():
    results = doctor.run_checks()
    failed = [c for c in results if c.status == "fail"]
    assert not failed, doctor.format_report(results)
    assert {c.name for c in results} >= {"root", "kernel", "python", "cgroups", "overlayfs", "user namespaces",
                                          "pyroute2", "busybox", "runc", "qemu", "kvm"}


def test_doctor_cli_exit_code():
    r = labkit_cmd("doctor")
    assert r.returncode == 0, r.stdout
    assert "ready: everything required is here" in r.stdout


def test_doctor_as_non_root_fails_the_root_line(as_nobody):
    r = labkit_cmd("doctor", user="nobody", cwd="/", env=as_nobody)
    assert r.returncode == 1
    assert "FAIL  root" in r.stdout and "Traceback" not in r.stderr


def test_cleanup_removes_labkit_mounts_and_is_safe_twice(tmp_dir):
    from labkit import paths
    from labkit.kernel import mounts, syscalls

    target = paths.run_root() / "mnt" / "demo"
    target.mkdir(parents=True)
    syscalls.mount("tmpfs", target, "tmpfs", 0)
    outside = tmp_dir / "not-labkit"  # a mount and a file that are not below a state root
    outside.mkdir()
    syscalls.mount("tmpfs", outside, "tmpfs", 0)
    (outside / "keep").write_text("mine")
    try:
        first = cleanup.cleanup()
        assert f"unmounted {target}" in first
        assert not mounts.is_mountpoint(target)
        assert not paths.run_root().exists()
        assert cleanup.cleanup() == []
        assert mounts.is_mountpoint(outside) and (outside / "keep").read_text() == "mine"  # left alone
    finally:
        if mounts.is_mountpoint(outside):
            mounts.unmount(outside, lazy=True)


def test_the_session_root_is_removed_only_when_nothing_is_mounted_in_it(tmp_dir):
    from conftest import remove_unless_mounted

    from labkit.kernel import mounts, syscalls

    busy, idle = tmp_dir / "busy", tmp_dir / "idle"
    (busy / "mnt").mkdir(parents=True)
    (idle / "sub").mkdir(parents=True)
    syscalls.mount("tmpfs", busy / "mnt", "tmpfs", 0)
    (busy / "mnt" / "theirs").write_text("on another filesystem")
    try:
        assert remove_unless_mounted(busy) is False
        assert (busy / "mnt" / "theirs").read_text() == "on another filesystem"  # rmtree never ran
    finally:
        mounts.unmount(busy / "mnt", lazy=True)
    assert remove_unless_mounted(idle) is True and not idle.exists()
    assert remove_unless_mounted(idle) is False  # already gone
