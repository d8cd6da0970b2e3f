"""seccomp: which system calls a process may make, checked by the kernel on every call.

A seccomp filter is a small BPF program the kernel runs at each system call; it answers
allow, fail with an errno, or kill. Once loaded it can never be removed, and every child
inherits it. labkit does not write that BPF by hand: libseccomp compiles a list of rules
("allow clone when flags & CLONE_NEW* == 0") into it, as runc and Docker do.

The binding is ``pyseccomp`` (PyPI): ctypes over the system's libseccomp.so.2, with the
same API as libseccomp's own Python module. That module (Debian's ``python3-seccomp``) is
a C extension built for the system Python only, so labkit's venv cannot import it;
pyseccomp is pure Python, so it works on 3.11 and 3.12+ alike. Its import costs ~30 ms
(it asks ``ldconfig`` where the library is), so it is imported only where a filter is
built: in the container's init, and once in labkitd, which preloads it for its workers.

Two forms of rules, as in Docker:
- a *profile* (Docker's JSON: ``includes``/``excludes`` on capabilities and arches), read
  by ``profile()``; ``seccomp_default.json`` is Docker's default, rebuilt from its facts;
- a *Filter* (OCI ``linux.seccomp``: the rules that apply to one container), which is what
  a profile becomes once the container's capabilities are known, and what runc loads.

Man pages: seccomp(2), seccomp_rule_add(3), seccomp_load(3). Kernel doc:
Documentation/userspace-api/seccomp_filter.rst. Layer: kernel. Called by the runtime's
spec (validation), init (``compile`` before pivot_root, ``load`` before execve) and the CLI.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from labkit.errors import InvalidValue, NotFound, Unsupported
from labkit.kernel import syscalls

DEFAULT_PROFILE = os.path.join(os.path.dirname(__file__), "seccomp_default.json")
ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD",
           "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP", "SCMP_ACT_LOG", "SCMP_ACT_TRACE")  # fmt: skip
OPERATORS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
             "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")  # fmt: skip
ARCHES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM",
          "SCMP_ARCH_RISCV64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390X")  # fmt: skip
SECCOMP_MODE_FILTER = 2  # linux/seccomp.h: prctl(PR_SET_SECCOMP)'s mode for a BPF program
BPF_MAXINSNS = 4096  # linux/bpf_common.h: the longest program the kernel accepts


@dataclass(frozen=True)
class Arg:
    """A test on one argument: ``args[index] OP value`` (MASKED_EQ: ``& value == value_two``)."""

    index: int
    value: int
    op: str = "SCMP_CMP_EQ"
    value_two: int = 0


@dataclass(frozen=True)
class Rule:
    """``action`` for each system call in ``names`` (when all ``args`` tests hold)."""

    names: tuple[str, ...]
    action: str = "SCMP_ACT_ALLOW"
    errno_ret: int | None = None  # for SCMP_ACT_ERRNO and SCMP_ACT_TRACE
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True)
class Filter:
    """The rules for one container, as OCI's ``linux.seccomp`` holds them."""

    default_action: str = "SCMP_ACT_ERRNO"
    default_errno: int = _errno.EPERM
    architectures: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()

    def check(self) -> Filter:
        """Every action, operator and arch is one seccomp knows (names: ``check_names``)."""
        for action in (self.default_action, *(r.action for r in self.rules)):
            if action not in ACTIONS:
                raise InvalidValue("seccomp action", action, "one of " + ", ".join(ACTIONS))
        for arch in self.architectures:
            if arch not in ARCHES:
                raise InvalidValue("seccomp architecture", arch, "one of " + ", ".join(ARCHES))
        for rule in self.rules:
            for arg in rule.args:
                if arg.op not in OPERATORS or not 0 <= arg.index < 6:
                    raise InvalidValue("seccomp argument test", arg, "index 0-5 and an op from " + ", ".join(OPERATORS))
        return self

    def check_names(self) -> Filter:
        """Every name is one libseccomp knows (this loads the binding: ~30 ms)."""
        unknown = unknown_names(n for r in self.rules for n in r.names)
        if unknown:
            raise _unknown(unknown[0])
        return self

    def to_oci(self) -> dict[str, object]:
        doc: dict[str, object] = {"defaultAction": self.default_action, "defaultErrnoRet": self.default_errno}
        if self.architectures:
            doc["architectures"] = list(self.architectures)
        doc["syscalls"] = [_rule_to_json(r) for r in self.rules]
        return doc

    @classmethod
    def from_oci(cls, doc: dict) -> Filter:
        """From ``linux.seccomp`` (OCI) or a Docker profile whose conditions are resolved."""
        try:
            return cls(
                default_action=doc["defaultAction"],
                default_errno=int(doc.get("defaultErrnoRet", _errno.EPERM)),
                architectures=tuple(doc.get("architectures") or ()),
                rules=tuple(_rule_from_json(r) for r in doc.get("syscalls") or ()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InvalidValue("seccomp profile", f"missing or malformed {err}",
                               "Docker's profile format: defaultAction and syscalls[{names, action}]")  # fmt: skip


def profile(path: str | None, capabilities: Iterable[str], arch: str = "SCMP_ARCH_X86_64") -> Filter:
    """The Filter a Docker-format profile gives a container holding ``capabilities``.

    ``path`` None is Docker's default profile. A rule with ``includes: {caps: [...]}``
    applies only when the container holds one of them; ``excludes`` the other way round.
    """
    path = path or DEFAULT_PROFILE
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"seccomp profile {path!r} does not exist")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidValue(f"seccomp profile {path}", f"not JSON: {err}", "a JSON file in Docker's profile format")
    if not isinstance(doc, dict):
        raise InvalidValue(f"seccomp profile {path}", type(doc).__name__, "a JSON object in Docker's profile format")
    caps = set(capabilities)
    arches: list[str] = []
    for entry in doc.get("archMap") or ():
        if entry.get("architecture") == arch:
            arches = [arch, *entry.get("subArchitectures", ())]
    doc = dict(doc, architectures=arches or doc.get("architectures") or [],
               syscalls=[r for r in doc.get("syscalls") or () if _applies(r, caps, arch)])  # fmt: skip
    return Filter.from_oci(doc).check().check_names()


def default(capabilities: Iterable[str]) -> Filter:
    """Docker's default profile for a container with ``capabilities`` (no name check: they
    come from libseccomp's own tables). The file is read and the rules chosen once per
    set of capabilities in a process; the Filter is frozen, so callers can share it."""
    return _default(frozenset(capabilities))


@functools.lru_cache(maxsize=16)
def _default(capabilities: frozenset[str]) -> Filter:
    with open(DEFAULT_PROFILE) as f:
        doc = json.load(f)
    caps = set(capabilities)
    arches = [doc["archMap"][0]["architecture"], *doc["archMap"][0]["subArchitectures"]]
    rules = [r for r in doc["syscalls"] if _applies(r, caps, "SCMP_ARCH_X86_64")]
    return Filter.from_oci(dict(doc, architectures=arches, syscalls=rules))


def unknown_names(names: Iterable[str]) -> list[str]:
    """The names libseccomp does not know on any architecture."""
    seccomp = _binding()
    return [n for n in names if seccomp.resolve_syscall(seccomp.Arch.NATIVE, n) == -1]  # __NR_SCMP_ERROR


def compile(f: Filter) -> bytes:  # noqa: A001 - the verb libseccomp's docs use
    """libseccomp's BPF program for ``f``: what seccomp_load(3) would hand the kernel.

    The rules go into a libseccomp filter context, then seccomp_export_bpf(3) writes the
    program it generates (an array of 8-byte ``struct sock_filter``) to a file descriptor:
    here a memfd, a file that lives only in memory. This is the slow part (the binding's
    import, then ~5-15 ms of code generation for three arches): seccomp_cache.py does it
    once per distinct filter. The no_new_privs bit is left to the caller: libseccomp
    would set it on load, Docker sets it only with no-new-privileges.
    """
    seccomp = _binding()
    ctx = seccomp.SyscallFilter(_action(seccomp, f.default_action, f.default_errno))
    ctx.set_attr(seccomp.Attr.CTL_NNP, 0)
    for arch in f.architectures:
        number = getattr(seccomp.Arch, arch.removeprefix("SCMP_ARCH_"))
        if not ctx.exist_arch(number):
            ctx.add_arch(number)
    for rule in f.rules:
        action = _action(seccomp, rule.action, rule.errno_ret)
        tests = [seccomp.Arg(a.index, getattr(seccomp, a.op.removeprefix("SCMP_CMP_")), a.value, a.value_two)
                 for a in rule.args]  # fmt: skip
        for name in rule.names:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number == -1:  # __NR_SCMP_ERROR: no architecture has it
                raise _unknown(name)
            try:
                ctx.add_rule(action, number, *tests)
            except OSError as err:
                if err.errno != _errno.EEXIST:  # the same name twice with the same action
                    raise
    with open(os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC), "w+b") as out:
        ctx.export_bpf(out)  # libseccomp writes straight to the fd, past Python's buffer
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog`` (linux/filter.h): how many instructions, and where they are."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def check_program(program: bytes) -> bytes:
    """``program`` has the shape of a BPF program: whole 8-byte instructions, 1 to 4096."""
    if not program or len(program) % 8 or len(program) // 8 > BPF_MAXINSNS:
        raise InvalidValue("seccomp BPF program", f"{len(program)} bytes", f"a multiple of 8, at most {8 * BPF_MAXINSNS}")
    return program


