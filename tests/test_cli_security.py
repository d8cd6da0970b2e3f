"""`labkit run`'s confinement options, as a user types them (in-process and through
labkitd): Docker's seccomp profile by default, --security-opt, --privileged, and bad
profiles, which are one line and create nothing."""

from __future__ import annotations

import errno
import json
import os

import pytest
from bundles import labkit, leftovers
from test_cli import clean, mode  # noqa: F401 - the fixtures: every test runs twice

from labkit.kernel import seccomp_default, security


def test_default_profile_denies_a_user_namespace():
    r = labkit("run", "--rm", "busybox", "unshare", "-U", "true")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    r = labkit("run", "--rm", "busybox", "grep", "Seccomp:", "/proc/self/status")
    assert r.returncode == 0 and r.stdout.split() == ["Seccomp:", "2"]  # 2: SECCOMP_MODE_FILTER


def test_security_options():
    r = labkit("run", "--rm", "--security-opt", "seccomp=unconfined", "busybox", "sh", "-c",
               "unshare -U true && grep Seccomp: /proc/self/status")  # fmt: skip
    assert r.returncode == 0 and r.stdout.split() == ["Seccomp:", "0"], r.stderr
    r = labkit("run", "--rm", "--security-opt", "no-new-privileges", "busybox", "grep", "-E",
               "^(NoNewPrivs|Seccomp):", "/proc/self/status")  # fmt: skip
    assert r.stdout.split() == ["NoNewPrivs:", "1", "Seccomp:", "2"], r.stderr
    r = labkit("run", "--rm", "--privileged", "busybox", "sh", "-c",
               "unshare -U true && grep -E '^(CapEff|Seccomp):' /proc/self/status; "
               "mount | grep -c -E ' /proc/(sys|timer_list) ' ; test -c /dev/loop-control && echo devices")  # fmt: skip
    lines = r.stdout.split("\n")
    assert r.returncode == 0, r.stderr
    assert security.to_mask(["CAP_SYS_ADMIN"]) & int(lines[0].split()[1], 16)
    assert lines[1].split() == ["Seccomp:", "0"] and lines[2] == "0"  # nothing masked or read-only
    if os.path.exists("/dev/loop-control"):
        assert lines[3] == "devices"


def test_a_profile_file_of_our_own(tmp_dir):
    doc = json.loads(seccomp_default.render())
    doc["syscalls"][0]["names"].remove("mkdir")
    doc["syscalls"][0]["names"].remove("mkdirat")
    doc["syscalls"].append({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES})
    (tmp_dir / "p.json").write_text(json.dumps(doc))
    r = labkit("run", "--rm", "--security-opt", f"seccomp={tmp_dir}/p.json", "busybox", "mkdir", "/tmp/d")
    assert r.returncode == 1 and "Permission denied" in r.stderr


@pytest.mark.parametrize("opt, content, message", [
    ("bogus=1", None, "invalid security option 'bogus=1': expected seccomp=unconfined"),
    ("seccomp=P", "nope{", "not JSON"),
    ("seccomp=P", '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["nosuchcall"], '
                  '"action": "SCMP_ACT_ALLOW"}]}', "invalid system call name in seccomp profile 'nosuchcall'"),
    ("seccomp=P", '{"defaultAction": "SCMP_ACT_MAYBE", "syscalls": []}', "invalid seccomp action 'SCMP_ACT_MAYBE'"),
    ("seccomp=P", None, "does not exist"),
])  # fmt: skip
def test_bad_security_options_are_one_line_and_create_nothing(tmp_dir, opt, content, message):
    if content is not None:
        (tmp_dir / "P").write_text(content)
    r = labkit("run", "--name", "secbad", "--security-opt", opt.replace("=P", f"={tmp_dir}/P"), "busybox", "true")
    assert r.returncode != 0 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert labkit("ps", "-a", "-q").stdout.strip() == "" and leftovers() == []
