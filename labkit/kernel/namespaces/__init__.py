"""Linux namespaces: give a process its own view of one kind of kernel resource.

A namespace wraps a global resource (the hostname, the process ids, the mount table,
the network stack, the user ids...) so that the processes inside see their own copy.
One module per thing you do with them:

- ``kinds``: ``Kind``, ``namespaces_of(pid)`` and ``compare(a, b)``: which namespaces a
  process is in (``/proc/PID/ns``).
- ``unshare``: ``spawn(...)`` starts a process in new namespaces (fork, then unshare(2)
  in the child); ``run(...)`` waits for it and returns what it printed;
  ``set_time_offsets(...)`` shifts a new time namespace's clocks; ``write_id_maps(...)``
  gives a new user namespace its uid and gid maps.
- ``nsenter``: ``enter(pid, ...)`` runs something inside another process's namespaces.
- ``child``: the ``Process`` handle, and the pipe a starting child reports on.

Everything is importable from here: ``namespaces.spawn(["hostname"], new={"uts"})``.

Man pages: namespaces(7), unshare(2), setns(2), pid_namespaces(7), user_namespaces(7).
Layer: kernel. Used by the notebooks and the tests; the runtime's init makes its own.
"""

from labkit.kernel.namespaces.child import Completed, Process
from labkit.kernel.namespaces.kinds import Comparison, Kind, compare, kinds, namespaces_of
from labkit.kernel.namespaces.nsenter import enter
from labkit.kernel.namespaces.unshare import IdMap, run, set_time_offsets, spawn, write_id_maps

__all__ = ["Comparison", "Completed", "IdMap", "Kind", "Process", "compare", "enter", "kinds", "namespaces_of",
           "run", "set_time_offsets", "spawn", "write_id_maps"]  # fmt: skip