def load(program: bytes) -> None:
    """Install a BPF program as this thread's seccomp filter: prctl(PR_SET_SECCOMP,
    SECCOMP_MODE_FILTER, &prog), what seccomp_load(3) does once it has generated it.

    A few microseconds: the kernel only checks the program and links it in. It needs
    no_new_privs or CAP_SYS_ADMIN; it can never be removed, and children inherit it.
    """
    buf = ctypes.create_string_buffer(check_program(program), len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    syscalls.prctl(syscalls.Prctl.PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))


@functools.cache  # (dlopen in a freshly forked init costs ~0.5 ms)
def library_version() -> str:
    """libseccomp's version, as ``2.5.4``, from seccomp_version(3): no binding imported."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        raise Unsupported("libseccomp.so.2 is not installed (Debian: apt-get install libseccomp2)")
    lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)  # struct scmp_version
    return ".".join(str(n) for n in lib.seccomp_version().contents)


def _binding():
    import pyseccomp  # ~30 ms: only where a filter is built (see the module docstring)

    return pyseccomp


def _unknown(name: str) -> InvalidValue:
    return InvalidValue("system call name in seccomp profile", name, "a name libseccomp knows, e.g. mkdirat")


def _action(seccomp, name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(_errno.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_TRACE":
        return seccomp.TRACE(errno_ret or 0)
    return getattr(seccomp, name.removeprefix("SCMP_ACT_"))


def _applies(rule: dict, caps: set[str], arch: str) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not caps & set(inc["caps"]):
        return False
    if exc.get("caps") and caps & set(exc["caps"]):
        return False
    short = arch.removeprefix("SCMP_ARCH_").lower().replace("x86_64", "amd64")
    if inc.get("arches") and short not in inc["arches"]:
        return False
    return not (exc.get("arches") and short in exc["arches"])


def _rule_to_json(r: Rule) -> dict[str, object]:
    out: dict[str, object] = {"names": list(r.names), "action": r.action}
    if r.errno_ret is not None:
        out["errnoRet"] = r.errno_ret
    if r.args:
        out["args"] = [{"index": a.index, "value": a.value, "valueTwo": a.value_two, "op": a.op} for a in r.args]
    return out


def _rule_from_json(d: dict) -> Rule:
    names = d.get("names") or ([d["name"]] if d.get("name") else [])
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names in {d}")
    args = tuple(Arg(int(a["index"]), int(a["value"]), a.get("op", "SCMP_CMP_EQ"), int(a.get("valueTwo", 0)))
                 for a in d.get("args") or ())  # fmt: skip
    errno_ret = d.get("errnoRet")
    return Rule(tuple(names), d["action"], None if errno_ret is None else int(errno_ret), args)
