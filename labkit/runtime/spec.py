"""One container, described before it exists: labkit's version of an OCI ``config.json``.

A ``Spec`` holds everything the runtime needs to make a container: the command, its
environment and user, the root filesystem, the mounts, which namespaces are new, the
cgroup limits, the capabilities and the paths to hide. ``Spec.docker()`` fills in
Docker's defaults, ``Spec.runc()`` those of ``runc spec``; ``to_oci()``/``from_oci()``
convert to and from the OCI runtime spec's JSON, so the same bundle runs under labkit
and runc. ``validate()`` checks every field before the kernel is touched: a bad value is
one clear error, and nothing is half-created.

Spec, validation and translation are kept apart as in runc (configs, configs/validate,
specconv). Reference: opencontainers/runtime-spec config.md and config-linux.md.
Layer: runtime. Used by container.py (lifecycle), init.py (the child side) and the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path

from labkit.errors import InvalidValue, NotFound, Unsupported
from labkit.kernel import seccomp, security
from labkit.kernel.cgroups.limits import Limits
from labkit.runtime import resources

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})")

OCI_VERSION = "1.0.2-dev"  # what Debian's runc 1.1.5 writes and reads
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# OCI namespace type -> the name of its /proc/PID/ns file
NAMESPACES = {"pid": "pid", "network": "net", "mount": "mnt", "ipc": "ipc", "uts": "uts",
              "user": "user", "cgroup": "cgroup", "time": "time"}  # fmt: skip
# Docker's namespaces (the cgroup namespace stays the host's on cgroup v1, as Docker's does)
DOCKER_NAMESPACES = ("mount", "network", "uts", "pid", "ipc")
RUNC_NAMESPACES = ("pid", "network", "ipc", "uts", "mount")
# linux.timeOffsets: the clocks a time namespace can shift (time_namespaces(7)), and
# how far: the kernel keeps every clock below KTIME_SEC_MAX / 2 seconds
TIME_CLOCKS = ("monotonic", "boottime")
MAX_OFFSET_SECS = (2**63 - 1) // 10**9 // 2

_ANNOTATION_LAYERS = "org.labkit.rootfs.lowerdirs"  # overlay lowers, top first, ':'-joined
_ANNOTATION_UPPER = "org.labkit.rootfs.upperdir"
_ANNOTATION_WORK = "org.labkit.rootfs.workdir"
_ANNOTATION_HOST_DEVICES = "org.labkit.devices.host"  # --privileged: the host's device nodes
_ANNOTATION_IDMAP = "org.labkit.rootfs.idmapped"  # the layers are shown through the user namespace's map


@dataclass(frozen=True)
class Mount:
    """One entry of the spec's ``mounts``: like a line of fstab, in the container's terms."""

    destination: str
    type: str
    source: str
    options: tuple[str, ...] = ()

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options


@dataclass(frozen=True)
class Rlimit:
    type: str  # "RLIMIT_NOFILE"
    soft: int
    hard: int


def docker_mounts() -> tuple[Mount, ...]:
    """Docker's default mounts (moby DefaultLinuxSpec); /dev/shm is 64 MiB as Docker's."""
    return (
        Mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
        Mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
        Mount("/dev/pts", "devpts", "devpts",
              ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
        Mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
        Mount("/sys/fs/cgroup", "cgroup", "cgroup", ("ro", "nosuid", "noexec", "nodev")),
        Mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
        Mount("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    )  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """Everything about one container; every field has Docker's default.

    ``rootfs`` is the root directory (absolute, or relative to the bundle). When
    ``layers`` is set, the runtime mounts an overlay of them (top first, as Docker lists
    lowerdir) with ``upper``/``work`` onto ``rootfs`` inside the container's own mount
    namespace, so the host's mount table never holds it.
    """

    args: tuple[str, ...] = ("sh",)
    env: tuple[str, ...] = (f"PATH={DEFAULT_PATH}",)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    hostname: str | None = None
    rootfs: str = "rootfs"
    readonly: bool = False
    layers: tuple[str, ...] = ()
    upper: str | None = None
    work: str | None = None
    mounts: tuple[Mount, ...] = field(default_factory=docker_mounts)
    namespaces: tuple[str, ...] = DOCKER_NAMESPACES
    namespace_paths: tuple[tuple[str, str], ...] = ()  # (type, path): join instead of new
    time_offsets: tuple[tuple[str, int, int], ...] = ()  # (clock, secs, nanosecs), a new time namespace's
    # a new user namespace's id maps: (id inside, id on the host, how many), as uid_map's lines
    uid_map: tuple[tuple[int, int, int], ...] = ()
    gid_map: tuple[tuple[int, int, int], ...] = ()
    limits: Limits | None = None  # None: no limits
    capabilities: tuple[str, ...] = security.DOCKER_DEFAULT_CAPS
    ambient: tuple[str, ...] = ()
    masked_paths: tuple[str, ...] = security.MASKED_PATHS
    readonly_paths: tuple[str, ...] = security.READONLY_PATHS
    no_new_privileges: bool = False
    seccomp: seccomp.Filter | None = None  # None: no filter (runc spec's and --privileged's)
    host_devices: bool = False  # --privileged: every device node of the host's /dev
    idmap_layers: bool = False  # with a user namespace: idmapped mounts of the layers (kernel/idmap.py)
    terminal: bool = False
    rlimits: tuple[Rlimit, ...] = ()
    cgroups_path: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def docker(cls, args: list[str] | tuple[str, ...], **changes: object) -> Spec:
        """Docker's defaults with ``args`` as the command: ``Spec.docker(["sh"], cwd="/tmp")``."""
        return dataclasses.replace(cls(args=tuple(args)), **changes)

    @classmethod
    def runc(cls, **changes: object) -> Spec:
        """What ``runc spec`` writes (3 capabilities, read-only root, no_new_privileges...)."""
        base = cls(
            args=("sh",),
            env=(f"PATH={DEFAULT_PATH}", "TERM=xterm"),
            hostname="runc",
            readonly=True,
            terminal=True,
            capabilities=security.RUNC_SPEC_CAPS,
            ambient=security.RUNC_SPEC_CAPS,
            no_new_privileges=True,
            rlimits=(Rlimit("RLIMIT_NOFILE", 1024, 1024),),
            namespaces=RUNC_NAMESPACES,
            masked_paths=("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                          "/proc/scsi"),
            mounts=tuple(m for m in docker_mounts()),
        )  # fmt: skip
        return dataclasses.replace(base, **changes)

    def replace(self, **changes: object) -> Spec:
        return dataclasses.replace(self, **changes)

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> Spec:
        """Check every field; raise InvalidValue/Unsupported naming the first bad one."""
        if not self.args or not all(isinstance(a, str) and a for a in self.args):
            raise InvalidValue("command", list(self.args), "a non-empty list of arguments, e.g. ['sh', '-c', 'id']")
        for item in self.env:
            if "=" not in item or item.startswith("="):
                raise InvalidValue("environment variable", item, "KEY=VALUE")
        if not self.cwd.startswith("/"):
            raise InvalidValue("working directory", self.cwd, "an absolute path inside the container, e.g. /tmp")
        for what, value in (("uid", self.uid), ("gid", self.gid), *(("gid", g) for g in self.additional_gids)):
            if not isinstance(value, int) or not 0 <= value < 2**32 - 1:
                raise InvalidValue(what, value, "a number from 0 to 4294967294")
        if self.hostname is not None and not _HOSTNAME.fullmatch(self.hostname):
            raise InvalidValue("hostname", self.hostname, "1-63 letters, digits, '-' or '.'")
        seen = set()
        for ns in self.namespaces:
            if ns not in NAMESPACES:
                raise InvalidValue("namespace type", ns, "one of " + ", ".join(NAMESPACES))
            if ns in seen:
                raise InvalidValue("namespace list", list(self.namespaces), "each type at most once")
            seen.add(ns)
        if "mount" not in seen:
            raise InvalidValue("namespace list", list(self.namespaces),
                               "'mount' among them: a container needs its own mount namespace")  # fmt: skip
        self._validate_id_maps()
        for ns, path in self.namespace_paths:
            if ns not in NAMESPACES:
                raise InvalidValue("namespace type", ns, "one of " + ", ".join(NAMESPACES))
            if ns in seen:
                raise InvalidValue("namespace list", ns, "either a new namespace or a path to join, not both")
            if ns == "user":
                raise Unsupported("joining a user namespace by path: labkit makes a new one (linux.uidMappings)")
            if "user" in seen and ns not in ("network", "ipc", "uts"):
                raise Unsupported(f"joining a {ns} namespace together with a new user namespace "
                                  "(labkit joins only network, ipc and uts ones then)")
            if not os.path.exists(path):
                raise NotFound(f"namespace file {path!r} does not exist")
        self._validate_time_offsets()
        for m in self.mounts:
            if not m.destination.startswith("/"):
                raise InvalidValue("mount destination", m.destination, "an absolute path inside the container")
            if m.is_bind and not os.path.exists(m.source):
                raise NotFound(f"bind mount source path {m.source!r} does not exist (for {m.destination})")
        for name in (*self.capabilities, *self.ambient):
            security.cap_name(name)
        for r in self.rlimits:  # the RLIMIT_* names this kernel and Python know
            if not r.type.startswith("RLIMIT_") or not hasattr(resource, r.type) or r.soft > r.hard:
                raise InvalidValue("rlimit", r, "RLIMIT_NAME with soft <= hard")
        for p in (*self.masked_paths, *self.readonly_paths):
            if not p.startswith("/"):
                raise InvalidValue("masked or read-only path", p, "an absolute path")
        if self.seccomp is not None:
            self.seccomp.check()
        if self.idmap_layers and not (self.layers and "user" in self.namespaces):
            raise InvalidValue("org.labkit.rootfs.idmapped", "true", "layers and a new user namespace with it")
        if bool(self.layers) != bool(self.upper and self.work):
            raise InvalidValue("overlay rootfs", self.layers, "layers together with an upper and a work dir")
        return self

    def _validate_id_maps(self) -> None:
        """linux.uidMappings/gidMappings: both, exactly when there is a new user namespace,
        each range inside 0..2^32-2 and not overlapping another (user_namespaces(7))."""
        if ("user" in self.namespaces) != bool(self.uid_map and self.gid_map):
            what = "a new user namespace needs both" if "user" in self.namespaces else "id maps need"
            raise InvalidValue("linux.uidMappings/gidMappings", [list(m) for m in self.uid_map or self.gid_map],
                               f"{what}: uidMappings and gidMappings with {{'type': 'user'}} in linux.namespaces")
        for name, entries in (("uidMappings", self.uid_map), ("gidMappings", self.gid_map)):
            if len(entries) > 340:  # the kernel's limit on a map's lines
                raise InvalidValue(f"linux.{name}", len(entries), "at most 340 ranges")
            for kind in (0, 1):  # neither the inside ranges nor the host ranges may overlap
                spans = sorted((e[kind], e[kind] + e[2]) for e in entries)
                if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
                    raise InvalidValue(f"linux.{name}", [list(e) for e in entries], "ranges that do not overlap")
            for entry in entries:
                inside, host, size = entry
                if not all(type(x) is int for x in entry) or size < 1 or min(inside, host) < 0 \
                        or max(inside, host) + size > 2**32 - 1:
                    raise InvalidValue(f"linux.{name} entry", list(entry),
                                       "containerID, hostID and size: whole numbers, size >= 1, below 2^32-1")

    def root_ids(self) -> tuple[int, int]:
        """Who the container's root (uid 0, gid 0) is on the host: (0, 0) without a user
        namespace, else the host ids that the maps give to id 0."""
        def host_of(entries):
            return next((host for inside, host, size in entries if inside == 0), 0) if entries else 0
        return host_of(self.uid_map), host_of(self.gid_map)

    def _validate_time_offsets(self) -> None:
        """linux.timeOffsets: each clock once, whole numbers in the kernel's range, and
        only for a time namespace made for this container (a joined one has its offsets)."""
        if not self.time_offsets:
            return
        if "time" not in self.namespaces:
            raise InvalidValue("linux.timeOffsets", _offsets_to_oci(self.time_offsets),
                               "a new time namespace with them: {'type': 'time'} in linux.namespaces")
        seen = set()
        for clock, secs, nanosecs in self.time_offsets:
            if clock not in TIME_CLOCKS or clock in seen:
                raise InvalidValue("clock in linux.timeOffsets", clock, "'monotonic' or 'boottime', each at most once")
            seen.add(clock)
            if type(secs) is not int or not -MAX_OFFSET_SECS <= secs <= MAX_OFFSET_SECS:
                raise InvalidValue(f"linux.timeOffsets.{clock}.secs", secs,
                                   f"a whole number from -{MAX_OFFSET_SECS} to {MAX_OFFSET_SECS}")
            if type(nanosecs) is not int or not 0 <= nanosecs < 10**9:
                raise InvalidValue(f"linux.timeOffsets.{clock}.nanosecs", nanosecs, "a whole number from 0 to 999999999")

    def rootfs_path(self, bundle: str | os.PathLike | None = None) -> Path:
        root = Path(self.rootfs)
        return root if root.is_absolute() or bundle is None else Path(bundle) / root

    # -- OCI config.json ----------------------------------------------------------------
    def to_oci(self) -> dict[str, object]:
        """The OCI runtime spec's JSON object for this container (runc reads it as is)."""
        caps = list(self.capabilities)
        process: dict[str, object] = {
            "terminal": self.terminal,
            "user": {"uid": self.uid, "gid": self.gid},
            "args": list(self.args),
            "env": list(self.env),
            "cwd": self.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": self.no_new_privileges,
        }
        if self.additional_gids:
            process["user"]["additionalGids"] = list(self.additional_gids)
        if self.ambient:
            process["capabilities"]["ambient"] = list(self.ambient)
        if self.rlimits:
            process["rlimits"] = [{"type": r.type, "hard": r.hard, "soft": r.soft} for r in self.rlimits]
        linux: dict[str, object] = {
            "namespaces": [{"type": ns} for ns in self.namespaces]
            + [{"type": ns, "path": p} for ns, p in self.namespace_paths],
            "maskedPaths": list(self.masked_paths),
            "readonlyPaths": list(self.readonly_paths),
        }
        if self.time_offsets:
            linux["timeOffsets"] = _offsets_to_oci(self.time_offsets)
        if self.uid_map or self.gid_map:
            linux["uidMappings"] = [{"containerID": c, "hostID": h, "size": n} for c, h, n in self.uid_map]
            linux["gidMappings"] = [{"containerID": c, "hostID": h, "size": n} for c, h, n in self.gid_map]
        if self.seccomp is not None:
            linux["seccomp"] = self.seccomp.to_oci()
        res = limits_to_oci(self.limits)
        if res:
            linux["resources"] = res
        if self.cgroups_path:
            linux["cgroupsPath"] = self.cgroups_path
        doc: dict[str, object] = {
            "ociVersion": OCI_VERSION,
            "process": process,
            "root": {"path": self.rootfs, "readonly": self.readonly},
            "mounts": [_mount_to_oci(m) for m in self.mounts],
            "linux": linux,
        }
        if self.hostname is not None:
            doc["hostname"] = self.hostname
        notes = dict(self.annotations)
        if self.layers:
            notes[_ANNOTATION_LAYERS] = ":".join(self.layers)
            notes[_ANNOTATION_UPPER] = self.upper
            notes[_ANNOTATION_WORK] = self.work
        if self.host_devices:
            notes[_ANNOTATION_HOST_DEVICES] = "true"
        if self.idmap_layers:
            notes[_ANNOTATION_IDMAP] = "true"
        if notes:
            doc["annotations"] = notes
        return doc

    @classmethod
    def from_oci(cls, doc: dict[str, object]) -> Spec:
        """A Spec from a parsed config.json; unknown fields are ignored, bad ones raise."""
        try:
            process = doc["process"]
            root = doc["root"]
            user = process.get("user", {})
            caps = process.get("capabilities") or {}
            linux = doc.get("linux") or {}
            notes = dict(doc.get("annotations") or {})
            lowers = notes.pop(_ANNOTATION_LAYERS, "")
            spec = cls(
                args=tuple(process["args"]),
                env=tuple(process.get("env") or ()),
                cwd=process.get("cwd", "/"),
                uid=int(user.get("uid", 0)),
                gid=int(user.get("gid", 0)),
                additional_gids=tuple(user.get("additionalGids") or ()),
                hostname=doc.get("hostname"),
                rootfs=root["path"],
                readonly=bool(root.get("readonly", False)),
                layers=tuple(lowers.split(":")) if lowers else (),
                upper=notes.pop(_ANNOTATION_UPPER, None),
                work=notes.pop(_ANNOTATION_WORK, None),
                mounts=tuple(_mount_from_oci(m) for m in doc.get("mounts") or ()),
                namespaces=tuple(n["type"] for n in linux.get("namespaces") or () if not n.get("path")),
                namespace_paths=tuple((n["type"], n["path"]) for n in linux.get("namespaces") or () if n.get("path")),
                time_offsets=tuple((clock, o["secs"], o.get("nanosecs", 0))
                                   for clock, o in (linux.get("timeOffsets") or {}).items()),
                uid_map=tuple((m["containerID"], m["hostID"], m["size"]) for m in linux.get("uidMappings") or ()),
                gid_map=tuple((m["containerID"], m["hostID"], m["size"]) for m in linux.get("gidMappings") or ()),
                limits=limits_from_oci(linux.get("resources") or {}),
                capabilities=tuple(caps.get("bounding") or ()),
                ambient=tuple(caps.get("ambient") or ()),
                masked_paths=tuple(linux.get("maskedPaths") or ()),
                readonly_paths=tuple(linux.get("readonlyPaths") or ()),
                no_new_privileges=bool(process.get("noNewPrivileges", False)),
                seccomp=seccomp.Filter.from_oci(linux["seccomp"]) if linux.get("seccomp") else None,
                host_devices=notes.pop(_ANNOTATION_HOST_DEVICES, "") == "true",
                idmap_layers=notes.pop(_ANNOTATION_IDMAP, "") == "true",
                terminal=bool(process.get("terminal", False)),
                rlimits=tuple(Rlimit(r["type"], int(r["soft"]), int(r["hard"])) for r in process.get("rlimits") or ()),
                cgroups_path=linux.get("cgroupsPath"),
                annotations=tuple(sorted(notes.items())),
            )
        except InvalidValue:
            raise  # linux.resources already named its bad field
        except (KeyError, TypeError, AttributeError, ValueError) as err:  # ValueError: int("x")
            raise InvalidValue("config.json", f"missing or malformed {err}", "an OCI runtime spec (runc spec writes one)")
        return spec

    def save(self, bundle: str | os.PathLike) -> Path:
        """Write ``bundle/config.json`` (2-space JSON, like Docker's)."""
        path = Path(bundle) / "config.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_oci(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, bundle: str | os.PathLike) -> Spec:
        path = Path(bundle) / "config.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no config.json in bundle {os.fspath(bundle)!r} (write one with 'labkit runtime spec')")
        except json.JSONDecodeError as err:
            raise InvalidValue(f"JSON in {path}", str(err), "valid JSON")
        return cls.from_oci(doc)


def _offsets_to_oci(offsets: tuple[tuple[str, int, int], ...]) -> dict[str, dict[str, int]]:
    return {clock: {"secs": secs, "nanosecs": nanosecs} for clock, secs, nanosecs in offsets}


def _mount_to_oci(m: Mount) -> dict[str, object]:
    out: dict[str, object] = {"destination": m.destination, "type": m.type, "source": m.source}
    if m.options:
        out["options"] = list(m.options)
    return out


def _mount_from_oci(d: dict[str, object]) -> Mount:
    return Mount(d["destination"], d.get("type", "bind" if "bind" in d.get("options", ()) else "none"),
                 d.get("source", ""), tuple(d.get("options") or ()))  # fmt: skip


# -- cgroup limits <-> linux.resources ----------------------------------------------------


def limits_to_oci(limits: Limits | None) -> dict[str, object]:
    """linux.resources for a cgroups.Limits (only the limits that are set)."""
    return {} if limits is None else resources.to_oci(limits)


def limits_from_oci(resources_doc: dict[str, object]) -> Limits | None:
    """A cgroups.Limits from linux.resources, or None when it sets nothing labkit applies."""
    return resources.from_oci(resources_doc) if resources_doc else None
