"""``labkit run``'s flags, turned into a Spec: Docker's defaults, the image's config, the flags.

``-m 64m --cpus 0.5 --pids-limit 20`` become cgroup Limits, ``-v`` bind mounts,
``--cap-add``/``--cap-drop`` the capability set, ``-u`` a uid and gid (looked up in the
image's /etc/passwd), ``--security-opt`` and ``--privileged`` the seccomp filter and what
else Docker takes away or gives back. Everything is checked here; nothing is created.

Layer: the CLI. Calls labkit.runtime.spec, labkit.engine.images, labkit.kernel.security.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from labkit import paths
from labkit.engine import images
from labkit.errors import InvalidValue, LabkitError, NotFound
from labkit.kernel import seccomp, security
from labkit.kernel.cgroups import Limits
from labkit.runtime import state as st
from labkit.runtime import timing
from labkit.runtime.spec import DEFAULT_PATH, Mount, Spec, docker_mounts


def build_spec(args: argparse.Namespace, container_id: str):
    """The Spec for `labkit run`'s flags, and the image; everything is checked."""
    timing.mark("image")  # with LABKIT_TIMING: the image's config and layers, then the spec
    if not args.network:  # rootless there is no bridge (it needs root): a network of its own, lo only
        args.network = "none" if paths.rootless() else "bridge"
    if paths.rootless() and args.network not in ("none", "host"):
        raise InvalidValue("network", args.network, "none (the default rootless: only lo) or host: "
                           "a bridge and its NAT rules need root")  # fmt: skip
    limits = Limits.parse(memory=args.memory, memory_swap=args.memory_swap, cpus=args.cpus,
                          cpu_shares=args.cpu_shares, pids=args.pids_limit)  # fmt: skip
    mode = network_mode(args.network)
    volumes = [_volume(v) for v in args.volume]
    caps = _capabilities(args.cap_add, args.cap_drop)
    confinement = security_options(args.security_opt, args.privileged, caps)
    image = images.get(args.image)
    cfg = image.config
    entrypoint = getattr(args, "entrypoint", None)  # --entrypoint "" drops the image's
    entry = list(cfg.entrypoint) if entrypoint is None else ([entrypoint] if entrypoint else [])
    argv = entry + (list(args.cmd) if args.cmd else [] if entrypoint is not None else list(cfg.cmd))
    if not argv:
        raise InvalidValue("command", "", f"a command: image {args.image} has no CMD, so name one after it")
    env = {e.split("=", 1)[0]: e for e in (cfg.env or [f"PATH={DEFAULT_PATH}"])}
    for item in args.env:
        key, eq, _ = item.partition("=")
        if not key:
            raise InvalidValue("environment variable", item, "KEY=VALUE or KEY")
        env[key] = item if eq else f"{key}={os.environ.get(key, '')}"
    if args.tty:
        env.setdefault("TERM", "TERM=xterm")
    env.setdefault("HOSTNAME", f"HOSTNAME={args.hostname or container_id[:12]}")
    uid, gid = user_ids(args.user or cfg.user, image.layers)
    # a network namespace of its own only with --network none: the others join one (or the host's)
    namespaces = tuple(n for n in ("mount", "network", "uts", "pid", "ipc") if n != "network" or mode == "none")
    if _choice("--cgroupns", getattr(args, "cgroupns", None) or "host", ("host", "private")) == "private":
        namespaces += ("cgroup",)
    layers = list(image.layers)
    ids = {}
    userns_mode = _choice("--userns", getattr(args, "userns", None) or "host", ("host", "auto"))
    if paths.rootless():  # always a user namespace: the user's own uid is root in it
        namespaces += ("user",)
        ids = rootless_maps(args)
    elif userns_mode == "auto":
        if args.privileged:
            raise InvalidValue("--userns with --privileged", "auto",
                               "host: a privileged container is root of the host, it has no user namespace")
        from labkit.engine import userns  # only --userns=auto needs it

        owned = userns.allocate(container_id)  # a lease: run.py gives it back if the create fails
        ids = {"uid_map": owned.uid_map(), "gid_map": owned.uid_map()}
        namespaces += ("user",)
        try:
            if userns.idmapped():  # the layers as they are, seen through the map
                userns.check_reachable(st.data_dir(container_id).parent, owned)
                ids["idmap_layers"] = True
            else:  # a copy of each, owned by the slice's ids
                layers = userns.shifted_layers(layers, owned)
        except BaseException:
            userns.release(container_id)
            raise
    lib = st.data_dir(container_id)
    mounts = _base_mounts(args.privileged) + tuple(Mount(dst, "bind", src, ("rbind", "ro" if ro else "rw")) for src, dst, ro in volumes)
    return Spec(
        args=tuple(argv), env=tuple(env.values()), cwd=args.workdir or cfg.working_dir or "/", uid=uid, gid=gid,
        hostname=args.hostname or container_id[:12], rootfs=str(st.container_dir(container_id) / "rootfs"),
        readonly=args.read_only, layers=tuple(str(p) for p in layers), upper=str(lib / "upper"),
        work=str(lib / "work"), mounts=mounts, namespaces=namespaces, limits=limits if limits.given() else None,
        terminal=args.tty, **ids,
    ).replace(**confinement).validate(), image  # fmt: skip


