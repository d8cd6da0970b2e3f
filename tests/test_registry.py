"""labkit pull and push against Debian's docker-registry (distribution 2.8) on 127.0.0.1.

No outside registry is ever contacted: every name below starts with the local
registry's address. The registry runs for the module (``local_registry``), with its
storage in a temporary directory, and is stopped afterwards.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading

import pytest

from labkit.engine import archive, content, images, pull, push, reference
from labkit.errors import BadContent, InvalidValue, NotFound, RegistryError
from labkit.lab.registry import local_registry
from tests.conftest import need_tool
from tests.helpers_images import CuttingProxy, oci_layout, random_layer, sha, token_server
from tests.test_images import store  # noqa: F401 (fixture)
from tests.test_layer_safety import tar_of


@pytest.fixture(scope="module")
def registry():
    need_tool("docker-registry")
    with local_registry() as reg:
        yield reg
    assert not os.path.exists(f"/proc/{reg.pid}") or open(f"/proc/{reg.pid}/stat").read().split()[2] == "Z"
    assert not reg.root.exists()


def stored(store_root) -> dict[str, list[str]]:
    """What the image store holds: tags, layers, blobs."""
    base = store_root / "lib/images"
    repos = json.loads((base / "repositories.json").read_text()) if (base / "repositories.json").exists() else {}
    ls = lambda d: sorted(os.listdir(d)) if d.exists() else []  # noqa: E731
    return {"tags": sorted(repos), "layers": ls(base / "layers"), "blobs": ls(base / "blobs/sha256"),
            "staging": [n for n in ls(base) if n.startswith(".")]}  # fmt: skip


def three_layer_image(tmp, ref: str) -> images.Image:
    layers = [tar_of(("bin", "dir", ""), ("bin/a", "file", "a")), random_layer(300_000, "b"), random_layer(200_000, "c")]
    oci_layout(tmp / "layout", "v1", layers)
    (loaded,) = archive.load(tmp / "layout")
    return images.tag(loaded.id if loaded.ref else "x", ref) if loaded.ref else _tag_id(loaded.id, ref)


def _tag_id(image_id: str, ref: str) -> images.Image:
    return images.store_config(ref, (images._store() / "configs" / f"{image_id[7:]}.json").read_bytes())


def fresh_store(store_root, name: str):
    os.environ["LABKIT_ROOT"] = str(store_root / name)


# --- names --------------------------------------------------------------------------


def test_names_as_docker_reads_them():
    cases = {
        "busybox": ("docker.io", "library/busybox", "latest", ""),
        "busybox:1.36": ("docker.io", "library/busybox", "1.36", ""),
        "me/app": ("docker.io", "me/app", "latest", ""),
        "docker.io/library/busybox": ("docker.io", "library/busybox", "latest", ""),
        "index.docker.io/me/app:v2": ("docker.io", "me/app", "v2", ""),
        "localhost:5000/x:tag": ("localhost:5000", "x", "tag", ""),
        "localhost/x": ("localhost", "x", "latest", ""),
        "127.0.0.1:5000/team/app": ("127.0.0.1:5000", "team/app", "latest", ""),
        "ghcr.io/o/p:1": ("ghcr.io", "o/p", "1", ""),
        "busybox@sha256:" + "a" * 64: ("docker.io", "library/busybox", "", "sha256:" + "a" * 64),
    }
    for text, want in cases.items():
        r = reference.parse(text)
        assert (r.domain, r.path, r.tag, r.digest) == want, text
    assert reference.parse("docker.io/library/busybox").name == "busybox"
    assert reference.parse("localhost:5000/x:tag").name == "localhost:5000/x"
    for bad in ("", "Busybox", "a b", "x:", "x@sha256:12", "x@md5:" + "a" * 32, "local:host/x", "../x", "x//y"):
        with pytest.raises(InvalidValue, match="expected NAME"):
            reference.parse(bad)
    assert images.parse_ref("localhost:5000/x:tag") == ("localhost:5000/x", "tag")


# --- push and pull ----------------------------------------------------------------


def test_push_then_pull_into_a_clean_store_and_run_it(registry, store, monkeypatch):  # noqa: F811
    name = f"{registry.address}/course/busybox:v1"
    original = images.tag("busybox", name)
    pushed = push.push(name)
    assert pushed.uploaded > 1_000_000
    again = push.push(name)  # every blob is there already
    assert again.uploaded == 0 and again.digest == pushed.digest

    monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
    assert images.list_images() == []
    events: list[pull.LayerProgress] = []
    done = pull.pull(name, progress=events.append)
    assert done.digest == pushed.digest and done.updated
    assert done.image.id == original.id  # the same config bytes: the same image ID
    assert [e.status for e in events][-1] == "Pull complete"
    assert {"Downloading", "Verifying Checksum", "Extracting"} <= {e.status for e in events}
    assert images.list_images() == [done.image]
    assert not pull.pull(name).updated  # "Image is up to date"

    by_digest = pull.pull(f"{registry.address}/course/busybox@{pushed.digest}")
    assert by_digest.image.id == original.id and by_digest.image.tag == pushed.digest

    cli = [sys.executable, "-m", "labkit"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(cli + ["images"], capture_output=True, text=True, timeout=60, env=env)
    assert f"{registry.address}/course/busybox" in out.stdout and "<none>" in out.stdout
    out = subprocess.run(cli + ["run", "--rm", name, "sh", "-c", "echo pulled; echo $PATH"],
                         capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pulled", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def test_cli_pull_prints_like_docker(registry, store):  # noqa: F811
    name = f"{registry.address}/cli/bb:v1"
    images.tag("busybox", name)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cli = [sys.executable, "-m", "labkit"]
    out = subprocess.run(cli + ["push", name], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"The push refers to repository [{registry.address}/cli/bb]"
    env["LABKIT_ROOT"] = str(store / "clean")
    out = subprocess.run(cli + ["pull", name], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    layer = content.layer_blob(images.get(name).layers and json.loads(
        (images._store() / "configs" / f"{images.get(name).id[7:]}.json").read_text())["rootfs"]["diff_ids"][0]).digest
    assert lines[0] == "v1: Pulling from cli/bb"
    assert f"{layer[7:19]}: Pull complete" in lines  # one plain line per status when not a terminal
    assert lines[-3].startswith("Digest: sha256:") and lines[-2] == f"Status: Downloaded newer image for {name}"
    assert lines[-1] == name
    out = subprocess.run(cli + ["pull", f"{registry.address}/cli/none"], capture_output=True, text=True,
                         timeout=60, env=env)  # fmt: skip
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1 and "MANIFEST_UNKNOWN" in out.stderr


def test_layers_download_in_parallel(registry, store, monkeypatch):  # noqa: F811
    name = f"{registry.address}/par/three:v1"
    three_layer_image(store, name)
    push.push(name)
    monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
    threads: dict[str, set[str]] = {}
    lock = threading.Lock()

    def seen(p):
        with lock:
            threads.setdefault(p.id, set()).add(threading.current_thread().name)

    done = pull.pull(name, progress=seen)
    assert len(done.image.layers) == 3
    workers = set().union(*threads.values()) - {threading.main_thread().name}
    assert len(workers) >= 2, threads
    assert (done.image.layers[0] / "c").stat().st_size == 200_000


def test_pull_takes_this_platform_from_an_index(registry, store, monkeypatch):  # noqa: F811
    name = f"{registry.address}/multi/bb:v1"
    images.tag("busybox", name)
    pushed = push.push(name)
    arch = pull.platform()[1]
    other = {"architecture": "s390x", "os": "linux"}
    variant = json.loads(push.manifest_for(images.get(name))[0])
    variant["annotations"] = {"for": "s390x"}  # another manifest (the registry needs every one it indexes)
    variant_body = json.dumps(variant).encode()
    conn = http.client.HTTPConnection(registry.address, timeout=10)
    conn.request("PUT", "/v2/multi/bb/manifests/s390x", body=variant_body,
                 headers={"Content-Type": content.OCI_MANIFEST})  # fmt: skip
    assert conn.getresponse().read() is not None and conn.close() is None
    index = {"schemaVersion": 2, "mediaType": content.OCI_INDEX, "manifests": [
        {"mediaType": content.OCI_MANIFEST, "digest": sha(variant_body), "size": len(variant_body),
         "platform": {"architecture": "unknown", "os": "unknown"}},  # an attestation comes first
        {"mediaType": content.OCI_MANIFEST, "digest": sha(variant_body), "size": len(variant_body), "platform": other},
        {"mediaType": content.OCI_MANIFEST, "digest": pushed.digest, "size": pushed.size,
         "platform": {"architecture": arch, "os": "linux"}}]}  # fmt: skip
    body = json.dumps(index).encode()
    conn = http.client.HTTPConnection(registry.address, timeout=10)
    conn.request("PUT", "/v2/multi/bb/manifests/all", body=body, headers={"Content-Type": content.OCI_INDEX})
    assert conn.getresponse().status == 201
    conn.close()
    monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
    done = pull.pull(f"{registry.address}/multi/bb:all")
    assert done.digest == pushed.digest and done.image.config.cmd == ["sh"]
    monkeypatch.setattr(pull, "platform", lambda: ("linux", "riscv64"))
    with pytest.raises(NotFound, match="no image for linux/riscv64; it has linux/s390x, linux/" + arch):
        pull.pull(f"{registry.address}/multi/bb:all")


def test_a_corrupt_blob_is_refused_and_nothing_is_stored(registry, store, monkeypatch):  # noqa: F811
    name = f"{registry.address}/bad/bb:v1"
    three_layer_image(store, name)
    manifest, blobs, _ = push.manifest_for(images.get(name))
    push.push(name)
    victim = blobs[1].digest[7:]
    data = registry.root / "data/docker/registry/v2/blobs/sha256" / victim[:2] / victim / "data"
    good = data.read_bytes()
    data.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped, same size
    try:
        monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
        with pytest.raises(BadContent) as info:
            pull.pull(name)
        assert f"layer {victim[:12]}: expected sha256:{victim}" in info.value.one_line()
        assert stored(store / "clean") == {"tags": [], "layers": [], "blobs": [], "staging": []}
    finally:
        data.write_bytes(good)
    assert pull.pull(name).image.id == images.get(name).id


def test_a_cut_connection_is_resumed_with_range(registry, store, monkeypatch):  # noqa: F811
    name = f"{registry.address}/cut/big:v1"
    three_layer_image(store, name)
    push.push(name)
    host, port = registry.address.split(":")
    proxy = CuttingProxy((host, int(port)), cuts=2, after=100_000)
    try:
        monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
        events = []
        done = pull.pull(f"127.0.0.1:{proxy.port}/cut/big:v1", progress=events.append)
        assert any(r.startswith("bytes=") and r != "bytes=0-" for r in proxy.ranges), proxy.ranges
        assert any(e.status.startswith("Retrying") for e in events)
        assert len(done.image.layers) == 3
        # a registry that always cuts: bounded retries, then one line, and nothing stored
        proxy.cuts = 100
        monkeypatch.setenv("LABKIT_ROOT", str(store / "clean2"))
        monkeypatch.setattr(pull, "RETRIES", 2)
        with pytest.raises(RegistryError, match="download failed 3 times"):
            pull.pull(f"127.0.0.1:{proxy.port}/cut/big:v1")
        assert stored(store / "clean2") == {"tags": [], "layers": [], "blobs": [], "staging": []}
    finally:
        proxy.close()


def test_bearer_token_flow_against_docker_registry(store, monkeypatch):  # noqa: F811
    need_tool("docker-registry")
    need_tool("openssl")
    with token_server(store, service="labkit-test", issuer="labkit-token") as (auth, asked):
        with local_registry(auth=auth) as reg:
            conn = http.client.HTTPConnection(reg.address, timeout=10)
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            assert resp.status == 401 and resp.getheader("WWW-Authenticate").startswith("Bearer realm=")
            conn.close()
            name = f"{reg.address}/secure/bb:v1"
            images.tag("busybox", name)
            pushed = push.push(name)
            # the registry's challenge lists the actions in no fixed order: compare them as sets
            scopes = [(s.rsplit(":", 1)[0], set(s.rsplit(":", 1)[1].split(","))) for s in asked]
            assert ("repository:secure/bb", {"pull", "push"}) in scopes
            monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
            assert pull.pull(name).digest == pushed.digest
            assert "repository:secure/bb:pull" in asked
    with pytest.raises(RegistryError, match="without a Bearer realm|401"):
        from labkit.engine.registry import Client

        Client("127.0.0.1:1")._authenticate(__import__("labkit.engine.registry").engine.registry.Challenge("bearer"),
                                            "s", "/v2/")  # fmt: skip


def test_runc_runs_a_bundle_made_from_a_pulled_image(registry, store, monkeypatch):  # noqa: F811
    runc = need_tool("runc")
    name = f"{registry.address}/runc/bb:v1"
    images.tag("busybox", name)
    push.push(name)
    monkeypatch.setenv("LABKIT_ROOT", str(store / "clean"))
    image = pull.pull(name).image
    bundle = store / "bundle"
    bundle.mkdir()
    subprocess.run([runc, "spec", "--bundle", bundle], check=True, timeout=30)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(image.layers[0]), "readonly": True}  # one layer: the rootfs itself
    spec["process"].update(terminal=False, args=["sh", "-c", "echo from-runc; hostname"],
                           env=image.config.env)  # fmt: skip
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"labkit-pull-{os.getpid()}"
    try:
        out = subprocess.run([runc, "run", "--bundle", bundle, cid], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run([runc, "delete", "-f", cid], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["from-runc", "runc"]
    assert sha(b"") != image.id  # (the id is a real digest)
