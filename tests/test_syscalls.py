"""System call wrappers: a failure carries the errno, the call and its arguments."""

from __future__ import annotations

import errno
import os

import pytest

from labkit.errors import SyscallError
from labkit.kernel import syscalls
from labkit.kernel.syscalls import CloneFlags, MountFlags, UmountFlags, flag_names


def test_mount_unknown_filesystem_type(tmp_dir):
    with pytest.raises(SyscallError) as e:
        syscalls.mount("none", tmp_dir, "nosuchfs", 0)
    assert e.value.errno == errno.ENODEV
    assert str(e.value) == f"mount('none' -> '{tmp_dir}', type='nosuchfs'): ENODEV: No such device"


def test_mount_missing_target():
    with pytest.raises(SyscallError) as e:
        syscalls.mount("tmpfs", "/nonexistent/labkit", "tmpfs", MountFlags.MS_NOSUID)
    assert e.value.errno == errno.ENOENT
    assert "MS_NOSUID" in str(e.value) and "ENOENT" in str(e.value)


def test_umount_of_something_not_mounted(tmp_dir):
    with pytest.raises(SyscallError) as e:
        syscalls.umount2(tmp_dir, UmountFlags.MNT_DETACH)
    assert e.value.errno == errno.EINVAL and "umount2(" in str(e.value) and "MNT_DETACH" in str(e.value)


def test_unshare_bad_flag():
    with pytest.raises(SyscallError) as e:
        syscalls.unshare(0x1)  # a signal number bit: never valid for unshare
    assert e.value.errno == errno.EINVAL and str(e.value).startswith("unshare(0x1)")


def test_setns_bad_fd():
    with pytest.raises(SyscallError) as e:
        syscalls.setns(9999, CloneFlags.CLONE_NEWUTS)
    assert e.value.errno == errno.EBADF and "CLONE_NEWUTS" in str(e.value)


def test_pivot_root_to_a_missing_dir():
    with pytest.raises(SyscallError) as e:
        syscalls.pivot_root("/nonexistent-root", "/nonexistent-root/old")
    assert e.value.errno == errno.ENOENT and "pivot_root('/nonexistent-root'" in str(e.value)


def test_sethostname_too_long():
    with pytest.raises(SyscallError) as e:
        syscalls.sethostname("x" * 100)
    assert e.value.errno == errno.EINVAL


def test_prctl_returns_values():
    assert syscalls.prctl(syscalls.Prctl.PR_GET_NO_NEW_PRIVS) in (0, 1)


def test_errors_are_oserrors():
    err = SyscallError(errno.EPERM, "mount", "'a' -> '/b'")
    assert isinstance(err, OSError)
    assert err.errno == errno.EPERM and err.strerror == os.strerror(errno.EPERM)


def test_flag_names():
    assert flag_names(MountFlags.MS_BIND | MountFlags.MS_REC, MountFlags) == "MS_BIND|MS_REC"
    assert flag_names(0, MountFlags) == "0"
    assert flag_names(CloneFlags.CLONE_NEWPID | 0x1, CloneFlags) == "CLONE_NEWPID|0x1"


def test_fork_with_threads_raises_no_warning():
    """Python 3.12+ warns when a process with threads forks; a Jupyter kernel has threads,
    and labkit's children only exec, so syscalls.fork() keeps the notebook output clean."""
    import threading
    import warnings

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(5,))
    t.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pid = syscalls.fork()
            if pid == 0:
                os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        stop.set()
        t.join()
