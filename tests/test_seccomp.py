"""seccomp on the real kernel: the kernel layer's filter and Docker's rules, and one bundle
with a seccomp section under labkit and runc side by side (`labkit run`'s options are in
test_cli_security.py)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import time

import pytest

from bundles import SLOWDOWN, bundle, labkit, leftovers
from conftest import need_tool

from labkit import paths
from labkit.errors import InvalidValue
from labkit.kernel import seccomp, seccomp_cache, seccomp_default, security

_libc = ctypes.CDLL(None, use_errno=True)
SYS_PERSONALITY, SYS_CLONE3, SYS_UNSHARE = 135, 435, 272  # x86_64 numbers


def in_filtered_child(filt: seccomp.Filter, probe) -> dict:
    """Fork, load ``filt`` (no_new_privs set, as an unprivileged caller must), run
    ``probe()`` and hand back what it returns; the filter dies with the child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            security.set_no_new_privs()
            started = time.perf_counter()
            seccomp.load(seccomp.compile(filt))
            result = {"ms": 1e3 * (time.perf_counter() - started), **probe()}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def errno_of(nr: int, *args: int) -> int:
    ctypes.set_errno(0)
    return 0 if _libc.syscall(nr, *[ctypes.c_ulong(a) for a in args]) == 0 else ctypes.get_errno()


WRITTEN_WITH = "2.5."  # the libseccomp whose list of system calls the file holds: Debian 12's


def test_the_profile_file_is_what_its_script_writes():
    with open(seccomp.DEFAULT_PROFILE) as f:
        shipped = f.read()
    if seccomp.library_version().startswith(WRITTEN_WITH):
        assert shipped == seccomp_default.render(), "run: python -m labkit.kernel.seccomp_default"
    else:  # a newer libseccomp (Debian 13's 2.6) knows newer calls; the file is the same everywhere
        old, new = json.loads(shipped), json.loads(seccomp_default.render())
        assert set(old["syscalls"][0]["names"]) <= set(new["syscalls"][0]["names"])
        assert old["syscalls"][1:] == new["syscalls"][1:]  # the conditional rules: Docker's, fixed
    doc = json.loads(shipped)
    allowed = doc["syscalls"][0]["names"]
    assert 340 <= len(allowed) <= 420 and "read" in allowed and "execve" in allowed
    assert not {"unshare", "mount", "keyctl", "clone", "ptrace", "open_by_handle_at"} & set(allowed)


def fork_status() -> int:
    pid = os.fork()  # clone(SIGCHLD): no CLONE_NEW* flag
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_docker_rules_by_argument_and_capability():
    def probe():
        return {"unshare": errno_of(SYS_UNSHARE, 0x10000000), "pers_ok": errno_of(SYS_PERSONALITY, 0xFFFFFFFF),
                "pers_bad": errno_of(SYS_PERSONALITY, 0x0040000), "clone3": errno_of(SYS_CLONE3, 0, 0),
                "fork": fork_status()}  # fmt: skip

    got = in_filtered_child(seccomp.default(security.DOCKER_DEFAULT_CAPS), probe)
    assert got["unshare"] == errno.EPERM  # CLONE_NEWUSER: only with CAP_SYS_ADMIN
    assert got["pers_ok"] == 0 and got["pers_bad"] == errno.EPERM  # only Docker's values
    assert got["clone3"] == errno.ENOSYS  # so that libc falls back to clone, which is checked
    assert got["fork"] == 7  # clone without CLONE_NEW* flags is fine
    print(f"compile + load of Docker's profile: {got['ms']:.2f} ms")
    assert got["ms"] < 100 * SLOWDOWN
    admin = in_filtered_child(seccomp.default((*security.DOCKER_DEFAULT_CAPS, "CAP_SYS_ADMIN")),
                              lambda: {"clone3": errno_of(SYS_CLONE3, 0, 0)})  # fmt: skip
    assert admin["clone3"] == errno.EINVAL  # allowed: the kernel itself rejects the empty args


def test_a_bundle_with_seccomp_behaves_the_same_under_runc(tmp_dir):
    runc = need_tool("runc")
    probe = ("unshare -U true 2>/dev/null || echo unshare=EPERM; mkdir /tmp/d 2>&1 | sed 's/.*: //'; "
             "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status")  # fmt: skip
    for nnp in (True, False):  # without no_new_privs the filter is loaded before capabilities go
        rules = seccomp.default(security.RUNC_SPEC_CAPS).to_oci()
        rules["syscalls"][0]["names"] = [n for n in rules["syscalls"][0]["names"] if n not in ("mkdir", "mkdirat")]
        rules["syscalls"].append({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13})
        b = bundle(tmp_dir, ["sh", "-c", probe], no_new_privileges=nnp,
                   seccomp=seccomp.Filter.from_oci(rules))  # fmt: skip
        assert "seccomp" in json.loads((b / "config.json").read_text())["linux"]
        ours = labkit("runtime", "run", "--bundle", str(b), "sec-lk")
        theirs = subprocess.run([runc, "run", "--bundle", str(b), "sec-rc"], capture_output=True, text=True,
                                timeout=60, check=False)  # fmt: skip
        assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout
        assert ours.stdout.split("\n")[:4] == ["unshare=EPERM", "Permission denied", f"NoNewPrivs:\t{int(nnp)}",
                                                "Seccomp:\t2"]  # fmt: skip
    assert leftovers() == []


