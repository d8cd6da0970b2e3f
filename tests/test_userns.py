"""User namespaces for containers: ``--userns=auto`` (root inside is an unprivileged
host uid from labkit's /etc/subuid range), the chowned copies of an image's layers,
``labkit top``'s two views of a uid, ``--cgroupns``, an OCI bundle with uidMappings under
runc and labkit (test_userns_runtime.py), and the bad input, which is one line and
creates nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bundles import labkit, leftovers
from test_cli import clean, mode  # noqa: F401 - the fixtures: every test runs twice

from labkit.engine import images, userns
from labkit.runtime import container


def _first() -> int:
    return userns.subordinate()[0]


@pytest.fixture(params=["idmapped", "copy"])
def layers(request):
    """Both ways to show the image's files as root's: idmapped mounts where the kernel has
    them (this one does), the chowned copy elsewhere. The probe's answer, kept in the run
    root, picks one; writing it picks the other."""
    from labkit import paths

    note = paths.run_root() / "idmap-probe"
    if request.param == "idmapped" and not userns.idmapped():
        pytest.skip(f"no idmapped layers on kernel {os.uname().release}")
    userns.idmapped()  # the probe writes the note
    saved = note.read_text()
    key = saved.rpartition(" ")[0]
    note.write_text(f"{key} {'yes' if request.param == 'idmapped' else 'no'}")
    yield request.param
    note.write_text(saved)


def _user_xattrs() -> bool:
    """Can the state root's filesystem hold user.* xattrs (tmpfs only from Linux 6.6 on)?"""
    probe = Path(os.environ["LABKIT_ROOT"]) / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def _copies() -> set[str]:
    return {str(p) for p in userns._dir().glob("[0-9]*/*")}


def test_root_inside_is_an_unprivileged_uid_outside(layers):
    first = _first()
    copies = _copies()
    r = labkit("run", "--rm", "--userns=auto", "busybox", "sh", "-c",
               "id -u; cat /proc/self/uid_map; stat -c '%u %g' /bin/busybox /etc; "
               "echo hi > /etc/mine && stat -c %u /etc/mine; mount -t tmpfs t /mnt && echo mounted; true")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0"
    inside, host, size = (int(x) for x in lines[1].split())
    assert (inside, size) == (0, userns.SLICE) and first <= host < first + userns.subordinate()[1]
    assert lines[2:5] == ["0 0", "0 0", "0"]  # the image's files are root's in there, and so is a new one
    assert "mounted" not in r.stdout  # Docker's profile keeps mount away from root in a user namespace too
    made = _copies() - copies
    assert (made == set()) if layers == "idmapped" else (made != set() or copies != set())


def test_two_containers_get_different_host_ids_and_top_shows_both_views(tmp_path):
    ids = []
    for name in ("userns-a", "userns-b"):
        r = labkit("run", "-d", "--name", name, "--userns=auto", "busybox", "sleep", "60")
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    hosts = []
    for name in ("userns-a", "userns-b"):
        r = labkit("top", name)
        assert r.returncode == 0, r.stderr
        head, row = r.stdout.splitlines()[:2]
        assert head.split() == ["UID", "PID", "PPID", "CUID", "CPID", "CMD"]
        uid, pid, _ppid, cuid, cpid, *cmd = row.split()
        assert (cuid, cpid, cmd) == ("0", "1", ["sleep", "60"])
        assert os.stat(f"/proc/{pid}").st_uid == int(uid)  # the host's view, from the kernel
        hosts.append(int(uid))
    assert hosts[0] != hosts[1] and abs(hosts[0] - hosts[1]) >= userns.SLICE
    # a write lands in the container's upper dir, owned by its root's host uid
    assert labkit("exec", "userns-a", "touch", "/made-inside").returncode == 0
    upper = Path(container.spec_of(ids[0]).upper)
    assert (upper / "made-inside").stat().st_uid == hosts[0]
    r = labkit("top", "userns-none")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert labkit("rm", "-f", "userns-a", "userns-b").returncode == 0
    assert not any((userns._dir() / "leases" / i).exists() for i in ids)  # the slices are free again


