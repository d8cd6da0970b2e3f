"""``labkit vm``: run a command in labkit's small qemu VM.

    labkit vm run [--cgroup v1|v2] [--memory 512M] [--cpus N] [--host-root] -- CMD...
    labkit vm boot                   # boot busybox, run `true`: boot time and memory

``run`` prints the command's output (stdout and stderr together) as it arrives and exits
with the command's exit code; the boot time goes to stderr. With ``--host-root`` the guest
sees the host's / (read-only, writes go to a tmpfs) and starts in the current directory;
that needs root, since the guest's root reads every host file through qemu.

Layer: cli. Calls labkit.lab.vm.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from labkit.errors import InvalidValue


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser("run", help="boot, run one command, power off; exit with its code")
    run.add_argument("--cgroup", default="v2", help="cgroup mode of the guest: v1 or v2 (default v2)")
    run.add_argument("--memory", default="512M", help="guest memory, e.g. 512M or 2G (default 512M)")
    run.add_argument("--cpus", default="1", help="virtual CPUs (default 1)")
    run.add_argument("--host-root", action="store_true",
                     help="share the host's / read-only (writes go to a tmpfs); needs root")
    run.add_argument("--accel", default="auto", help="auto, kvm or tcg (software emulation)")
    run.add_argument("--timeout", default="600", help="seconds the command may take (default 600)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...", help="the command to run")
    boot = verbs.add_parser("boot", help="boot a busybox-only VM, run `true`, print the figures")
    boot.add_argument("--memory", default="256M", help="guest memory (default 256M)")
    boot.add_argument("--accel", default="auto", help="auto, kvm or tcg")


def run(command: str, args: argparse.Namespace) -> int:
    from labkit.lab.vm import VM, quick_boot

    if args.verb == "boot":
        f = quick_boot(memory=args.memory, accel=args.accel)
        print(f"accel {f.accel}: boot {f.boot_seconds:.2f} s wall, {f.guest_boot_seconds:.2f} s guest; "
              f"`true` {f.run_seconds * 1000:.0f} ms; qemu RSS {f.memory_bytes / 2**20:.0f} MiB")
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise InvalidValue("command", "", "a command after --, e.g. labkit vm run -- uname -a")
    try:
        timeout = float(args.timeout)
    except ValueError:
        timeout = 0.0
    if not timeout > 0:  # also catches nan
        raise InvalidValue("timeout", args.timeout, "a positive number of seconds, e.g. 600")
    if not args.cpus.isdigit():
        raise InvalidValue("VM cpu count", args.cpus, "a whole number from 1 to 64")
    vm = VM(memory=args.memory, cpus=int(args.cpus), share_host_root=args.host_root, cgroup=args.cgroup,
            accel=args.accel)
    out = sys.stdout.buffer

    def show(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    with vm:
        print(f"labkit: VM booted in {vm.boot_seconds:.2f} s ({vm.guest_boot_seconds:.2f} s guest, "
              f"{vm.accel})", file=sys.stderr)
        cwd = os.getcwd() if args.host_root else None
        text = cmd[0] if len(cmd) == 1 else shlex.join(cmd)  # one word may be a whole shell line
        result = vm.run(text, timeout=timeout, cwd=cwd, on_output=show)
    return result.returncode
