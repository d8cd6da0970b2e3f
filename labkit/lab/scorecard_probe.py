"""The scorecard's probe: a tiny static C program for the system calls busybox has no
applet for (reboot(2) with a wrong magic, keyctl, a raw socket, ptrace, open_by_handle_at,
the double-chroot escape). It prints YES (allowed), HELD (it ran, but stayed inside) or
NO and the errno's name. Static, because a busybox image has no libc to link against.

Layer: lab. Used by labkit.lab.scorecard; gcc comes with the lab (vagrant/provision.sh).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PROBE_C = r"""
/* nb09-probe: try one system call and say YES (allowed), HELD or NO <errno>. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int no(void) { printf("NO %s\n", strerrorname_np(errno)); return 1; }
static int yes(void) { puts("YES"); return 0; }

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "reboot")) {   /* magic2 wrong: EINVAL if CAP_SYS_BOOT, else EPERM */
        if (syscall(SYS_reboot, 0xfee1dead, 0, 0x12345678, 0) == 0 || errno == EINVAL) return yes();
        return no();
    }
    if (!strcmp(what, "keyctl")) {   /* KEYCTL_GET_KEYRING_ID of the session keyring, no create */
        if (syscall(SYS_keyctl, 0, -3, 0) >= 0 || errno == ENOKEY) return yes();
        return no();
    }
    if (!strcmp(what, "raw")) return socket(AF_INET, SOCK_RAW, IPPROTO_ICMP) >= 0 ? yes() : no();
    if (!strcmp(what, "ptrace") && argc > 2)  /* SEIZE does not stop the tracee; exit detaches */
        return ptrace(PTRACE_SEIZE, atoi(argv[2]), 0, 0) == 0 ? yes() : no();
    if (!strcmp(what, "shocker")) {  /* a made-up handle: EPERM means the call itself is refused */
        struct { unsigned int bytes; int type; unsigned int ino, gen; } h = {8, 1, 2, 0};
        int root = open("/", O_RDONLY | O_DIRECTORY);
        if (syscall(SYS_open_by_handle_at, root, &h, O_RDONLY) >= 0 || (errno != EPERM && errno != EACCES))
            return yes();
        return no();
    }
    if (!strcmp(what, "escape") && argc > 2) {  /* chroot into a subdirectory, climb out of it */
        if (chdir("/") || chroot("dev")) return no();
        for (int i = 0; i < 64; i++) chdir("..");
        chroot(".");
        if (access(argv[2], F_OK) == 0) return yes();
        puts("HELD");
        return 0;
    }
    fprintf(stderr, "usage: nb09-probe reboot|keyctl|raw|ptrace PID|shocker|escape PATH\n");
    return 2;
}
"""


def build_probe(where: Path) -> Path:
    """Compile PROBE_C statically (it runs inside busybox images, which have no libc)."""
    src, out = where / "nb09-probe.c", where / "nb09-probe"
    src.write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(src)], check=True, capture_output=True, timeout=120)
    return out
