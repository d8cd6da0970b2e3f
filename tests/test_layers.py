"""Each layer only imports the layers below it: kernel < runtime < engine < lab < cli.

Every module of the package is read as source (nothing is imported), and every import
in it counts: at the top, inside a function, ``importlib.import_module("...")``, and any
string that is a whole dotted labkit module name (the daemon's PRELOAD, the CLI's
command table). ``labkit``, ``labkit.errors``, ``labkit.paths`` and ``labkit.poll`` are
below every layer; ``labkit.__main__`` is above them all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

LAYERS = {"kernel": 1, "runtime": 2, "engine": 3, "lab": 4, "cli": 5}
BASE = {"labkit", "labkit.errors", "labkit.paths", "labkit.poll"}
_MODULE_NAME = re.compile(r"labkit(\.[A-Za-z_][A-Za-z0-9_]*)+")


def rank(module: str) -> int:
    if module in BASE:
        return 0
    if module == "labkit.__main__":
        return max(LAYERS.values()) + 1
    return LAYERS[module.split(".")[1]]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, labkit module) for every import and import string in ``source``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .limits import X, from . import v1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # from labkit import paths
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            found.append((node.lineno, node.value))  # importlib.import_module("..."), PRELOAD, COMMANDS
    return [(line, name) for line, name in found if name == "labkit" or name.startswith("labkit.")]


def known(name: str, modules: set[str]) -> str | None:
    """``name`` if it is a module of the package; for ``from pkg import attr``, the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def upward_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    modules = set(sources)
    bad = []
    for module, (source, is_package) in sorted(sources.items()):
        for line, name in imported(source, module, is_package):
            target = known(name, modules)
            if target is not None and rank(target) > rank(module):
                bad.append(f"{module}:{line} imports {target} (a layer above it)")
    return sorted(set(bad))


def package_sources() -> dict[str, tuple[str, bool]]:
    files = sorted((REPO / "labkit").rglob("*.py"))
    return {module_name(f): (f.read_text(), f.name == "__init__.py") for f in files}


def test_every_module_has_a_layer():
    for module in package_sources():
        rank(module)  # a KeyError names a folder that is in no layer


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(package_sources()) == []


@pytest.mark.parametrize("line", [
    "from labkit.cli import dispatch",  # at the top
    "def f():\n    from labkit.engine import daemon",  # inside a function
    "import importlib\nimportlib.import_module('labkit.lab.checks')",  # a string
    "PRELOAD = ('json', 'labkit.cli.containers')",
])  # fmt: skip
def test_the_check_sees_every_kind_of_upward_import(line):
    sources = package_sources()
    sources["labkit.kernel.probe"] = (line, False)
    where = {b.split(" imports ")[0] for b in upward_imports(sources)}
    assert where == {f"labkit.kernel.probe:{line.count(chr(10)) + 1}"}