def test_top_without_a_user_namespace_shows_the_hosts_root():
    assert labkit("run", "-d", "--name", "userns-host", "busybox", "sleep", "60").returncode == 0
    row = labkit("top", "userns-host").stdout.splitlines()[1].split()
    assert row[0] == "root" and row[3] == "0"


def test_whiteouts_and_opaque_dirs_are_seen_inside_a_user_namespace(tmp_path, layers):
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN rm /bin/vi && rm -rf /etc && mkdir /etc && echo only > /etc/only\n")
    r = labkit("build", "-q", "-t", "userns-wh:1", str(tmp_path), timeout=180)
    assert r.returncode == 0, r.stderr
    top = images.get("userns-wh:1").layers[0].parent.name  # the RUN step's layer
    try:
        for flag in ("--userns=host", "--userns=auto"):
            r = labkit("run", "--rm", flag, "userns-wh:1", "sh", "-c", "ls /etc; test -e /bin/vi || echo no-vi")
            if flag == "--userns=auto" and layers == "copy" and not _user_xattrs():
                # (labkit's small VM keeps the store on a tmpfs of Linux 6.1: no user.* xattrs)
                assert r.returncode != 0 and "cannot carry overlayfs's user.overlay.opaque mark" in r.stderr
                assert r.stderr.count("\n") == 1, r.stderr
                continue
            listed = r.stdout.split()  # (the engine binds hostname, hosts and resolv.conf in /etc)
            assert "only" in listed and "passwd" not in listed and listed[-1] == "no-vi", (flag, r.stdout, r.stderr)
    finally:
        assert labkit("rmi", "userns-wh:1").returncode == 0
    assert list(userns._dir().glob(f"*/{top}")) == []  # rmi took the layer's chowned copies too


def test_cgroupns_private_shows_the_container_its_own_cgroup_as_root():
    r = labkit("run", "--rm", "--cgroupns=private", "busybox", "cat", "/proc/self/cgroup")
    assert r.returncode == 0, r.stderr
    paths = [line.split(":", 2)[2] for line in r.stdout.splitlines()]
    assert paths and all(p == "/" for p in paths)
    r = labkit("run", "--rm", "busybox", "cat", "/proc/self/cgroup")
    assert any(p.split(":", 2)[2] != "/" for p in r.stdout.splitlines())  # the host's: the full path


@pytest.mark.parametrize(("flags", "message"), [
    (["--userns=bogus"], "invalid --userns 'bogus': expected host or auto"),
    (["--userns=auto", "--privileged"], "--userns with --privileged"),
    (["--cgroupns=shared"], "invalid --cgroupns 'shared': expected host or private"),
])  # fmt: skip
def test_bad_userns_flags_are_one_line_and_create_nothing(flags, message):
    before = labkit("ps", "-a", "-q").stdout
    r = labkit("run", "--rm", *flags, "busybox", "true")
    assert r.returncode != 0 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert labkit("ps", "-a", "-q").stdout == before and leftovers() == []
    assert not list((userns._dir() / "leases").glob("*")) if (userns._dir() / "leases").exists() else True


def test_commit_of_a_userns_container_keeps_the_owners_it_saw_inside():
    r = labkit("run", "-d", "--name", "userns-c", "--userns=auto", "busybox", "sh", "-c",
               "echo x > /root-file; touch /nobody-file; chown 65534:65534 /nobody-file; sleep 60")  # fmt: skip
    assert r.returncode == 0, r.stderr
    until_ok = labkit("exec", "userns-c", "test", "-e", "/nobody-file")
    assert until_ok.returncode == 0, until_ok.stderr
    assert labkit("commit", "userns-c", "userns-commit:1").returncode == 0
    try:
        r = labkit("run", "--rm", "userns-commit:1", "stat", "-c", "%u %g %n", "/root-file", "/nobody-file")
        assert r.stdout.splitlines() == ["0 0 /root-file", "65534 65534 /nobody-file"], r.stderr
    finally:
        labkit("rm", "-f", "userns-c")
        labkit("rmi", "userns-commit:1")
