"""A user namespace in an OCI bundle (linux.uidMappings), run by labkit's runtime next to
runc; and /etc/subuid's lines as labkit reads them for --userns=auto."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from bundles import bundle, edit_config, labkit

from labkit.engine import userns


def _with_a_user_namespace(first: int):
    def change(config: dict) -> None:
        m = [{"containerID": 0, "hostID": first, "size": userns.SLICE}]
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"].update(uidMappings=m, gidMappings=m)

    return change


def _first() -> int:
    return userns.subordinate()[0]


def test_a_missing_subordinate_range_names_the_file_and_the_line(tmp_path):
    empty = tmp_path / "subuid"
    empty.write_text("alice:100000:65536\n")
    with pytest.raises(Exception) as err:
        userns.subordinate(str(empty))
    assert str(empty) in str(err.value) and userns.SUGGESTED in str(err.value)
    empty.write_text("labkit:1000000:10\n")
    with pytest.raises(Exception, match="line 1"):
        userns.subordinate(str(empty))


def test_a_bundle_with_id_maps_runs_the_same_under_runc_and_labkit(request):
    first = _first() + 15 * userns.SLICE  # the last slice: auto hands out the first ones
    shared = Path(os.environ["LABKIT_ROOT"]) / f"userns-bundles-{os.getpid()}"
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    cmd = "id; cat /proc/self/uid_map /proc/self/gid_map; stat -c '%u %g' /bin/busybox; ls -ln /dev/null"
    out = {}
    for runtime in ("runc", "labkit"):
        d = shared / runtime  # (tmp_path is closed to other users: the container's root could not reach it)
        d.mkdir(parents=True)
        bundle(d, ["sh", "-c", cmd])
        edit_config(d, _with_a_user_namespace(first))
        userns.copy_shifted(d / "rootfs", d / "shifted", first)
        os.rename(d / "shifted", d / "rootfs-shifted")
        edit_config(d, lambda c: c["root"].update(path="rootfs-shifted"))
        if runtime == "runc":
            r = subprocess.run(["runc", "run", f"userns-{os.getpid()}"], cwd=d, capture_output=True, text=True, timeout=60)
        else:
            r = labkit("runtime", "run", "--bundle", str(d), f"userns-{os.getpid()}")
        assert r.returncode == 0, (runtime, r.stderr)
        out[runtime] = r.stdout
    assert out["labkit"] == out["runc"]
    assert out["labkit"].splitlines()[0].startswith("uid=0(root) gid=0")
    assert f"0 {first} {userns.SLICE}".split() == out["labkit"].splitlines()[1].split()
    # /dev/null in there is the host's (bound: a user namespace may not mknod), shown as nobody's
    assert out["labkit"].splitlines()[-1].split()[2:4] == ["65534", "65534"]