def test_the_bpf_is_compiled_once_and_a_bad_entry_is_compiled_again(tmp_path, monkeypatch):
    filt = seccomp.default(security.DOCKER_DEFAULT_CAPS)
    prog = seccomp_cache.program(filt, tmp_path)
    entry = tmp_path / f"{seccomp_cache.key(filt)}.bpf"
    assert entry.is_file() and prog == seccomp.compile(filt) and len(prog) % 8 == 0
    admin = seccomp.default((*security.DOCKER_DEFAULT_CAPS, "CAP_SYS_ADMIN"))
    assert seccomp_cache.key(admin) != entry.stem  # other rules, another entry
    # a hit, as init sees it: a fresh interpreter that neither compiles nor imports the binding
    hit = ("import sys; from pathlib import Path; from labkit.kernel import seccomp, seccomp_cache, security; "
           "seccomp.compile = None; filt = seccomp.default(security.DOCKER_DEFAULT_CAPS); "
           f"print(len(seccomp_cache.program(filt, Path({str(tmp_path)!r}))), 'pyseccomp' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", hit], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.split() == [str(len(prog)), "False"], out.stderr
    compiled = []
    monkeypatch.setattr(seccomp, "compile", lambda f: compiled.append(f) or prog)
    good = entry.read_bytes()
    damaged = {"a flipped bit": good[:100] + bytes([good[100] ^ 1]) + good[101:], "truncated": good[:-3],
               "a wrong header": b"0" * 64 + good[64:], "empty": b"", "no program": good[:65]}  # fmt: skip
    for what, data in damaged.items():
        entry.write_bytes(data)
        assert seccomp_cache.program(filt, tmp_path) == prog, what
        assert entry.read_bytes() == good, f"{what}: the entry is written again"
    assert len(compiled) == len(damaged)
    seccomp_cache.program(filt, tmp_path)  # a good entry: no compile
    assert len(compiled) == len(damaged)
    monkeypatch.setattr(seccomp, "library_version", lambda: "9.9.9")  # another libseccomp: another entry
    assert seccomp_cache.key(filt) != entry.stem
    seccomp_cache.program(filt, tmp_path)
    assert len(compiled) == len(damaged) + 1 and len(list(tmp_path.glob("*.bpf"))) == 2


def test_loading_a_cached_program_is_cheap_and_a_malformed_one_is_refused(tmp_path):
    filt = seccomp.default(security.DOCKER_DEFAULT_CAPS)
    prog = seccomp_cache.program(filt, tmp_path)

    def probe():
        started = time.perf_counter()
        seccomp.load(seccomp_cache.program(filt, tmp_path))  # a second filter on top: both judge
        return {"load_ms": 1e3 * (time.perf_counter() - started), "unshare": errno_of(SYS_UNSHARE, 0x10000000)}

    got = in_filtered_child(filt, probe)
    print(f"cache read + load of Docker's profile ({len(prog) // 8} instructions): {got['load_ms']:.2f} ms")
    assert got["unshare"] == errno.EPERM and got["load_ms"] < 20  # ~1 ms; the target of 2 is bench/seccomp.py's
    for bad in (b"", prog[:-1], prog * 5):  # not whole instructions; more than BPF_MAXINSNS
        with pytest.raises(InvalidValue, match="seccomp BPF program"):
            seccomp.load(bad)


def test_a_process_remembers_the_programs_it_read_so_labkitd_s_containers_read_none(tmp_path, monkeypatch):
    """labkitd reads Docker's default profile once (cli/daemon.py warm_up); each init it
    forks finds it in memory, with no hash to compute and no file to read."""
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.setattr(seccomp_cache, "_known", {})
    filt = seccomp.default(security.DOCKER_DEFAULT_CAPS)
    prog = seccomp_cache.program(filt)
    entry = paths.seccomp_cache_dir() / f"{seccomp_cache.key(filt)}.bpf"
    assert entry.is_file()
    entry.unlink()
    monkeypatch.setattr(seccomp, "compile", None)  # neither compiled again
    monkeypatch.setattr(seccomp_cache, "read", None)  # nor read
    assert seccomp_cache.program(filt) == prog and not entry.exists()
    other = seccomp.default((*security.DOCKER_DEFAULT_CAPS, "CAP_SYS_ADMIN"))
    with pytest.raises(TypeError):  # another filter is looked up: here it reaches the missing read()
        seccomp_cache.program(other)
