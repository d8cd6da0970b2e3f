"""Shared fixtures. Tests run on the real kernel, as root.

Every test session gets its own state root (LABKIT_ROOT) in a temp folder whose name
starts with 'labkit-', so anything it mounts is both easy to find and easy to remove.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="labkit-test-"))
_SESSION_ROOT.chmod(0o711)  # as /var/lib is: a --userns=auto container's root must pass through
os.environ.setdefault("LABKIT_ROOT", str(_SESSION_ROOT))
_TESTS_ROOT = os.environ["LABKIT_ROOT"]  # the state root the tests share
REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    # The leftover check must see the whole suite finished: run it last.
    last = [i for i in items if i.nodeid.startswith("tests/test_zz_leftovers.py")]
    rest = [i for i in items if i not in last]
    items[:] = rest + last


def remove_unless_mounted(path: Path) -> bool:
    """Remove the tree ``path`` unless something is mounted at or below it (rmtree would
    follow the mount into another filesystem); whether it was removed."""
    if not path.exists():
        return False
    with open("/proc/self/mountinfo") as f:
        busy = any(f" {path} " in line or f" {path}/" in line for line in f)
    if not busy:
        shutil.rmtree(path, ignore_errors=True)
    return not busy


def pytest_sessionfinish(session, exitstatus):
    # The state root's default bridge and nftables table go with it: the leftover test
    # discards them at the end of the whole suite, but a run of a few tests (-k, one
    # file) never reaches it
    if os.environ.get("LABKIT_ROOT") == str(_SESSION_ROOT) and _bridges_and_tables():
        from labkit.engine import networks

        try:
            networks.discard()
        except Exception as err:  # noqa: BLE001 - the session's result stands; say what is left
            print(f"\nlabkit: the tests' networks could not be removed: {err}")
    remove_unless_mounted(_SESSION_ROOT)


@pytest.fixture(autouse=True, scope="session")
def _as_root():
    if os.geteuid() != 0:
        pytest.exit("labkit's tests run on the real kernel and need root: sudo make test", 2)


def need_tool(name: str) -> str:
    """The path of a program the test needs, or skip with the reason.

    Under CI (CI=true) a missing tool fails instead: CI's machine is provisioned by
    `vagrant/provision.sh --dev`, so a tool missing there is a hole in the provisioning,
    which a skip would hide (a machine that had the tool installed by hand passes, the
    next new one does not)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if not path:
        why = f"{name} is not installed (vagrant/provision.sh --dev installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; under CI every test tool must be there")
        pytest.skip(why)
    return path


@pytest.fixture
def tmp_dir():
    """A fresh directory under the session's state root (cleaned by the test that uses it)."""
    d = Path(tempfile.mkdtemp(prefix="t-", dir=_SESSION_ROOT))
    yield d
    remove_unless_mounted(d)


def _bridges_and_tables() -> set[str]:
    """Names of the bridges and labkit's per-root nftables tables on the machine now."""
    from labkit import paths

    found = {f"link {n}" for n in os.listdir("/sys/class/net")
             if n.startswith(paths.LINK_PREFIX) and os.path.isdir(f"/sys/class/net/{n}/bridge")}
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    found |= {f"table {line.split()[-1]}" for line in r.stdout.splitlines()
              if line.split()[-1].startswith(f"{paths.NFT_TABLE}-r")}
    return found


def _session_networks() -> set[str]:
    """The bridges and the table of the session's own state root, which stay until the end."""
    from labkit import paths
    from labkit.engine import networks

    saved = os.environ.get("LABKIT_ROOT")
    os.environ["LABKIT_ROOT"] = _TESTS_ROOT
    try:
        return {f"link {n.bridge}" for n in networks.list_networks() if n.is_bridge} | {f"table {paths.nft_table()}"}
    finally:
        if saved is None:
            del os.environ["LABKIT_ROOT"]
        else:
            os.environ["LABKIT_ROOT"] = saved


@pytest.fixture(autouse=True)
def _private_roots_take_their_networks():
    """A test that ran containers in a state root of its own (LABKIT_ROOT set for it) leaves
    that root's default bridge and nftables table, as Docker leaves docker0 between
    containers. The root is gone after the test, so its bridge and table go too, here.
    Only bridges and tables: a veth left behind is a leak, and the leftover test finds it."""
    before = _bridges_and_tables()
    yield
    new = _bridges_and_tables() - before - _session_networks()
    for item in sorted(new):
        kind, name = item.split(" ", 1)
        cmd = ["ip", "link", "delete", name] if kind == "link" else ["nft", "delete", "table", "ip", name]
        subprocess.run(cmd, capture_output=True, check=False)
