"""Resource limits in Docker's spelling, checked before anything touches the kernel.

``docker run -m 64m --cpus 0.5 --pids-limit 20`` becomes
``Limits.parse(memory="64m", cpus=0.5, pids=20)``: a frozen dataclass holding plain
numbers (bytes, microseconds, device numbers). Every value is validated here, so a
typo fails with one line naming the value and the form it should have, and no cgroup
directory is ever created for a limit that cannot be written.

This module only knows the numbers. Which file each number goes to is the job of
v1.py and v2.py; the two spellings of CPU weight are converted here because the
conversion is arithmetic, the same one runc >= 1.4 and crun use.

Kernel docs: Documentation/admin-guide/cgroup-v2.rst, and for v1
Documentation/admin-guide/cgroup-v1/{memory,cpusets,blkio-controller}.rst,
Documentation/scheduler/sched-bwc.rst (CPU quota).
Layer: kernel. Called by cgroups/__init__.py (create, set) and by the runtime's spec.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, fields
from pathlib import Path

from labkit.errors import InvalidValue

CPU_PERIOD_US = 100_000  # Docker's --cpus always uses a 100 ms period
SHARES_MIN, SHARES_MAX = 2, 262_144  # what cpu.shares accepts on v1
WEIGHT_MIN, WEIGHT_MAX = 1, 10_000  # what cpu.weight accepts on v2
UNLIMITED = -1  # memory_swap=-1 and pids=-1 mean "no limit", as in Docker

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmg]?)b?\s*$", re.IGNORECASE)
_SIZE_FORM = "a number with an optional unit b, k, m or g, e.g. 64m"
_CPULIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_IO_KINDS = ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")


@dataclass(frozen=True)
class DeviceRate:
    """One throttle rule: a block device (major:minor) and its rate (bytes/s or ops/s)."""

    major: int
    minor: int
    rate: int

    @property
    def device(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class Limits:
    """What a cgroup may use. ``None`` means "leave the kernel's value as it is".

    memory        bytes of RAM (v1 memory.limit_in_bytes, v2 memory.max)
    memory_swap   RAM + swap together, Docker's meaning; -1 = unlimited swap
                  (v1 memory.memsw.limit_in_bytes; v2 memory.swap.max = swap - memory).
                  Unset, swap stays as the kernel has it (Docker would allow 2 x memory).
    memory_high   v2 only: above it the group is throttled and reclaimed, never OOM-killed
    cpu_quota_us  from ``cpus``: microseconds of CPU time per CPU_PERIOD_US
    cpu_shares    relative weight, v1 spelling (2..262144, default 1024)
    cpu_weight    relative weight, v2 spelling (1..10000, default 100)
    pids          most tasks (processes and threads) at once; -1 = unlimited
    cpuset_cpus   the CPUs the group may run on, kernel list syntax: "0", "0-1,3"
    io_*          per-device throttles (v1 blkio.throttle.*, v2 io.max)
    """

    memory: int | None = None
    memory_swap: int | None = None
    memory_high: int | None = None
    cpu_quota_us: int | None = None
    cpu_shares: int | None = None
    cpu_weight: int | None = None
    pids: int | None = None
    cpuset_cpus: str | None = None
    io_read_bps: tuple[DeviceRate, ...] = ()
    io_write_bps: tuple[DeviceRate, ...] = ()
    io_read_iops: tuple[DeviceRate, ...] = ()
    io_write_iops: tuple[DeviceRate, ...] = ()

    @classmethod
    def parse(cls, **given: object) -> Limits:
        """Validate Docker-style values; raise InvalidValue naming the first bad one.

        >>> Limits.parse(memory="64m", cpus=0.5, pids=20).cpu_quota_us
        50000
        """
        known = {"memory", "memory_swap", "memory_high", "cpus", "cpu_shares", "cpu_weight", "pids",
                 "cpuset_cpus", *_IO_KINDS}
        for key in given:
            if key not in known:
                raise InvalidValue("limit name", key, "one of " + ", ".join(sorted(known)))
        values = {k: v for k, v in given.items() if v is not None}
        out: dict[str, object] = {}
        if "memory" in values:
            out["memory"] = parse_size(values["memory"], "memory limit")
        if "memory_high" in values:
            out["memory_high"] = parse_size(values["memory_high"], "memory_high limit")
        if "memory_swap" in values:
            out["memory_swap"] = _parse_swap(values["memory_swap"], out.get("memory"))
        if "cpus" in values:
            out["cpu_quota_us"] = _parse_cpus(values["cpus"])
        if "cpu_shares" in values and "cpu_weight" in values:
            both = f"cpu_shares={values['cpu_shares']}, cpu_weight={values['cpu_weight']}"
            raise InvalidValue("cpu weight", both,
                               "only one of cpu_shares (v1 spelling) or cpu_weight (v2 spelling)")
        if "cpu_shares" in values:
            out["cpu_shares"] = _parse_int(values["cpu_shares"], "cpu_shares", SHARES_MIN, SHARES_MAX)
        if "cpu_weight" in values:
            out["cpu_weight"] = _parse_int(values["cpu_weight"], "cpu_weight", WEIGHT_MIN, WEIGHT_MAX)
        if "pids" in values:
            out["pids"] = _parse_pids(values["pids"])
        if "cpuset_cpus" in values:
            out["cpuset_cpus"] = parse_cpuset(values["cpuset_cpus"])
        for kind in _IO_KINDS:
            if kind in values:
                out[kind] = _parse_device_rates(values[kind], kind)
        return cls(**out)

    def given(self) -> dict[str, object]:
        """Only the fields that were set, e.g. to show what a group was created with."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if v not in (None, ())}

    @property
    def cpus(self) -> float | None:
        return None if self.cpu_quota_us is None else self.cpu_quota_us / CPU_PERIOD_US

    def shares(self) -> int | None:
        """The weight in v1's spelling, converting cpu_weight if that is what was given."""
        if self.cpu_weight is not None:
            return weight_to_shares(self.cpu_weight)
        return self.cpu_shares

    def weight(self) -> int | None:
        """The weight in v2's spelling, converting cpu_shares if that is what was given."""
        if self.cpu_shares is not None:
            return shares_to_weight(self.cpu_shares)
        return self.cpu_weight


