"""The image store, the base images and the deletion that never leaves labkit's tree.

Everything runs on the real filesystem as root: the busybox image is chrooted into
and run, bind mounts and symlinks to host directories are really made, and the host
files are checked afterwards. The debian image comes from the cache in
/var/cache/labkit; only when that is absent does a test run debootstrap (about half a
minute, skipped when LABKIT_SKIP_SLOW=1).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from labkit.engine import images, layers, rootfs
from labkit.errors import InvalidValue, LabkitError, NotFound, StateError
from labkit.kernel import mounts, safe, syscalls

PY = sys.executable


@pytest.fixture
def store(tmp_dir, monkeypatch):
    """A fresh, empty LABKIT_ROOT for one test (the store lives under it)."""
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_dir))
    yield tmp_dir
    for point in safe.mounts_below(tmp_dir):  # a failed test must not leave a mount
        syscalls.umount2(point, syscalls.UmountFlags.MNT_DETACH)


@pytest.fixture
def host_dir():
    """A directory playing 'the host's files': outside every labkit root."""
    d = Path(tempfile.mkdtemp(prefix="labkit-host-"))
    (d / "precious").write_text("keep me\n")
    (d / "sub").mkdir()
    (d / "sub" / "also").write_text("keep me too\n")
    yield d
    for point in safe.mounts_below(d):
        syscalls.umount2(point, syscalls.UmountFlags.MNT_DETACH)
    subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=True)


def host_intact(d: Path) -> bool:
    return (d / "precious").read_text() == "keep me\n" and (d / "sub" / "also").read_text() == "keep me too\n"


def in_chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    def enter() -> None:
        os.chroot(root)
        os.chdir("/")

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(
        cmd, preexec_fn=enter, env=env, capture_output=True, text=True, timeout=30, check=False
    )


# --- busybox ---------------------------------------------------------------------


