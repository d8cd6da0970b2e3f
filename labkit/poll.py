"""Waiting for something the kernel does not announce: poll, with backoff, until a deadline.

Some changes come with no event to wait on: a cgroup that empties, a freezer that
reaches FROZEN, a process that is not our child ending. The one way to wait for them is
to look again and again; ``until`` looks at once, then after 1 ms, 2 ms, 4 ms ... (at most
``most`` seconds apart), so a quick change is seen quickly and a slow one costs little.

    >>> until(lambda: 42, timeout=1.0)
    42

Layer: used by every layer; imports nothing from labkit.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def until(condition: Callable[[], object], timeout: float | None, *, first: float = 0.001,
          most: float = 0.05) -> object:  # fmt: skip
    """Call ``condition()`` until it returns something true, and return that.

    After ``timeout`` seconds (None: no limit) it returns the last, false, value:
    the caller decides what a timeout means (an error naming what it waited for).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = first
    while not (value := condition()):
        if deadline is not None and time.monotonic() > deadline:
            return value
        time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, most)
    return value