def shares_to_weight(shares: int) -> int:
    """cpu.shares (v1) -> cpu.weight (v2), the curve runc >= 1.4 and crun use.

    It is not a straight line: it maps v1's default 1024 onto v2's default 100 and the
    ends onto the ends, so ratios between groups change (1:3 in shares is not 1:3 in
    weight). Older runc used the line 1 + (shares - 2) * 9999 / 262142.

    >>> [shares_to_weight(s) for s in (2, 512, 1024, 2048, 262144)]
    [1, 59, 100, 174, 10000]
    """
    if shares == 0:
        return 0
    if shares <= 2:
        return 1
    if shares >= SHARES_MAX:
        return WEIGHT_MAX
    lg = math.log2(shares)
    exponent = (lg * lg + 125 * lg) / 612.0 - 7.0 / 34.0
    return min(WEIGHT_MAX, math.ceil(10**exponent))


def weight_to_shares(weight: int) -> int:
    """cpu.weight (v2) -> cpu.shares (v1): the inverse of shares_to_weight's curve.

    Solves (l^2 + 125 l)/612 - 7/34 = log10(weight) for l = log2(shares).

    >>> [weight_to_shares(w) for w in (1, 100, 10000)]
    [2, 1024, 262144]
    """
    if weight <= 1:
        return SHARES_MIN
    if weight >= WEIGHT_MAX:
        return SHARES_MAX
    c = 612.0 * (math.log10(weight) + 7.0 / 34.0)
    lg = (-125.0 + math.sqrt(125.0**2 + 4.0 * c)) / 2.0
    return max(SHARES_MIN, min(SHARES_MAX, round(2**lg)))


def parse_size(value: object, what: str = "memory limit") -> int:
    """'64m' -> 67108864. Ints are bytes. Units b, k, m, g (kb, mb, gb too), any case."""
    if isinstance(value, bool):
        raise InvalidValue(what, value, _SIZE_FORM)
    if isinstance(value, int):
        if value <= 0:
            raise InvalidValue(what, value, "a positive number of bytes, or " + _SIZE_FORM)
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise InvalidValue(what, value, _SIZE_FORM)
    number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number <= 0:
        raise InvalidValue(what, value, "more than 0 bytes, " + _SIZE_FORM)
    return number


