"""Every error labkit raises, in one place.

All of them derive from LabkitError, so the CLI and the notebook checks can catch
one class and show one line instead of a traceback. Errors that come from the kernel
also derive from OSError and keep the errno, like pyroute2's and psutil's do.

Layer: used by every other module; imports nothing from labkit.
"""

from __future__ import annotations

import errno as _errno
import os
import re


class LabkitError(Exception):
    """Base class. ``str(err)`` is one line a student can act on.

    ``hint`` is an optional second sentence: what to try next.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def one_line(self) -> str:
        msg = str(self)
        return f"{msg} (hint: {self.hint})" if self.hint else msg

    def __reduce__(self):
        # Errors cross process boundaries (a forked child reports why it failed): pickle
        # the finished object, not the constructor's arguments.
        state = dict(self.__dict__)
        if isinstance(self, OSError):
            state.update(errno=self.errno, strerror=self.strerror, filename=self.filename)
        return _restore, (type(self), self.args, state)


def _restore(cls: type, args: tuple, state: dict) -> LabkitError:
    err = cls.__new__(cls)
    err.args = args
    for key, value in state.items():
        setattr(err, key, value)
    return err


class NeedsRoot(LabkitError, PermissionError):
    """Raised before labkit tries something only root may do."""

    def __init__(self, what: str) -> None:
        LabkitError.__init__(self, f"needs root: {what}", hint="run it with sudo")
        self.errno = _errno.EPERM
        self.what = what

    def __str__(self) -> str:
        return self.args[0]


class SyscallError(LabkitError, OSError):
    """A system call failed. Carries errno, the call's name and its arguments.

    >>> str(SyscallError(22, "mount", "'overlay' -> '/x'"))
    "mount('overlay' -> '/x'): EINVAL: Invalid argument"
    """

    def __init__(self, err: int, call: str, args: str = "", detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        text = f"{call}({args}): {name}: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        LabkitError.__init__(self, text)
        self.errno = err
        self.strerror = os.strerror(err)
        self.call = call
        self.call_args = args

    def __str__(self) -> str:
        return self.args[0]


class InvalidValue(LabkitError, ValueError):
    """A value given by the user has the wrong form. Raised before anything is created.

    >>> str(InvalidValue("memory limit", "64XB", "a number with an optional unit b, k, m or g, e.g. 64m"))
    "invalid memory limit '64XB': expected a number with an optional unit b, k, m or g, e.g. 64m"
    """

    def __init__(self, what: str, value: object, accepted: str) -> None:
        super().__init__(f"invalid {what} {value!r}: expected {accepted}")
        self.what = what
        self.value = value
        self.accepted = accepted


class NotFound(LabkitError, LookupError):
    """An image, a container or a file the user named does not exist."""


class AlreadyExists(LabkitError):
    """A name the user chose is taken (a container name, an image tag)."""


class UsageError(LabkitError):
    """A command line that does not parse: an unknown flag, a missing or malformed value.
    ``command`` is the command it belongs to ('labkit run'); the CLI prints the message,
    then ``See 'labkit run --help'.``, as the docker CLI does, and exits 2.

    >>> UsageError("labkit stop", "requires at least 1 argument").one_line()
    'requires at least 1 argument'
    """

    exit_code = 2

    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command


class Unsupported(LabkitError):
    """This kernel or machine lacks a feature (a cgroup controller, overlayfs, ...)."""


class StateError(LabkitError):
    """An operation is not allowed in the object's current state
    (e.g. pausing a stopped container)."""


class CgroupError(LabkitError, OSError):
    """Writing or reading a cgroup file failed; names the file and the value.

    >>> str(CgroupError(16, "/sys/fs/cgroup/x/pids.max", "write", "max"))
    "failed to write 'max' to /sys/fs/cgroup/x/pids.max: EBUSY: Device or resource busy"
    """

    def __init__(self, err: int, path: str, op: str = "write", value: str | None = None) -> None:
        name = _errno.errorcode.get(err, str(err))
        what = f"{op} {value!r} to" if value is not None else f"{op}"
        LabkitError.__init__(self, f"failed to {what} {path}: {name}: {os.strerror(err)}")
        self.errno = err
        self.strerror = os.strerror(err)
        self.filename = path
        self.value = value

    def __str__(self) -> str:
        return self.args[0]


def require_root(what: str) -> None:
    """Raise NeedsRoot unless the effective uid is 0."""
    if os.geteuid() != 0:
        raise NeedsRoot(what)


class ExecFailed(LabkitError):
    """A container's command could not be started. ``exit_code`` is what Docker
    exits with: 127 when the command is not found, 126 when it cannot be executed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NetlinkError(LabkitError, OSError):
    """The kernel refused a netlink request (a link, an address, a route). The message
    names the request as the ip(8) command that would make it, so it can be retried by hand.

    >>> str(NetlinkError(17, "ip link add lkbr0 type bridge"))
    'ip link add lkbr0 type bridge: EEXIST: File exists'
    """

    def __init__(self, err: int, command: str) -> None:
        name = _errno.errorcode.get(err, str(err))
        LabkitError.__init__(self, f"{command}: {name}: {os.strerror(err)}")
        self.errno = err
        self.strerror = os.strerror(err)
        self.command = command

    def __str__(self) -> str:
        return self.args[0]


class NftError(LabkitError):
    """libnftables refused a command; carries the command (as nft(8) would print it) and
    the first line of nft's own error text."""

    def __init__(self, command: str, error: str) -> None:
        first = next((line for line in error.splitlines() if line.strip()), "unknown error")
        first = re.sub(r"^\S+:\d+:\d+-\d+: ", "", first)  # "internal:0:0-0: " (where in the input)
        super().__init__(f"nft {command}: {first}")
        self.command = command
        self.error = error


class BadContent(LabkitError):
    """A blob, manifest, archive or layer member is not what it claims to be (a digest
    that does not match, a tar entry that would leave its layer, a malformed manifest).
    The message names the entry; nothing of it was stored."""


class RegistryError(LabkitError):
    """A registry answered with an error, or could not be reached. Carries the HTTP
    ``status`` (0 when there was no answer) and the registry's own error ``code``."""

    def __init__(self, message: str, status: int = 0, code: str = "", *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code
