"""The kernel's network layer, callable from a Jupyter cell.

``from labkit.lab.network import net`` gives the same names as
``from labkit.kernel import network as net`` (``net.veth``, ``net.NetNS``, ``net.Table``...),
each one the kernel's own. The difference: a call made from a thread that is running an
asyncio event loop runs in a short-lived thread of its own instead. A Jupyter kernel
executes every cell inside its event loop, and pyroute2 (0.9) drives its netlink socket
with ``run_until_complete`` on the calling thread's loop, which fails there with
"This event loop is already running". In a plain script nothing changes.

Layer: lab. Used by notebook 08.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

from labkit.kernel import network as _kernel_network
from labkit.kernel.network.netns import in_thread


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def off_loop(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, run in a thread of its own when the caller's thread runs an event loop."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _loop_running():
            return fn(*args, **kwargs)
        return in_thread(lambda: fn(*args, **kwargs))
    return call


def _wrap_class(cls: type) -> type:
    """A subclass whose public methods (and classmethods) run off the event loop."""
    body: dict[str, Any] = {"__doc__": cls.__doc__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    for name, member in vars(cls).items():
        if name.startswith("__") and name not in ("__enter__", "__exit__"):
            continue
        if isinstance(member, classmethod):
            body[name] = classmethod(off_loop(member.__func__))
        elif inspect.isfunction(member):
            body[name] = off_loop(member)
    return type(cls.__name__, (cls,), body)


def _build() -> types.SimpleNamespace:
    names = {}
    for name in _kernel_network.__all__:
        obj = getattr(_kernel_network, name)
        if name in ("Table", "NetNS"):
            names[name] = _wrap_class(obj)
        elif inspect.isfunction(obj):
            names[name] = off_loop(obj)
        else:
            names[name] = obj
    return types.SimpleNamespace(**names)


net = _build()
