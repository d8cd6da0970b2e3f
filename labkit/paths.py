"""Where labkit keeps things, and the names it gives to kernel objects.

Like xv6's param.h: every path and naming rule lives here, so tests can point labkit
somewhere else (set ``LABKIT_ROOT``) and ``labkit cleanup`` can find everything labkit
made by these rules alone.

- ``/var/lib/labkit``: images, layers, container directories (kept across reboots).
- ``/run/labkit``: live state: mounts, pid files (gone after a reboot, like /run/runc).
- ``LABKIT_ROOT=/some/dir`` moves both, to ``/some/dir/lib`` and ``/some/dir/run``.
- Rootless (an ordinary user, as podman without sudo): ``~/.local/share/labkit``
  (``$XDG_DATA_HOME``) and ``$XDG_RUNTIME_DIR/labkit`` (or ``~/.cache/labkit/run``).

Layer: used by every layer; imports nothing from labkit.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")

CGROUP_PARENT = "labkit"  # every cgroup labkit makes sits below a cgroup of this name
NETNS_PREFIX = "labkit-"  # named network namespaces: run_root()/netns/labkit-*, /run/netns/labkit-*
LINK_PREFIX = "lk"  # network links: lkbr0, lkh1a2b...
NFT_TABLE = "labkit"  # labkit's one nftables table: `table ip labkit` (tests use labkit-*)
DEFAULT_BRIDGE = "labkit0"  # the default network's bridge (Docker's docker0); cleanup removes it too
IP_NETNS_DIR = Path("/run/netns")  # where ip(8) looks for named network namespaces
VM_NAME_PREFIX = "labkit-vm"  # qemu's -name, so cleanup can find our VMs


def _env_root() -> Path | None:
    root = os.environ.get("LABKIT_ROOT")
    return Path(root) if root else None


_rootless: bool | None = None


def rootless() -> bool:
    """labkit runs as an ordinary user: containers in user namespaces, state in their home.

    Decided once per process, and inherited by its forks: a child that has joined a
    container's user namespace is uid 0 there, yet works on its parent's state root."""
    global _rootless
    if _rootless is None:
        _rootless = os.geteuid() != 0
    return _rootless


def lib_root() -> Path:
    """Persistent state: images, layers, container directories."""
    root = _env_root()
    if root:
        return root / "lib"
    if rootless():
        return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "labkit"
    return Path("/var/lib/labkit")


def run_root() -> Path:
    """Live state: mount points, pid files, sockets."""
    root = _env_root()
    if root:
        return root / "run"
    if rootless():
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
        return Path(runtime_dir) / "labkit" if runtime_dir else Path.home() / ".cache" / "labkit" / "run"
    return Path("/run/labkit")


def api_socket() -> Path:
    """labkitd's Docker Engine API socket: /run/labkit/docker.sock (DOCKER_HOST=unix://...)."""
    return run_root() / "docker.sock"


def daemon_socket() -> Path:
    """labkitd's Unix socket (labkit/engine/protocol.py spells the same rule without pathlib, for the client)."""
    return run_root() / "labkitd.sock"


def images_dir() -> Path:
    return lib_root() / "images"


def containers_dir() -> Path:
    return lib_root() / "containers"


def seccomp_cache_dir() -> Path:
    """BPF programs libseccomp compiled, one file per distinct filter (kernel/seccomp_cache.py)."""
    return lib_root() / "seccomp"


def mounts_dir() -> Path:
    """Scratch mount points made by the kernel layer (overlay demos, bind mounts)."""
    return run_root() / "mnt"


def netns_dir() -> Path:
    """Network namespaces kept alive by a bind mount of their nsfs file, one per name."""
    return run_root() / "netns"


def networks_dir() -> Path:
    """Network definitions (``NAME.json``): kept, like images, until ``labkit network rm``."""
    return lib_root() / "networks"


def endpoints_dir() -> Path:
    """Leases: one file per container on a network (address, ports, its kernel objects),
    and the lock every allocation takes. Live state: ``labkit cleanup`` and a reboot drop it."""
    return run_root() / "networks"


def _root_tag() -> str:
    """Six hex digits naming this state root, so two roots never share a bridge or a table."""
    import hashlib

    return hashlib.sha256(str(_env_root()).encode()).hexdigest()[:6]


def bridge_name(network: str = "bridge") -> str:
    """The Linux bridge of a network: ``labkit0`` for the default network of the default
    root (Docker's ``docker0``); ``lk`` + a hash otherwise, so cleanup finds them all."""
    if network == "bridge" and _env_root() is None:
        return DEFAULT_BRIDGE
    import hashlib

    return LINK_PREFIX + hashlib.sha256(f"{_env_root()}/{network}".encode()).hexdigest()[:11]


def nft_table() -> str:
    """labkit's nftables table for this root: ``labkit``, or ``labkit-<hash>`` under LABKIT_ROOT."""
    return NFT_TABLE if _env_root() is None else f"{NFT_TABLE}-r{_root_tag()}"


def cache_root() -> Path:
    """Downloaded or slow-to-build inputs (the debootstrap tarball): ``$LABKIT_CACHE`` or
    /var/cache/labkit. Not under the state root, so a fresh ``LABKIT_ROOT`` reuses it, and
    ``labkit cleanup`` leaves it alone."""
    return Path(os.environ.get("LABKIT_CACHE", "/var/cache/labkit"))


def roots() -> tuple[Path, Path]:
    """Both state roots: anything mounted below them belongs to labkit."""
    return lib_root(), run_root()