def test_busybox_builds_offline_in_under_a_second(store):
    # Build it in a fresh network namespace: only a loopback that is down, so any
    # download would fail. The build must not need one.
    started = time.monotonic()
    code = "from labkit.engine import images; print(images.get('busybox').id)"
    out = subprocess.run(
        ["unshare", "--net", PY, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sha256:") and len(out.stdout.strip()) == 71
    assert elapsed < 1.5, f"busybox took {elapsed:.2f}s including Python's start-up"
    img = images.get("busybox")
    assert img.id == out.stdout.strip()  # the image the offline process stored


def test_busybox_has_sh_every_applet_and_etc(store):
    img = images.get("busybox")
    assert (img.name, img.tag, img.ref) == ("busybox", "latest", "busybox:latest")
    assert len(img.layers) == 1
    root = img.layers[0]
    binary = os.stat(root / "bin/busybox")
    assert rootfs.is_static(root / "bin/busybox") and not rootfs.is_static(Path("/bin/ls"))
    listing = subprocess.run(
        ["/bin/busybox", "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    applets = [a for a in listing.split() if a != "bin/busybox"]
    assert len(applets) > 100 and "bin/sh" in applets
    for applet in applets:  # each one is the same inode: a hard link
        assert os.lstat(root / applet).st_ino == binary.st_ino, applet
    assert (root / "etc/passwd").read_text().splitlines()[0] == "root:x:0:0:root:/root:/bin/sh"
    assert "nobody:x:65534:65534" in (root / "etc/passwd").read_text()
    assert (root / "etc/group").read_text().startswith("root:x:0:")
    assert (root / "etc/resolv.conf").read_text() == ""
    assert "localhost" in (root / "etc/hosts").read_text()
    for d in ("proc", "sys", "dev", "tmp", "root", "home", "var", "run", "mnt"):
        assert (root / d).is_dir() and not any((root / d).iterdir()), d
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    assert img.config == images.ImageConfig(
        env=[rootfs.PATH_ENV], cmd=["sh"], entrypoint=[], working_dir="/", user=""
    )
    assert 1_500_000 < img.size_bytes < 4_000_000  # one binary, links counted once


def test_busybox_runs_in_a_chroot(store):
    root = images.get("busybox").layers[0]
    out = in_chroot(root, "/bin/sh", "-c", "echo ok; ls /bin | wc -l; id -un")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "ok" and int(lines[1]) > 50 and lines[2] == "root"


def test_build_is_idempotent_and_reproducible(store):
    first = images.get("busybox")
    again = images.build_base("busybox:latest")
    assert again == first
    # The layer tar is the same byte for byte, so a rebuild finds the same DiffID.
    assert rootfs.busybox_tar() == rootfs.busybox_tar()
    assert len(list((store / "lib/images/layers").iterdir())) == 1


# --- names and the listing ---------------------------------------------------------


def test_name_resolution():
    assert images.parse_ref("busybox") == ("busybox", "latest")
    assert images.parse_ref("busybox:latest") == ("busybox", "latest")
    assert images.parse_ref("debian") == ("debian", "bookworm")
    assert images.parse_ref("debian:bookworm") == ("debian", "bookworm")
    assert images.parse_ref("me/app") == ("me/app", "latest")
    for bad in ("", "BusyBox", "busy box", "a::b", "busybox:", "x:bad/tag", "../etc"):
        with pytest.raises(InvalidValue, match="expected NAME"):
            images.parse_ref(bad)


def test_an_image_is_found_by_its_id_or_a_prefix_of_it(store):
    img = images.get("busybox")
    assert images.get(img.id).id == img.id  # sha256:<64 hex>, as the Engine API's clients send it
    assert images.get(img.short_id).id == img.id  # the 12 digits `labkit images` shows
    with pytest.raises(NotFound):
        images.get("0123456789ab")  # hex, but no image's


def test_unknown_image_is_one_clear_line(store):
    with pytest.raises(NotFound) as info:
        images.get("nosuch")
    msg = info.value.one_line()
    assert msg == "no such image 'nosuch'; labkit images lists them, 'busybox' and 'debian' are built in"
    assert not (store / "lib/images/layers").exists() or not any((store / "lib/images/layers").iterdir())
    with pytest.raises(NotFound):
        images.get("busybox:1.36")  # a built-in name with a tag labkit does not make


def test_listing_shows_size_and_age(store):
    img = images.get("busybox")
    assert images.list_images() == [img]
    table = images.format_table(images.list_images(), now=img.created + 180)
    header, row = table.splitlines()
    assert header.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert row.split()[:3] == ["busybox", "latest", img.short_id]
    assert "3 minutes ago" in row and row.endswith(images.human_size(img.size_bytes))
    assert len(img.short_id) == 12 and header.index("IMAGE ID") == row.index(img.short_id)


def test_human_size_and_age():
    assert images.human_size(0) == "0B"
    assert images.human_size(999) == "999B"
    assert images.human_size(2_100_000) == "2.1MB"
    assert images.human_size(2_144_000) == "2.14MB"
    assert images.human_size(125_400_000) == "125MB"
    assert images.human_size(3_000_000_000) == "3GB"
    assert images.human_age(0.2) == "Less than a second"
    assert images.human_age(1.2) == "1 second" and images.human_age(42) == "42 seconds"
    assert images.human_age(90) == "About a minute"
    assert images.human_age(180) == "3 minutes"
    assert images.human_age(5 * 3600) == "5 hours"
    assert images.human_age(3 * 86400) == "3 days"
    assert images.human_age(400 * 86400) == "13 months"
    assert images.human_age(3 * 365 * 86400) == "3 years"


def test_remove_deletes_layers_and_refuses_while_mounted(store):
    from labkit.kernel import overlay

    img = images.get("busybox")
    upper, work, merged = store / "upper", store / "work", store / "merged"
    with overlay.mount(img.layers, upper, work, merged):  # a container's rootfs
        with pytest.raises(StateError, match="in use"):
            images.remove("busybox")
        assert img.layers[0].joinpath("bin/busybox").exists()
    images.remove("busybox")
    assert not img.layers[0].parent.exists()
    assert images.list_images() == []
    with pytest.raises(NotFound):
        images.remove("busybox")
    safe.remove_tree(store / "upper", within=store)
    safe.remove_tree(store / "work", within=store)
    merged.rmdir()


def test_remove_refuses_while_a_container_runs_on_the_image(store):
    # the runtime mounts the overlay in the container's own mount namespace: the host's
    # mount table does not show it, the container's spec does
    from labkit.runtime import container, state
    from labkit.runtime.spec import Spec

    img = images.get("busybox")
    cid = "rmi-busy"
    lib = state.data_dir(cid)
    spec = Spec.docker(["sleep", "30"], rootfs=str(store / "merged"), layers=tuple(map(str, img.layers)),
                       upper=str(lib / "upper"), work=str(lib / "work"))  # fmt: skip
    container.create(cid, spec)
    try:
        container.start(cid)
        with pytest.raises(StateError, match="in use"):
            images.remove("busybox")
        assert img.layers[0].joinpath("bin/busybox").exists()
    finally:
        container.delete(cid, force=True)
    images.remove("busybox")
    assert images.list_images() == []


# --- debian ------------------------------------------------------------------------


_DEBIAN_CACHE = rootfs.cache_dir() / f"debian-{rootfs.DEBIAN_SUITE}-minbase.tar"


@pytest.mark.skipif(
    not _DEBIAN_CACHE.exists() and os.environ.get("LABKIT_SKIP_SLOW") == "1",
    reason="debootstrap takes about half a minute and LABKIT_SKIP_SLOW=1",
)
def test_debian_from_the_cache(store):
    lines: list[str] = []
    img = images.get("debian", progress=lines.append)  # debootstraps only if the cache is absent
    assert _DEBIAN_CACHE.exists()
    if lines and lines[0].startswith("[1/"):  # it was built now: the steps were shown
        assert any(line.startswith("[3/") and "downloading" in line for line in lines)
    assert img.ref == "debian:bookworm" and images.get("debian:bookworm") == img
    root = img.layers[0]
    assert (root / "etc/debian_version").read_text().startswith("12.")
    assert (root / "etc/resolv.conf").read_text() == ""  # not the build machine's resolver
    assert not any((root / "var/cache/apt/archives").glob("*.deb"))
    assert not any((root / "dev").iterdir())
    out = in_chroot(root, "/bin/bash", "-c", "echo ok; dpkg-query -W -f '${Package}\\n' | wc -l")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "ok" and int(out.stdout.split()[1]) > 50
    assert img.config.cmd == ["bash"] and 50_000_000 < img.size_bytes < 400_000_000
    images.remove("debian")


FAKE_DEBOOTSTRAP = """#!/bin/sh
for line in "Retrieving InRelease" "Validating Packages" "Resolving dependencies of required packages..." \
    "Retrieving libc6 2.36" "Validating libc6 2.36" "Extracting libc6..." "Installing core packages..." \
    "Unpacking required packages..." "Configuring required packages..." "Unpacking the base system..."; do
  echo "I: $line"
done
echo "W: a warning worth showing"
exit ${FAKE_EXIT:-0}
"""


@pytest.mark.parametrize("exit_code", [0, 1])
def test_debootstrap_progress_is_one_line_per_stage(tmp_dir, monkeypatch, exit_code):
    # debootstrap's own output format, replayed by a stand-in script: the stages are
    # summarised as "[i/n] stage" lines, never going backwards; a failure is one line.
    fake = tmp_dir / "debootstrap"
    fake.write_text(FAKE_DEBOOTSTRAP)
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_EXIT", str(exit_code))
    lines: list[str] = []
    if exit_code:
        with pytest.raises(LabkitError) as info:
            rootfs._debootstrap(str(fake), "bookworm", tmp_dir / "tree", lines.append)
        assert "exit code 1" in str(info.value) and "\n" not in info.value.one_line()
    else:
        rootfs._debootstrap(str(fake), "bookworm", tmp_dir / "tree", lines.append)
    stages = [line.split("]")[0] + "]" for line in lines if line.startswith("[")]
    assert stages == ["[1/7]", "[2/7]", "[3/7]", "[4/7]", "[5/7]", "[6/7]"]
    assert "downloading packages" in lines[2] and "configuring" in lines[5]
    assert lines[-1].strip() == "debootstrap W: a warning worth showing"


# --- layers: unpacking a tar never writes outside the layer -----------------------


def make_tar(*members: tuple[str, str, str]) -> bytes:
    """(name, kind, data-or-link) -> a tar in memory. kind: file dir sym link chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                         "link": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE}[kind]  # fmt: skip
            data = extra.encode() if kind == "file" else b""
            if kind in ("sym", "link"):
                info.linkname = extra
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_unpack_refuses_writing_through_a_symlink(tmp_dir, host_dir):
    evil = make_tar(("etc", "sym", str(host_dir)), ("etc/precious", "file", "owned\n"))
    with pytest.raises(InvalidValue, match="etc/precious"):
        layers.unpack(io.BytesIO(evil), tmp_dir)
    assert host_intact(host_dir)
    assert os.readlink(tmp_dir / "etc") == str(host_dir)  # the link itself is fine to keep


def test_unpack_refuses_dotdot_and_roots_absolute_names(tmp_dir, host_dir):
    with pytest.raises(InvalidValue, match=r"\.\."):
        layers.unpack(io.BytesIO(make_tar(("../escaped", "file", "x"))), tmp_dir)
    assert not (tmp_dir.parent / "escaped").exists()
    layers.unpack(io.BytesIO(make_tar(("/abs/file", "file", "x"))), tmp_dir)
    assert (tmp_dir / "abs/file").read_text() == "x"


def test_unpack_hard_link_to_a_symlink_links_the_symlink(tmp_dir, host_dir):
    tar = make_tar(("out", "sym", str(host_dir / "precious")), ("alias", "link", "out"))
    layers.unpack(io.BytesIO(tar), tmp_dir)
    assert (
        os.path.islink(tmp_dir / "alias")
        and os.lstat(tmp_dir / "alias").st_ino == os.lstat(tmp_dir / "out").st_ino
    )
    assert host_intact(host_dir) and os.stat(host_dir / "precious").st_nlink == 1


def test_unpack_whiteouts_become_overlay_whiteouts(tmp_dir):
    tar = make_tar(("d", "dir", ""), ("d/.wh..wh..opq", "file", ""), (".wh.gone", "file", ""),
                   ("null", "chr", ""), ("f", "file", "hello"))  # fmt: skip
    result = layers.unpack(io.BytesIO(tar), tmp_dir)
    gone = os.lstat(tmp_dir / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert os.getxattr(tmp_dir / "d", "trusted.overlay.opaque") == b"y"
    assert not (tmp_dir / "null").exists() and result.skipped == ("null",)
    assert result.diff_id == "sha256:" + __import__("hashlib").sha256(tar).hexdigest()
    assert result.size_bytes == 5


# --- safe.remove_tree: never leaves the tree ---------------------------------------


def rootfs_with_traps(base: Path, host: Path) -> Path:
    tree = base / "containers" / "c1" / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("c1\n")
    (tree / "hostlink").symlink_to(host)  # an absolute symlink to "the host"
    (tree / "etc" / "relative").symlink_to("../../../../..")
    return tree


def test_remove_tree_deletes_symlinks_not_their_targets(tmp_dir, host_dir):
    tree = rootfs_with_traps(tmp_dir, host_dir)
    assert safe.remove_tree(tree.parent, within=tmp_dir) == 6
    assert not tree.parent.exists() and host_intact(host_dir)


def test_remove_tree_on_a_symlink_removes_only_the_link(tmp_dir, host_dir):
    link = tmp_dir / "link"
    link.symlink_to(host_dir)
    assert safe.remove_tree(link, within=tmp_dir) == 1
    assert not os.path.lexists(link) and host_intact(host_dir)


def test_remove_tree_refuses_a_mount_and_deletes_nothing(tmp_dir, host_dir):
    tree = rootfs_with_traps(tmp_dir, host_dir)
    (tree / "data").mkdir()
    mounts.bind(host_dir, tree / "data")
    try:
        with pytest.raises(StateError, match=f"{tree / 'data'} is mounted inside it"):
            safe.remove_tree(tree.parent, within=tmp_dir)
        assert (tree / "etc/hostname").exists() and (tree / "data/precious").exists()
    finally:
        syscalls.umount2(tree / "data")
    assert host_intact(host_dir)
    safe.remove_tree(tree.parent, within=tmp_dir)
    assert host_intact(host_dir)


def test_mounts_below_matches_whole_path_components(tmp_dir, host_dir):
    # "ab" shares a prefix with "a" but lies outside it: only the mount point's own
    # directory and its parents may report it
    for d in ("a", "ab", "a/b"):
        (tmp_dir / d).mkdir()
    mounts.bind(host_dir, tmp_dir / "ab")
    try:
        assert safe.mounts_below(tmp_dir / "a") == []
        assert safe.mounts_below(tmp_dir / "ab") == [tmp_dir / "ab"]
        assert safe.mounts_below(f"{tmp_dir}/./") == [tmp_dir / "ab"]
        safe.remove_tree(tmp_dir / "a", within=tmp_dir)  # not refused: nothing is mounted inside
    finally:
        syscalls.umount2(tmp_dir / "ab")
    assert host_intact(host_dir) and not (tmp_dir / "a").exists()


def test_remove_tree_stays_inside_within(tmp_dir, host_dir):
    for outside in (host_dir, tmp_dir / ".." / ".." / host_dir.name, tmp_dir, Path("/")):
        with pytest.raises(InvalidValue, match="a path inside"):
            safe.remove_tree(outside, within=tmp_dir)
    (tmp_dir / "hop").symlink_to(host_dir)  # a symlink on the way out of the tree
    with pytest.raises(InvalidValue):
        safe.remove_tree(tmp_dir / "hop" / "sub", within=tmp_dir)
    with pytest.raises(InvalidValue, match="absolute"):
        safe.remove_tree("relative/path", within=tmp_dir)
    assert host_intact(host_dir)
    assert safe.remove_tree(tmp_dir / "never-was", within=tmp_dir) == 0


def test_a_silent_debootstrap_is_stopped_by_the_timeout(tmp_dir, monkeypatch):
    """A hung download prints nothing: the watchdog must still stop it, children included."""
    from labkit.engine import rootfs
    from labkit.errors import LabkitError

    fake = tmp_dir / "debootstrap"
    fake.write_text("#!/bin/sh\nsleep 30 &\nwait\n")  # a child that holds the output pipe open
    fake.chmod(0o755)
    monkeypatch.setattr(rootfs, "DEBOOTSTRAP_TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(LabkitError, match="took more than 0.5s"):
        rootfs._debootstrap(str(fake), "bookworm", tmp_dir / "tree", lambda line: None)
    assert time.monotonic() - started < 5