def _parse_swap(value: object, memory: int | None) -> int:
    if value in (UNLIMITED, "-1"):
        return UNLIMITED
    total = parse_size(value, "memory_swap limit")
    if memory is None:
        raise InvalidValue("memory_swap limit", value, "memory set as well (memory_swap is memory + swap)")
    if total < memory:
        raise InvalidValue("memory_swap limit", value,
                           f"at least the memory limit ({memory} bytes): it counts memory + swap")
    return total


def _parse_cpus(value: object) -> int:
    ncpu = os.cpu_count() or 1
    form = f"a number of CPUs from 0.01 to {ncpu}, e.g. 0.5"
    try:
        cpus = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidValue("cpus", value, form) from None
    if not (0.01 <= cpus <= ncpu):  # also rejects nan
        raise InvalidValue("cpus", value, form)
    return round(cpus * CPU_PERIOD_US)


def _parse_int(value: object, what: str, low: int, high: int, form: str = "") -> int:
    form = form or f"a whole number from {low} to {high}"
    if isinstance(value, bool):
        raise InvalidValue(what, value, form)
    try:
        number = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        number = None
    if number is None or not (low <= number <= high):
        raise InvalidValue(what, value, form)
    return number


def _parse_pids(value: object) -> int:
    if value in (UNLIMITED, "-1", "max"):
        return UNLIMITED
    high = 4_194_304  # 2^22: the kernel's PID_MAX_LIMIT
    return _parse_int(value, "pids limit", 1, high, f"a whole number from 1 to {high}, or -1 for unlimited")


def online_cpus() -> set[int]:
    """The CPUs this machine has online (/sys/devices/system/cpu/online)."""
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return set(range(os.cpu_count() or 1))
    return expand_cpulist(text)


def expand_cpulist(text: str) -> set[int]:
    """Kernel list syntax -> a set: '0-2,5' -> {0, 1, 2, 5}. See cpuset(7), 'List format'."""
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def parse_cpuset(value: object) -> str:
    """Check a cpuset.cpus list ('0', '0-1,3') and that every CPU in it exists."""
    online = online_cpus()
    form = f"a list of CPUs like 0 or 0-1,3 using CPUs {_compact(online)}"
    plain = isinstance(value, (int, str)) and not isinstance(value, bool)
    text = str(value).replace(" ", "") if plain else ""
    if not _CPULIST.match(text):
        raise InvalidValue("cpuset_cpus", value, form)
    for part in text.split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            raise InvalidValue("cpuset_cpus", value, form)
    if not expand_cpulist(text) <= online:
        raise InvalidValue("cpuset_cpus", value, form)
    return text


def _compact(cpus: set[int]) -> str:
    if cpus and len(cpus) == max(cpus) - min(cpus) + 1:
        return f"{min(cpus)}-{max(cpus)}"
    return ",".join(map(str, sorted(cpus)))


def _parse_device_rates(value: object, kind: str) -> tuple[DeviceRate, ...]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(_parse_device_rate(item, kind) for item in items)


def _parse_device_rate(item: object, kind: str) -> DeviceRate:
    bps = kind.endswith("bps")
    example = "/dev/loop0:1m" if bps else "/dev/loop0:100"
    form = f"DEVICE:RATE with DEVICE a block device, e.g. {example}"
    what = kind.replace("_", " ")
    if not isinstance(item, str) or ":" not in item:
        raise InvalidValue(what, item, form)
    device, _, rate_text = item.rpartition(":")
    try:
        st = os.stat(device)
    except OSError:
        raise InvalidValue(what, item, form + f" ({device} does not exist)") from None
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidValue(what, item, form + f" ({device} is not a block device)")
    rate = parse_size(rate_text, what) if bps else _parse_int(rate_text, what, 1, 2**63 - 1)
    return DeviceRate(os.major(st.st_rdev), os.minor(st.st_rdev), rate)
