"""The code students read stays clean: ruff (its rules are in pyproject.toml) and
shell scripts are checked in test_provision.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (requirements.txt has it)")
    r = subprocess.run([ruff, "check", "labkit", "tests", "bench", "scripts"], cwd=REPO,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout[-3000:]