def rootless_maps(args: argparse.Namespace) -> dict[str, object]:
    """Rootless, as ``podman run`` without sudo: the user's own uid and gid are 0 inside,
    and ids 1.. the subordinate range /etc/subuid and /etc/subgid give the user (written by
    newuidmap/newgidmap); without one, the container has only root."""
    import pwd  # (here: only rootless runs need it)

    from labkit.engine import userns

    if args.privileged:
        raise InvalidValue("--privileged", "rootless", "root: a privileged container is root of the host (use sudo)")
    user = pwd.getpwuid(os.geteuid()).pw_name
    maps = {}
    for key, path, own in (("uid_map", userns.SUBUID, os.geteuid()), ("gid_map", userns.SUBGID, os.getegid())):
        try:
            first, count = userns.subordinate(path, owner=user)
            maps[key] = ((0, own, 1), (1, first, count))
        except LabkitError:  # no range: root alone
            maps[key] = ((0, own, 1),)
    return maps


def _choice(flag: str, value: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise InvalidValue(flag, value, " or ".join(accepted))
    return value


def security_options(opts: list[str], privileged: bool, caps: tuple[str, ...]) -> dict[str, object]:
    """``--security-opt`` and ``--privileged``: the Spec fields they set, as Docker reads them.

    By default a container gets Docker's seccomp profile, evaluated for its capabilities.
    ``--privileged`` gives every capability the caller has, no seccomp, no masked or
    read-only paths, a writable /sys and the host's device nodes: all that is given away.
    """
    no_new_privs, unconfined, path = False, privileged, None
    for opt in opts:
        key, _, value = opt.replace(":", "=", 1).partition("=")  # Docker took "seccomp:x" once
        if key == "no-new-privileges" and value in ("", "true", "false"):
            no_new_privs = value != "false"
        elif key == "seccomp" and value == "unconfined":
            unconfined = True
        elif key == "seccomp" and value:
            path = value
        else:
            raise InvalidValue("security option", opt, "seccomp=unconfined, seccomp=PROFILE.json or no-new-privileges")
    if privileged:
        have = security.capsets().bounding
        caps = tuple("CAP_" + n for n, bit in security.CAPABILITIES.items() if have >> bit & 1)
    elif path is not None:  # Docker reads the file even with unconfined given later
        seccomp.profile(path, caps)
    changes: dict[str, object] = {"capabilities": caps, "no_new_privileges": no_new_privs}
    if not unconfined:
        changes["seccomp"] = seccomp.profile(path, caps) if path else seccomp.default(caps)
    if privileged:
        changes.update(masked_paths=(), readonly_paths=(), host_devices=True)
    return changes


def _base_mounts(privileged: bool) -> tuple[Mount, ...]:
    """Docker's mounts; --privileged mounts /sys and its cgroup files writable."""
    if not privileged:
        return docker_mounts()
    return tuple(dataclasses.replace(m, options=tuple(o for o in m.options if o != "ro")) for m in docker_mounts())


def network_mode(text: str) -> str:
    """``--network``: bridge, none, host, container:NAME or a user-defined network's
    name; checked now (a network that does not exist is one line, nothing made)."""
    from labkit.engine import networks

    if text.startswith("container:"):
        if not text[len("container:"):]:
            raise InvalidValue("network", text, "container:NAME, naming a running container")
        return text
    networks.get(text)  # NotFound: "no such network"
    return text


def published(args: argparse.Namespace, image) -> list:
    """``-p`` and ``-P`` -> port mappings (host port 0 where one is to be chosen)."""
    from labkit.engine import ports

    wanted = [m for p in args.publish for m in ports.parse(p)]
    if args.publish_all:
        wanted += ports.exposed(image.config.exposed_ports)
    return wanted


def _volume(text: str) -> tuple[str, str, bool]:
    parts = text.split(":")
    form = "HOST_PATH:CONTAINER_PATH[:ro|rw] with absolute paths, e.g. /tmp/data:/data:ro"
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidValue("volume", text, form)
    src, dst = parts[0], parts[1]
    if not src.startswith("/") or not dst.startswith("/"):
        raise InvalidValue("volume", text, form)
    if not os.path.exists(src):
        raise NotFound(f"volume source {src!r} does not exist on the host (create it first)")
    return os.path.realpath(src), dst, len(parts) == 3 and parts[2] == "ro"


def _capabilities(add: list[str], drop: list[str]) -> tuple[str, ...]:
    caps = list(security.DOCKER_DEFAULT_CAPS)
    if any(c.upper() == "ALL" for c in add):
        caps = ["CAP_" + n for n in security.CAPABILITIES]
    caps += [security.cap_name(c) for c in add if c.upper() != "ALL"]
    if any(c.upper() == "ALL" for c in drop):
        caps = [security.cap_name(c) for c in add if c.upper() != "ALL"]
    dropped = {security.cap_name(c) for c in drop if c.upper() != "ALL"}
    # a process can keep only what its parent has: we may lack one (e.g. SYS_RESOURCE)
    have = security.capsets().bounding
    return tuple(dict.fromkeys(c for c in caps if c not in dropped and have >> security.CAPABILITIES[c[4:]] & 1))


def user_ids(text: str, layers) -> tuple[int, int]:
    """``-u``: UID[:GID], or a name looked up in the first /etc/passwd of ``layers``."""
    if not text:
        return 0, 0
    name, _, group = text.partition(":")
    form = "UID[:GID] as numbers, or a user name from the image's /etc/passwd"
    if name.isdigit() and (not group or group.isdigit()):
        return int(name), int(group or name)
    for layer in layers:  # top layer first: the first /etc/passwd found is the one seen
        passwd = os.path.join(layer, "etc/passwd")
        if os.path.isfile(passwd) and not os.path.islink(passwd):
            with open(passwd) as f:
                for line in f:
                    fields = line.strip().split(":")
                    if len(fields) >= 4 and fields[0] == name:
                        return int(fields[2]), int(group) if group.isdigit() else int(fields[3])
            break
    raise InvalidValue("user", text, form)
