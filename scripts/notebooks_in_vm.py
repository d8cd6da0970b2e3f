#!/usr/bin/env python3
"""Run the cgroup notebooks under nbval on cgroup v2, inside labkit's small VM.

The course VM has cgroup v2; a development host may have v1 only. This script boots
labkit's qemu guest (labkit.lab.vm) with nothing but the unified hierarchy mounted, the
host's / shared read-only over 9p under a tmpfs, and runs pytest with nbval there, with
the host's own venv Python. The guest's output streams here as it comes; the script exits
with the guest's pytest exit code, and the VM is always powered off.

    sudo /opt/labkit/venv/bin/python scripts/notebooks_in_vm.py            # notebooks 06 and 07
    sudo /opt/labkit/venv/bin/python scripts/notebooks_in_vm.py solutions/06-cgroups-cpu.ipynb

Under software emulation (no KVM) Python runs 10 to 20 times slower than on the host. On
a 2-core host the run takes 70 to 130 s: boot ~4 s, Python, pytest and nbval ~10 s, each
Jupyter kernel 5 to 12 s, the cells ~45 s (mostly the notebooks' own timed loops). The
timeouts below leave room for a much slower machine. Reading the kernel's modules ahead
into the page cache does not pay: the copy costs more emulated CPU than the 9p reads it
saves. Exit codes: pytest's own (0 = all passed), 2 for a bad
argument, or 100 when the VM could not boot, was not cgroup v2, or outlived --timeout.

Layer: a developer tool on top of labkit.lab.vm; tests/test_notebooks_v2.py calls it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout even before `pip install -e .`

DEFAULT_NOTEBOOKS = ("solutions/06-cgroups-cpu.ipynb", "solutions/07-cgroups-memory-pids-io-freezer.ipynb")
VM_FAILED = 100  # the exit code when there is no pytest result to pass on
NOT_V2 = 99  # the guest's exit code when it is not cgroup v2 only
GUEST_HOME = "/run/home"  # /run is a tmpfs in the guest (labkit.lab.vm.guest)

# jsonschema (imported by nbformat, so by nbval) builds a grammar for RFC 3987 IRIs with
# lark when the optional rfc3987_syntax module is there: 0.8 s natively, ~15 s of emulated
# CPU in the guest. Notebooks never hold an IRI-formatted field, so the guest's pytest gets
# a module of that name that refuses to load, and jsonschema goes on without that check.
SHADOWED = {"rfc3987_syntax": "raise ImportError('not loaded in the test VM: its grammar is slow to build')\n"}

# nbval's options as the Makefile's test target uses them, with room for an emulated CPU
NBVAL = ["--nbval-lax", "--nbval-current-env", "--nbval-kernel-startup-timeout=300",
         "--nbval-cell-timeout=600", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg"]

# Where the guest's Python, Jupyter and matplotlib may write: all on the tmpfs.
GUEST_ENV = {
    "LABKIT_QUICK": "1",
    "HOME": GUEST_HOME,
    "JUPYTER_RUNTIME_DIR": f"{GUEST_HOME}/jupyter-runtime",  # the kernel's connection file
    "JUPYTER_DATA_DIR": f"{GUEST_HOME}/jupyter-data",
    "IPYTHONDIR": f"{GUEST_HOME}/ipython",  # the kernel's history database
    "MPLCONFIGDIR": f"{GUEST_HOME}/matplotlib",
    "MPLBACKEND": "Agg",
    "PYTHONPATH": f"{GUEST_HOME}/shadow:{REPO}",
    # Only nbval: every other pytest plugin in the venv costs import time and is unused here.
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
}


def guest_script(python: str, notebooks: list[str]) -> str:
    """The shell script the guest runs: prepare, then exec pytest (its exit code is ours)."""
    pytest = [python, "-m", "pytest", "-p", "nbval", "-p", "no:cacheprovider", "-q", "-rfEs",
              "--durations=8", *NBVAL, *notebooks]
    writable = [f"{GUEST_HOME}/shadow"] + [GUEST_ENV[k] for k in
                                            ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR", "MPLCONFIGDIR")]
    return "\n".join([
        # a guest that still had a v1 hierarchy would test the wrong thing: stop before pytest
        f'[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || {{ echo "guest: /sys/fs/cgroup is not cgroup2"; exit {NOT_V2}; }}',
        # the kernel and nbval talk over ZeroMQ on 127.0.0.1: the guest's loopback starts down
        "/.labkit/busybox ip link set lo up || exit 1",
        f"mkdir -p {shlex.join(writable)}",
        *(f"printf %s {shlex.quote(code)} > {GUEST_HOME}/shadow/{name}.py" for name, code in SHADOWED.items()),
        # matplotlib scans every font on first import (slow when emulated): reuse the host's list
        f"cp /root/.cache/matplotlib/fontlist-*.json {GUEST_ENV['MPLCONFIGDIR']}/ 2>/dev/null",
        'echo "guest: $(nproc) CPUs, $(awk \'/MemTotal/ {print int($2/1024)}\' /proc/meminfo) MiB, '
        '$(stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup, up $(cut -d" " -f1 /proc/uptime) s"',
        f"exec {shlex.join(pytest)}",
    ])


def pytest_summary(output: str) -> str:
    """pytest's last line, e.g. '30 passed in 412.3s', or '' when there is none."""
    for line in reversed(output.strip().splitlines()):
        text = line.strip(" =")
        if re.fullmatch(r"(no tests ran|\d+ \w+(, \d+ \w+)*) in \d+\.\d+s.*", text):
            return text
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=list(DEFAULT_NOTEBOOKS),
                        help="notebook paths, relative to the repository (default: 06 and 07)")
    parser.add_argument("--memory", default="3G", help="guest memory (default: 3G)")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default: 2)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole guest run")
    args = parser.parse_args(argv)

    notebooks = []
    for name in args.notebooks:
        path = Path(name) if Path(name).exists() else REPO / name
        path = path.resolve()
        # the guest sees the host's / except what it mounts itself: /run, /proc, /sys, /dev
        private = any(path.is_relative_to(d) for d in ("/run", "/proc", "/sys", "/dev"))
        if path.suffix != ".ipynb" or not path.is_file() or private:
            print(f"notebooks_in_vm: {name!r} is not a notebook the VM can see "
                  "(expected an .ipynb file outside /run, e.g. solutions/06-cgroups-cpu.ipynb)",
                  file=sys.stderr)
            return 2
        notebooks.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))

    from labkit.errors import InvalidValue, LabkitError
    from labkit.lab.vm import VM  # after the argument checks: a typo costs no boot

    try:  # checks --memory and --cpus, and that we are root: nothing starts yet
        vm = VM(memory=args.memory, cpus=args.cpus, share_host_root=True, cgroup="v2")
    except InvalidValue as e:
        print(f"notebooks_in_vm: {e}", file=sys.stderr)
        return 2
    except LabkitError as e:
        print(f"notebooks_in_vm: {e}", file=sys.stderr)
        return VM_FAILED

    def show(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()

    # SIGTERM (a CI job cancelled, a test's timeout) would end Python without running the
    # `with` exit: turn it into SystemExit so the VM is powered off and its files removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        with vm:
            print(f"notebooks_in_vm: cgroup v2 guest ({vm.accel}) booted in {vm.boot_seconds:.1f} s; "
                  f"running {' '.join(notebooks)}", flush=True)
            result = vm.run(guest_script(sys.executable, notebooks), cwd=str(REPO), env=GUEST_ENV,
                            timeout=args.timeout, on_output=show)
    except LabkitError as e:  # VMError: no boot, the guest died, or the run outlived --timeout
        print(f"\nnotebooks_in_vm: {e}", file=sys.stderr)
        return VM_FAILED
    except KeyboardInterrupt:
        print("\nnotebooks_in_vm: interrupted; the VM is stopped", file=sys.stderr)
        return 130
    total = time.monotonic() - started
    if result.returncode == NOT_V2:
        print("notebooks_in_vm: the guest is not cgroup v2 only; nothing was run", file=sys.stderr)
        return VM_FAILED
    summary = pytest_summary(result.output) or "no pytest summary"
    print(f"\nnotebooks_in_vm: guest pytest exit {result.returncode}: {summary}; "
          f"boot {vm.boot_seconds:.1f} s, run {result.seconds:.1f} s, total {total:.1f} s", flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
