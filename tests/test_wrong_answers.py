"""Every check catches plausible mistakes: the wrong answers in tests/wrong_answers.py.

For each notebook, variant k puts the k-th wrong answer of *every* exercise of that
notebook into its solution region at once (an exercise with fewer wrong answers keeps
its last one), runs the notebook up to its last check in a fresh Jupyter kernel
(nbclient, the same machinery nbval uses), and asserts:
- every exercise check reports a failure (a cross, not "not done yet", not a crash),
  with its one-line hint;
- no other cell raised (a wrong answer may not break the lesson around it);
- the machine is unchanged: the hostname, our own ``/`` propagation and mount count,
  no labkit cgroup of the notebooks left.
Grouping the wrong answers this way keeps the whole test at a few notebook runs
(about 2 minutes on 2 cores) instead of one run per wrong answer.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from labkit.lab import notebooks
from wrong_answers import WRONG

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "solutions"
CELL_TIMEOUT = 120  # seconds: the slowest check (07.1, HOG) takes a few


def _notebook(number: str) -> Path:
    return next(SOLUTIONS.glob(f"{number}-*.ipynb"))


def _regions(lines: list[str]) -> list[tuple[int, int]]:
    """(begin, end) line numbers of each solution region, in order."""
    out, begin = [], None
    for i, line in enumerate(lines):
        if notebooks.BEGIN in line:
            begin = i
        elif notebooks.END in line and begin is not None:
            out.append((begin, i))
            begin = None
    return out


def _answer_regions(answer: str | tuple) -> tuple:
    """A wrong answer is a string (for the cell's first region) or a tuple with one entry
    per region: code, or None to keep that region's solution."""
    return (answer,) if isinstance(answer, str) else answer


def _replace_regions(source: str, answer: str | tuple) -> str:
    """``source`` with its solution regions replaced by ``answer``, each at its indentation."""
    lines = source.splitlines()
    regions = _regions(lines)
    codes = _answer_regions(answer)
    assert len(codes) <= len(regions), f"{len(codes)} answers for {len(regions)} solution regions"
    for (begin, end), code in reversed(list(zip(regions, codes))):
        if code is None:
            continue
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        lines[begin : end + 1] = [indent + line if line else line for line in code.splitlines()]
    return "\n".join(lines)


def _first_line(answer: str | tuple) -> str:
    return next(c for c in _answer_regions(answer) if c is not None).splitlines()[0]


def _variants(number: str) -> list[dict[str, str]]:
    ids = sorted(i for i in WRONG if i.startswith(number + "."))
    most = max(len(WRONG[i]) for i in ids)
    return [{i: WRONG[i][min(k, len(WRONG[i]) - 1)] for i in ids} for k in range(most)]


def _cases() -> list:
    numbers = sorted({i[:2] for i in WRONG})
    return [pytest.param(n, k, v, id=f"{n}-wrong{k + 1}") for n in numbers for k, v in enumerate(_variants(n))]


def test_every_exercise_has_two_wrong_answers():
    exercises = set()
    for path in SOLUTIONS.glob("[0-9][0-9]-*.ipynb"):
        for cell in notebooks.load(path)["cells"]:
            if cell["cell_type"] == "code":
                exercises |= notebooks.exercise_ids(notebooks._source(cell))[0]
    assert exercises, "no exercises found"
    short = sorted(i for i in exercises if len(WRONG.get(i, [])) < 2)
    assert not short, f"exercises with fewer than two wrong answers: {short}"
    assert set(WRONG) <= exercises, f"wrong answers for no exercise: {sorted(set(WRONG) - exercises)}"


def test_every_solution_region_has_a_wrong_answer():
    """A cell with two regions (07.4: pause and resume) needs a wrong answer in each."""
    missing = []
    for path in SOLUTIONS.glob("[0-9][0-9]-*.ipynb"):
        for cell in notebooks.load(path)["cells"]:
            source = notebooks._source(cell)
            ids = notebooks.exercise_ids(source)[0] if cell["cell_type"] == "code" else set()
            for exercise_id in ids:
                n = len(_regions(source.splitlines()))
                covered = {k for a in WRONG.get(exercise_id, []) for k, c in enumerate(_answer_regions(a)) if c is not None}
                missing += [f"{exercise_id} region {k + 1}" for k in range(n) if k not in covered]
    assert not missing, f"solution regions no wrong answer replaces: {missing}"


def test_a_tuple_replaces_each_region_and_none_keeps_one():
    src = "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n" \
          "def g():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION"
    assert _replace_regions(src, "return 9") == "def f():\n    return 9\ndef g():\n    ### BEGIN SOLUTION\n" \
                                                "    return 2\n    ### END SOLUTION"
    assert _replace_regions(src, (None, "return 8")).endswith("def g():\n    return 8")


def _machine_state() -> dict:
    with open("/proc/self/mountinfo") as f:
        table = f.read().splitlines()
    root = next(line for line in table if line.split()[4] == "/")
    from labkit.kernel import cgroups

    return {"hostname": socket.gethostname(), "root propagation": root.split(" - ")[0].split()[6:],
            "/etc/motd": Path("/etc/motd").read_bytes() if Path("/etc/motd").exists() else None,
            "cgroups": sorted(n for n in cgroups.list_all() if re.match(r"nb0\d", n)),
            "network": _network_state()}


def _network_state() -> dict:
    """The notebooks' namespaces, host links and nftables tables (08: labkit-nb08*, lk8-*)."""
    from labkit.kernel import network as net

    return {"namespaces": sorted(n for n in net.namespaces() if n.startswith("labkit-nb0")),
            "links": sorted(n for n in os.listdir("/sys/class/net") if n.startswith("lk8-")),
            "tables": sorted(t for t in net.tables() if t.startswith("labkit-nb0")),
            "ip_forward": net.forwarding()}


@pytest.mark.parametrize("number, k, answers", _cases())
def test_checks_fail_on_wrong_answers(number, k, answers):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(_notebook(number), as_version=4)
    checks: dict[int, set[str]] = {}
    for n, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        ids, checked = notebooks.exercise_ids(cell.source)
        if ids & set(answers):
            cell.source = _replace_regions(cell.source, answers[next(iter(ids))])
        if checked:
            checks[n] = checked
    assert set().union(*checks.values()) >= set(answers), "an exercise without a check cell"
    nb.cells = nb.cells[: max(checks) + 1]  # nothing after the last check is needed
    before = _machine_state()
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(SOLUTIONS)}})
    client.execute(env={**os.environ, "LABKIT_QUICK": "1"})

    problems = []
    for n, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if n in checks:
            for exercise_id in sorted(checks[n]):
                if not errors:
                    problems.append(f"{exercise_id}: the check PASSED with {_first_line(answers[exercise_id])!r}")
                elif errors[0]["ename"] != "ExerciseFailed" or not errors[0]["evalue"].startswith("\u2718"):
                    problems.append(f"{exercise_id}: the check did not report a failure but "
                                    f"{errors[0]['ename']}: {errors[0]['evalue'][:200]}")
                elif "hint:" not in errors[0]["evalue"]:
                    problems.append(f"{exercise_id}: the failure gives no hint")
        elif errors:
            problems.append(f"cell {n} (no check) raised {errors[0]['ename']}: {errors[0]['evalue'][:200]}")
    after = _machine_state()
    assert after == before, f"the machine changed: {before} -> {after}"
    assert not problems, "\n".join(problems)
