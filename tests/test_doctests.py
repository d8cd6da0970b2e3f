"""The examples in labkit's docstrings are run as tests: a student who types one in gets
what it shows. (`>>>` lines marked ``# doctest: +SKIP`` need a running system: a
registry, a root shell.)"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import labkit


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(labkit.__path__, "labkit."):
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and spec.origin.endswith(".py") and ">>>" in open(spec.origin).read():
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules_with_examples())
def test_the_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail"
