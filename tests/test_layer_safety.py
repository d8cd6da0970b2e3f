"""Hostile layer tars, built here with tarfile: none may write outside its layer, each is
refused in one line naming the entry, and the store keeps nothing of it.

Each case is a tar a registry or an archive could hand us. The "host" is a directory
outside every labkit root, checked afterwards; the layer goes through
``images.import_layer``, the path every pulled and loaded layer takes.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile

import pytest

from labkit.engine import images, layers
from labkit.errors import BadContent, InvalidValue
from tests.test_images import host_dir, host_intact, store  # noqa: F401 (fixtures)


def tar_of(*members: tuple) -> bytes:
    """(name, kind, extra) -> tar bytes; kind: file dir sym link chr blk fifo."""
    buf = io.BytesIO()
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
             "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}  # fmt: skip
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kinds[kind], 0o755 if kind == "dir" else 0o644
            data = extra.encode() if kind == "file" else b""
            if kind in ("sym", "link"):
                info.linkname = extra
            if kind in ("chr", "blk"):
                info.devmajor, info.devminor = 8, 0  # /dev/sda
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def layers_dir(store_root) -> list[str]:
    d = store_root / "lib/images/layers"
    return sorted(os.listdir(d)) if d.exists() else []


def hostile(host):
    """name -> (tar, the entry the error must name)."""
    return {
        "dotdot": (tar_of(("ok", "file", "x"), ("a/../../escaped", "file", "x")), "a/../../escaped"),
        "symlinked parent": (tar_of(("etc", "sym", str(host)), ("etc/precious", "file", "owned")), "etc/precious"),
        "relative symlinked parent": (tar_of(("up", "sym", "../" * 20),
                                             ("up" + str(host) + "/precious", "file", "owned")), "up"),
        "symlink then dir through it": (tar_of(("d", "sym", str(host)), ("d/sub/new", "file", "x")), "d/sub/new"),
        "hard link out by ..": (tar_of(("h", "link", "../" * 20 + str(host)[1:] + "/precious")), "../"),
        "hard link through a symlink": (tar_of(("s", "sym", str(host)), ("h", "link", "s/precious")), "s/precious"),
        "hard link to nothing": (tar_of(("h", "link", "missing")), "h"),
        "hard link to a dir": (tar_of(("d", "dir", ""), ("h", "link", "d")), "h"),
        "whiteout of ..": (tar_of(("a", "dir", ""), ("a/f", "file", "x"), ("a/.wh...", "file", "")), "a/.wh..."),
        "whiteout of .": (tar_of(("a", "dir", ""), ("a/f", "file", "x"), ("a/.wh..", "file", "")), "a/.wh.."),
        "whiteout through a symlink": (tar_of(("w", "sym", str(host)), ("w/.wh.precious", "file", "")), "w/.wh.precious"),
        "truncated": (tar_of(("big", "file", "y" * 5000))[:1536], "big"),
    }  # fmt: skip


CASES = list(hostile("/host"))


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_layer_is_refused_in_one_line_and_nothing_stays(case, store, host_dir):  # noqa: F811
    data, entry = hostile(host_dir)[case]
    before = layers_dir(store)
    with pytest.raises((InvalidValue, BadContent)) as info:
        images.import_layer(data)
    line = info.value.one_line()
    assert "\n" not in line and entry in line, line
    assert host_intact(host_dir) and sorted(os.listdir(host_dir)) == ["precious", "sub"]
    assert os.stat(host_dir / "precious").st_nlink == 1  # no hard link made to it
    assert layers_dir(store) == before  # not even a half-written .new-* directory


def test_absolute_names_and_links_stay_inside(store, host_dir):  # noqa: F811
    # Docker roots absolute member names in the layer; absolute symlinks are kept as
    # written (they mean something only inside the container), never followed.
    data = tar_of(("/abs/file", "file", "x"), ("/etc", "dir", ""), ("/etc/link", "sym", str(host_dir / "precious")),
                  ("/hard", "link", "/abs/file"))  # fmt: skip
    diff_id = images.import_layer(data)
    fs = images._layer_dir(diff_id) / "fs"
    assert (fs / "abs/file").read_text() == "x" and os.readlink(fs / "etc/link") == str(host_dir / "precious")
    assert os.lstat(fs / "hard").st_ino == os.lstat(fs / "abs/file").st_ino
    assert host_intact(host_dir)


def test_device_nodes_are_skipped_and_whiteouts_become_overlay_whiteouts(tmp_dir):
    data = tar_of(("sda", "blk", ""), ("tty", "chr", ""), ("pipe", "fifo", ""), ("d", "dir", ""),
                  ("d/.wh..wh..opq", "file", ""), ("d/.wh.old", "file", ""), (".wh..wh.plnk", "dir", ""))  # fmt: skip
    result = layers.unpack(io.BytesIO(data), tmp_dir)
    assert not os.path.lexists(tmp_dir / "sda") and not os.path.lexists(tmp_dir / "tty")
    assert set(result.skipped) == {"sda", "tty", "pipe", ".wh..wh.plnk"}  # tarfile counts a fifo as a device
    old = os.lstat(tmp_dir / "d/old")
    assert stat.S_ISCHR(old.st_mode) and old.st_rdev == os.makedev(0, 0)
    assert os.getxattr(tmp_dir / "d", "trusted.overlay.opaque") == b"y"


def test_a_corrupt_gzip_layer_is_one_line(store):  # noqa: F811
    blob = bytearray(gzip.compress(tar_of(("f", "file", "z" * 100_000))))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(BadContent) as info:
        images.import_layer(gzip.GzipFile(fileobj=io.BytesIO(bytes(blob))))
    assert "not a valid tar" in info.value.one_line() or "layer member" in info.value.one_line()
    assert layers_dir(store) == []
