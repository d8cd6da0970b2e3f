"""labkit: build a container from the kernel up.

The package mirrors Docker's own stack, one layer per folder, each importing only
the layers below it:

- ``labkit.kernel``: the kernel's primitives (namespaces, cgroups, overlayfs, links).
- ``labkit.runtime``: one container from a spec, like runc.
- ``labkit.engine``: images and many containers, like containerd and dockerd.
- ``labkit.lab``: the course: doctor, the VM, checks, plots, widgets, grading.
- ``labkit.cli``: the ``labkit`` command, like the docker CLI.

Importing labkit is cheap on purpose: nothing heavy (matplotlib, pyroute2, numpy,
ipywidgets) loads until a function that needs it runs.
"""

__version__ = "0.1.0"
