"""cgroup limits in two spellings: labkit's ``Limits`` and the OCI ``linux.resources``.

``docker run -m 64m --cpus 0.5`` and a config.json's
``{"memory": {"limit": 67108864}, "cpu": {"quota": 50000, "period": 100000}}`` say the
same thing; these two functions translate, so a bundle written by labkit limits the
container in the same way under runc, and a bundle written for runc under labkit.

Reference: opencontainers/runtime-spec config-linux.md, "Control groups".
Layer: runtime. Used by spec.py.
"""

from __future__ import annotations

import dataclasses

from labkit.errors import InvalidValue
from labkit.kernel.cgroups.limits import CPU_PERIOD_US, UNLIMITED, DeviceRate, Limits

_IO = {"io_read_bps": "throttleReadBpsDevice", "io_write_bps": "throttleWriteBpsDevice",
       "io_read_iops": "throttleReadIOPSDevice", "io_write_iops": "throttleWriteIOPSDevice"}  # fmt: skip


def to_oci(limits: Limits) -> dict[str, object]:
    out: dict[str, object] = {}
    memory: dict[str, int] = {}
    if limits.memory is not None:
        memory["limit"] = limits.memory
    if limits.memory_swap is not None:
        memory["swap"] = limits.memory_swap  # OCI's swap is memory + swap, as Docker's
    if memory:
        out["memory"] = memory
    cpu: dict[str, object] = {}
    if limits.shares() is not None:
        cpu["shares"] = limits.shares()
    if limits.cpu_quota_us is not None:
        cpu["quota"] = limits.cpu_quota_us
        cpu["period"] = CPU_PERIOD_US
    if limits.cpuset_cpus is not None:
        cpu["cpus"] = limits.cpuset_cpus
    if cpu:
        out["cpu"] = cpu
    if limits.pids is not None:
        out["pids"] = {"limit": limits.pids}
    block = {
        key: [{"major": r.major, "minor": r.minor, "rate": r.rate} for r in getattr(limits, name)]
        for name, key in _IO.items()
        if getattr(limits, name)
    }
    if block:
        out["blockIO"] = block
    return out


def from_oci(res: dict[str, object]) -> Limits | None:
    """A Limits from linux.resources; device rules (runc's allow-list) are not limits."""
    given: dict[str, object] = {}
    memory = res.get("memory") or {}
    if memory.get("limit") not in (None, 0, -1):
        given["memory"] = int(memory["limit"])
        if memory.get("swap") not in (None, 0):
            given["memory_swap"] = int(memory["swap"])
    cpu = res.get("cpu") or {}
    if cpu.get("shares"):
        given["cpu_shares"] = int(cpu["shares"])
    if cpu.get("quota") not in (None, 0, -1):
        given["cpus"] = int(cpu["quota"]) / int(cpu.get("period") or CPU_PERIOD_US)
    if cpu.get("cpus"):
        given["cpuset_cpus"] = cpu["cpus"]
    pids = (res.get("pids") or {}).get("limit")
    if pids not in (None, 0):
        given["pids"] = UNLIMITED if int(pids) < 0 else int(pids)
    io: dict[str, tuple[DeviceRate, ...]] = {}
    for name, key in _IO.items():
        rules = (res.get("blockIO") or {}).get(key) or ()
        try:
            io[name] = tuple(DeviceRate(int(r["major"]), int(r["minor"]), int(r["rate"])) for r in rules)
        except (KeyError, TypeError, ValueError):
            raise InvalidValue(f"linux.resources.blockIO.{key}", rules, "[{major, minor, rate}, ...]") from None
    if not given and not any(io.values()):
        return None
    limits = Limits.parse(**given)
    return dataclasses.replace(limits, **{k: v for k, v in io.items() if v})
