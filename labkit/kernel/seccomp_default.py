"""Docker's default seccomp profile, rebuilt from its documented facts: writes seccomp_default.json.

Docker's profile (moby profiles/seccomp/default.json; Docker's docs, "Seccomp security
profiles for Docker") is an allowlist: the default action is ERRNO(EPERM) and about 360
system calls are named as allowed. Rather than copy that list, labkit derives it:

    every system call libseccomp knows on x86_64, x86 and x32
    minus the ones Docker denies outright                       (NEVER)
    minus the ones Docker allows only with a capability        (BY_CAPABILITY)
    minus the ones Docker allows only with certain arguments   (clone, clone3, personality)

and then adds those conditional rules back, each as Docker writes it, with ``includes`` or
``excludes`` on ``caps``. The result is the JSON file next to this module, in Docker's
own profile format, so ``--security-opt seccomp=FILE.json`` reads it like any other.

Run ``python -m labkit.kernel.seccomp_default`` to write it again (a test checks that
the file is what this script writes). Layer: kernel; used only to make the data file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROFILE = Path(__file__).with_name("seccomp_default.json")

# Denied to every container, whatever its capabilities: the kernel's keyring is not
# namespaced; io_uring, userfaultfd and bpf-less tracing have been escalation paths;
# kexec, swap, NUMA page moves and pivot_root act on the whole machine (the runtime
# pivots before the filter is loaded); the rest are obsolete or never implemented.
NEVER = (
    "add_key", "keyctl", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "kexec_load", "kexec_file_load", "pivot_root", "swapon", "swapoff", "move_pages",
    "create_module", "get_kernel_syms", "query_module", "nfsservctl", "uselib", "ustat", "sysfs",
    "_sysctl", "vm86", "vm86old",
    "afs_syscall", "getpmsg", "putpmsg", "security", "tuxcall", "vserver",
)  # fmt: skip

# Allowed only to a container that holds the capability (Docker's "includes": {"caps"}).
BY_CAPABILITY = {
    "CAP_SYS_ADMIN": (
        "bpf", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick", "lookup_dcookie", "mount",
        "mount_setattr", "move_mount", "name_to_handle_at", "open_tree", "perf_event_open", "quotactl",
        "quotactl_fd", "setdomainname", "sethostname", "setns", "syslog", "umount", "umount2", "unshare",
    ),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy", "migrate_pages"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),  # the 2014 "shocker" breakout
}  # fmt: skip

# clone(2)'s first argument holds the flags; these are the CLONE_NEW* bits (linux/sched.h:
# NEWNS 0x20000 | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET).
CLONE_NEW_MASK = 0x7E020000
# personality(2) values Docker allows: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE, both, and query
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
ARCHES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
_MAX_SYSCALL = 1024  # above every number in libseccomp's tables (x32's start at 512)


def known_syscalls() -> set[str]:
    """Every name in libseccomp's syscall tables for ARCHES."""
    import pyseccomp

    names = set()
    for arch in (pyseccomp.Arch.X86_64, pyseccomp.Arch.X86, pyseccomp.Arch.X32):
        offset = 0x40000000 if arch == pyseccomp.Arch.X32 else 0  # __X32_SYSCALL_BIT
        for nr in range(_MAX_SYSCALL):
            try:
                names.add(pyseccomp.resolve_syscall(arch, offset + nr).decode())
            except ValueError:
                continue
    return names


def profile(known: set[str]) -> dict[str, object]:
    """Docker's default profile, as a dict in Docker's JSON format."""
    conditional = set(NEVER) | {"clone", "clone3", "personality"}
    for names in BY_CAPABILITY.values():
        conditional.update(names)
    allowed = sorted(known - conditional)
    rules: list[dict[str, object]] = [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]
    rules += [{"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]} for v in PERSONALITIES]  # fmt: skip
    rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": CLONE_NEW_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
                  "excludes": {"caps": ["CAP_SYS_ADMIN"]}})  # fmt: skip
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                  "excludes": {"caps": ["CAP_SYS_ADMIN"]}})  # fmt: skip
    rules.append({"names": ["clone", "clone3"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}})
    for cap, names in BY_CAPABILITY.items():
        present = sorted(n for n in names if n in known)
        if present:
            rules.append({"names": present, "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [{"architecture": ARCHES[0], "subArchitectures": list(ARCHES[1:])}],
        "syscalls": rules,
    }


def render() -> str:
    return json.dumps(profile(known_syscalls()), indent=1) + "\n"


if __name__ == "__main__":
    PROFILE.write_text(render())
    sys.stdout.write(f"wrote {PROFILE}\n")
