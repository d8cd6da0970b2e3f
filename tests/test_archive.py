"""labkit load and save, checked both ways against Debian's skopeo, umoci and podman.

podman runs with a store of its own in a temporary directory (--root, --runroot,
vfs), so the machine's podman images are untouched, and that store is removed after.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

import pytest

from labkit.engine import archive, images, push
from labkit.errors import BadContent, InvalidValue
from labkit.lab.registry import local_registry
from tests.conftest import need_tool
from tests.helpers_images import oci_layout, random_layer, sha
from tests.test_images import store  # noqa: F401 (fixture)
from tests.test_layer_safety import tar_of
from tests.test_registry import stored

EMPTY = {"tags": [], "layers": [], "blobs": [], "staging": []}


def run(*cmd, timeout=120) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout


def busybox_id() -> str:
    return images.get("busybox").id


def test_save_and_load_round_trip_in_every_format(store, monkeypatch):  # noqa: F811
    original = busybox_id()
    for fmt, out in (("docker-archive", store / "bb.tar"), ("oci-dir", store / "bbdir")):
        archive.save(["busybox"], out, fmt=fmt)
        monkeypatch.setenv("LABKIT_ROOT", str(store / f"clean-{fmt}"))
        assert archive.load(out) == [archive.Loaded("busybox:latest", original)]
        assert images.get("busybox").id == original
        assert (images.get("busybox").layers[0] / "bin/busybox").exists()
    names = sorted(tarfile.open(store / "bb.tar").getnames())
    assert {"manifest.json", "index.json", "oci-layout", "repositories"} <= set(names)
    with pytest.raises(InvalidValue, match="docker-archive or oci-archive or oci-dir"):
        archive.save(["busybox"], store / "x", fmt="zip")
    with pytest.raises(InvalidValue, match="a new or empty directory"):
        archive.save(["busybox"], store / "bbdir", fmt="oci-dir")


def test_skopeo_reads_what_labkit_saves_and_labkit_reads_what_skopeo_writes(store, monkeypatch):  # noqa: F811
    skopeo = need_tool("skopeo")
    original = busybox_id()
    archive.save(["busybox"], store / "bb.tar")
    # docker-archive (labkit's) -> oci: (skopeo's) -> labkit
    run(skopeo, "copy", f"docker-archive:{store / 'bb.tar'}", f"oci:{store / 'sk-oci'}:latest")
    inspect = json.loads(run(skopeo, "inspect", "--config", f"oci:{store / 'sk-oci'}:latest"))
    assert inspect["config"]["Cmd"] == ["sh"] and sha(json.dumps(inspect).encode()) != original
    monkeypatch.setenv("LABKIT_ROOT", str(store / "a"))
    (loaded,) = archive.load(store / "sk-oci")
    assert loaded.ref == ""  # skopeo names only the tag: no repository
    # skopeo rewrites the config as it converts, and gzips the layer: the layer's DiffID stays
    config = json.loads((images._store() / "configs" / f"{loaded.id[7:]}.json").read_text())
    assert config["config"]["Cmd"] == ["sh"] and len(config["rootfs"]["diff_ids"]) == 1
    assert (images._layer_dir(config["rootfs"]["diff_ids"][0]) / "fs/bin/busybox").exists()
    # an OCI layout made here -> docker-archive (skopeo's, the older layout) -> labkit
    layers = [tar_of(("bin", "dir", ""), ("bin/x", "file", "x")), random_layer(50_000)]
    oci_layout(store / "mine", "v1", layers)
    run(skopeo, "copy", f"oci:{store / 'mine'}:v1", f"docker-archive:{store / 'sk.tar'}:mine/app:v1")
    monkeypatch.setenv("LABKIT_ROOT", str(store / "b"))
    (loaded,) = archive.load(store / "sk.tar")
    assert loaded.ref == "mine/app:v1" and len(images.get("mine/app:v1").layers) == 2
    assert (images.get("mine/app:v1").layers[1] / "bin/x").read_text() == "x"
    assert images.get("mine/app:v1").config.env == ["PATH=/bin", "GREETING=hi"]


def test_skopeo_and_labkit_through_the_local_registry(store, monkeypatch):  # noqa: F811
    skopeo = need_tool("skopeo")
    need_tool("docker-registry")
    from labkit.engine import pull

    with local_registry() as reg:
        images.tag("busybox", f"{reg.address}/lk/bb:v1")
        push.push(f"{reg.address}/lk/bb:v1")
        # labkit pushed, skopeo pulls
        run(skopeo, "copy", "--src-tls-verify=false", f"docker://{reg.address}/lk/bb:v1", f"oci:{store / 'o'}:v1")
        # skopeo pushes, labkit pulls
        oci_layout(store / "mine", "v1", [tar_of(("bin", "dir", ""), ("bin/y", "file", "y"))])
        run(skopeo, "copy", "--dest-tls-verify=false", f"oci:{store / 'mine'}:v1", f"docker://{reg.address}/sk/app:v1")
        monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
        done = pull.pull(f"{reg.address}/sk/app:v1")
        assert (done.image.layers[0] / "bin/y").read_text() == "y"
        # skopeo's docker:// push uses Docker v2 schema 2 media types: read them too
        run(skopeo, "copy", "--dest-tls-verify=false", "--format", "v2s2", f"oci:{store / 'mine'}:v1",
            f"docker://{reg.address}/sk/v2s2:v1")  # fmt: skip
        assert pull.pull(f"{reg.address}/sk/v2s2:v1").image.config.cmd == ["sh"]


def test_umoci_unpacks_what_labkit_saves(store):  # noqa: F811
    umoci = need_tool("umoci")
    busybox_id()
    archive.save(["busybox"], store / "layout", fmt="oci-dir")
    run(umoci, "unpack", "--image", f"{store / 'layout'}:latest", store / "bundle")
    assert (store / "bundle/rootfs/bin/busybox").exists()
    config = json.loads((store / "bundle/config.json").read_text())
    assert config["process"]["args"] == ["sh"]


@pytest.fixture
def podman(store):  # noqa: F811
    exe = need_tool("podman")
    root = tempfile.mkdtemp(prefix="labkit-podman-")
    base = [exe, "--root", f"{root}/root", "--runroot", f"{root}/run", "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "none"]  # fmt: skip
    yield base
    subprocess.run(base + ["rmi", "-a", "-f"], capture_output=True, timeout=120)
    with open("/proc/self/mountinfo") as f:
        assert root not in f.read()
    shutil.rmtree(root)


def test_podman_loads_what_labkit_saves_and_labkit_loads_what_podman_saves(store, podman, monkeypatch):  # noqa: F811
    original = busybox_id()
    archive.save(["busybox"], store / "bb.tar")
    out = run(*podman, "load", "-i", store / "bb.tar")
    assert "busybox:latest" in out
    assert original[7:19] in run(*podman, "images", "--no-trunc", "--format", "{{.ID}}")
    for fmt in ("docker-archive", "oci-archive"):
        run(*podman, "save", "--format", fmt, "-o", store / f"pod-{fmt}.tar", "docker.io/library/busybox:latest")
        monkeypatch.setenv("LABKIT_ROOT", str(store / f"clean-{fmt}"))
        loaded = archive.load(store / f"pod-{fmt}.tar")
        assert [x.id for x in loaded] == [original], fmt
        assert images.get(loaded[0].ref or "busybox").id == original if loaded[0].ref else True


# --- the older docker save layout, and hostile archives ---------------------------


def legacy_archive(path, layer_tars: list[bytes], tags=("old/app:v1",)) -> None:
    """`docker save` before 25: <id>/layer.tar, a repeated layer as a symlink to the first."""
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layer_tars]}}  # fmt: skip
    cfg = json.dumps(config).encode()
    with tarfile.open(path, "w") as tar:
        def add(name, data=b"", link=None):
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        paths = []
        for i, t in enumerate(layer_tars):
            paths.append(f"l{i}/layer.tar")
            if i and t == layer_tars[0]:
                add(f"l{i}/layer.tar", link="../l0/layer.tar")
            else:
                add(f"l{i}/layer.tar", t)
            add(f"l{i}/json", b"{}")
        add(f"{sha(cfg)[7:]}.json", cfg)
        add("manifest.json", json.dumps([{"Config": f"{sha(cfg)[7:]}.json", "RepoTags": list(tags),
                                          "Layers": paths}]).encode())  # fmt: skip


def test_the_older_docker_layout_loads(store):  # noqa: F811
    base = tar_of(("etc", "dir", ""), ("etc/os", "file", "old"))
    legacy_archive(store / "old.tar", [base, tar_of(("f", "file", "1")), base])
    (loaded,) = archive.load(store / "old.tar")
    img = images.get("old/app:v1")
    assert loaded.ref == "old/app:v1" and len(img.layers) == 3
    assert (img.layers[-1] / "etc/os").read_text() == "old"


def test_hostile_archives_are_refused_in_one_line_and_nothing_is_stored(store):  # noqa: F811
    cases = {}
    legacy_archive(store / "escape.tar", [tar_of(("etc", "sym", "/etc"), ("etc/passwd", "file", "owned"))])
    cases["escape.tar"] = "etc/passwd"
    bad = store / "badpath.tar"
    with tarfile.open(bad, "w") as tar:
        data = json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cases["badpath.tar"] = "../../etc/passwd"
    # a directory archive whose manifest.json reaches a file beside it: read, it would load
    (store / "outside.json").write_text(json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}))
    (store / "dirarchive").mkdir()
    (store / "dirarchive/manifest.json").write_text(json.dumps([{"Config": "../outside.json", "Layers": [],
                                                                 "RepoTags": ["out/side:v1"]}]))  # fmt: skip
    cases["dirarchive"] = "'../outside.json' leaves the archive"
    layout = store / "baddigest"
    oci_layout(layout, "v1", [tar_of(("f", "file", "1"))])
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    (layout / "index.json").write_text(json.dumps(index))
    cases["baddigest"] = "sha256:../../../etc/passwd"
    flipped = store / "flipped"
    oci_layout(flipped, "v1", [tar_of(("f", "file", "1")), random_layer(10_000)])
    blob = max((flipped / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    cases["flipped"] = blob.name
    wrong_diff = store / "wrongdiff"
    oci_layout(wrong_diff, "v1", [tar_of(("f", "file", "1"))], config_extra={"rootfs": {"type": "layers",
               "diff_ids": ["sha256:" + "1" * 64]}})  # fmt: skip
    cases["wrongdiff"] = "1" * 64
    for name, entry in cases.items():
        with pytest.raises((BadContent, InvalidValue)) as info:
            archive.load(store / name)
        line = info.value.one_line()
        assert "\n" not in line and entry in line, (name, line)
        assert stored(store) == EMPTY, name
    assert os.path.exists("/etc/passwd") and "owned" not in open("/etc/passwd").read()
