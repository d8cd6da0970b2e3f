"""overlayfs on the real kernel: fall-through reads, copy-up, whiteouts, opaque dirs."""

from __future__ import annotations

import hashlib
import os

import pytest

from labkit.errors import InvalidValue, SyscallError
from labkit.kernel import mounts, overlay


def tree_digest(root) -> str:
    """A hash of every path, mode and content below root: proves a layer is untouched."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)} {st.st_mode} {st.st_size}".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture
def layers(tmp_dir):
    """Two lower layers like an image's: base (bottom) and app (top)."""
    base, app = tmp_dir / "base", tmp_dir / "app"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "motd").write_text("base motd\n")
    (base / "etc" / "hostname").write_text("base\n")
    (base / "data").mkdir()
    (base / "data" / "a.txt").write_text("a\n")
    (base / "data" / "b.txt").write_text("b\n")
    (app / "etc").mkdir(parents=True)
    (app / "etc" / "motd").write_text("app motd\n")  # hides base's
    digests = (tree_digest(base), tree_digest(app))
    yield tmp_dir, [app, base], digests  # top first, as lowerdir wants
    assert (tree_digest(base), tree_digest(app)) == digests, "a lower layer was modified"


def test_reads_fall_through_and_the_top_layer_wins(layers):
    tmp, lowers, _ = layers
    with overlay.mount(lowers, tmp / "upper", tmp / "work", tmp / "merged") as merged:
        assert (merged / "etc" / "motd").read_text() == "app motd\n"
        assert (merged / "etc" / "hostname").read_text() == "base\n"
        assert mounts.is_mountpoint(merged)
    assert not mounts.is_mountpoint(tmp / "merged")
    assert overlay.inspect(tmp / "upper", lowers) == []


def test_a_write_copies_up_and_a_new_file_is_new(layers):
    tmp, lowers, _ = layers
    with overlay.mount(lowers, tmp / "upper", tmp / "work", tmp / "merged") as merged:
        with open(merged / "etc" / "hostname", "a") as f:
            f.write("changed\n")
        (merged / "etc" / "new.conf").write_text("new\n")
    assert (tmp / "upper" / "etc" / "hostname").read_text() == "base\nchanged\n"
    changes = {c.path: c.kind for c in overlay.inspect(tmp / "upper", lowers)}
    assert changes == {"/etc/hostname": "copied_up", "/etc/new.conf": "new"}


def test_a_delete_leaves_a_whiteout(layers):
    tmp, lowers, _ = layers
    with overlay.mount(lowers, tmp / "upper", tmp / "work", tmp / "merged") as merged:
        (merged / "data" / "a.txt").unlink()
        assert sorted(os.listdir(merged / "data")) == ["b.txt"]
    assert overlay.is_whiteout(tmp / "upper" / "data" / "a.txt")
    st = os.lstat(tmp / "upper" / "data" / "a.txt")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)
    assert overlay.Change("/data/a.txt", "whiteout") in overlay.inspect(tmp / "upper", lowers)


def test_rmdir_then_mkdir_makes_an_opaque_directory(layers):
    tmp, lowers, _ = layers
    with overlay.mount(lowers, tmp / "upper", tmp / "work", tmp / "merged") as merged:
        for name in os.listdir(merged / "data"):
            (merged / "data" / name).unlink()
        (merged / "data").rmdir()
        (merged / "data").mkdir()
        assert os.listdir(merged / "data") == []  # the lower files stay hidden
    assert overlay.is_opaque(tmp / "upper" / "data")
    assert overlay.Change("/data", "opaque") in overlay.inspect(tmp / "upper", lowers)


def test_read_only_overlay_without_upper(layers):
    tmp, lowers, _ = layers
    (tmp / "ro").mkdir()
    with overlay.mount(lowers, None, None, tmp / "ro") as merged:
        with pytest.raises(OSError) as e:
            (merged / "x").write_text("no")
        assert e.value.errno == 30  # EROFS


def test_options_order_is_top_layer_first(layers):
    tmp, lowers, _ = layers
    opts = overlay.options(lowers, tmp / "u", tmp / "w")
    assert opts.startswith(f"lowerdir={lowers[0]}:{lowers[1]},upperdir=")


def test_bad_layers_are_refused_before_mounting(tmp_dir):
    with pytest.raises(InvalidValue, match="lower layer"):
        overlay.mount([tmp_dir / "missing"], tmp_dir / "u", tmp_dir / "w", tmp_dir / "m")
    with pytest.raises(InvalidValue, match="both upperdir and workdir"):
        overlay.options([tmp_dir], tmp_dir / "u", None)


def test_work_on_another_filesystem_fails_with_the_call_in_the_message(layers):
    tmp, lowers, _ = layers
    (tmp / "w").mkdir()
    with pytest.raises(SyscallError) as e:
        # /dev/shm is a different filesystem from the upper directory's
        overlay.mount(lowers, tmp / "upper", "/dev/shm", tmp / "merged")
    assert e.value.errno == 22
    assert str(e.value).startswith("mount('overlay' -> ")
    assert not mounts.is_mountpoint(tmp / "merged")


def test_a_refused_mount_creates_no_directory(layers):
    tmp, lowers, _ = layers
    before = sorted(os.listdir(tmp))
    with pytest.raises(InvalidValue, match="both upperdir and workdir"):
        overlay.mount(lowers, tmp / "new" / "upper", None, tmp / "new" / "merged")
    with pytest.raises(InvalidValue, match="without ','"):
        overlay.mount(lowers, tmp / "up,per", tmp / "work", tmp / "merged")
    with pytest.raises(SyscallError):  # the kernel refuses: work is on another filesystem
        overlay.mount(lowers, tmp / "new" / "upper", "/dev/shm", tmp / "new" / "merged")
    assert sorted(os.listdir(tmp)) == before
