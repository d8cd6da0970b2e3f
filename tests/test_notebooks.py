"""The notebook framework: generation of notebooks/ from solutions/, the check helpers,
the figures, the live cgroup monitor, and the proof that every check can fail.

The solutions themselves run under nbval from the test command
(pytest --nbval-lax ... solutions/); here the *student* notebooks run once, and every
cell that fails must be an exercise check or an exercise stub, and every check must fail.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from labkit.lab import checks, notebooks

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


# --- generation -------------------------------------------------------------------------

SOLUTION_CELL = '''# EXERCISE 99.2: do the thing
# HINT: call do_it()
def f():
    x = 1
    ### BEGIN SOLUTION
    # HINT: the inner hint stays
    return do_it(x)
    ### END SOLUTION
### BEGIN HIDDEN TESTS
assert secret()
### END HIDDEN TESTS
print("after")'''


def test_blank_code_stubs_the_region_keeps_the_rest():
    out = notebooks.blank_code(SOLUTION_CELL)
    assert "do_it(x)" not in out and "secret" not in out and "BEGIN" not in out
    assert "    # HINT: the inner hint stays\n" in out  # the region's hints, at its indentation
    stub = checks.stub_message("99.2", "call do_it()")
    assert f"    raise NotImplementedError({stub!r})" in out
    assert out.startswith("# EXERCISE 99.2") and out.endswith('print("after")')
    assert notebooks.exercise_ids(out) == ({"99.2"}, set())


def test_blank_code_refuses_bad_markers():
    with pytest.raises(ValueError, match="EXERCISE NN.M"):
        notebooks.blank_code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    with pytest.raises(ValueError, match="END SOLUTION"):
        notebooks.blank_code("# EXERCISE 01.1\n### BEGIN SOLUTION\nx = 1")


def test_notebooks_dir_is_up_to_date():
    res = subprocess.run([PY, "scripts/make_notebooks.py", "--check"], cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_generate_is_stable_and_clean(tmp_path):
    src, out = tmp_path / "solutions", tmp_path / "notebooks"
    src.mkdir()
    for nb in (REPO / "solutions").glob("0[23]-*.ipynb"):
        (src / nb.name).write_bytes(nb.read_bytes())
    first = notebooks.generate(src, out)
    assert {p.name for p in first} >= {"README.md", "02-namespaces-uts-ipc.ipynb"}
    assert notebooks.generate(src, out) == []  # nothing changes the second time
    assert notebooks.stale(src, out) == []
    student = json.loads((out / "02-namespaces-uts-ipc.ipynb").read_text())
    cells = student["cells"]
    assert cells[0]["metadata"]["labkit_nav"] == "top" and cells[-1]["metadata"]["labkit_nav"] == "bottom"
    assert "[03 " in "".join(cells[0]["source"]) and "(README.md)" in "".join(cells[0]["source"])
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert not any("BEGIN SOLUTION" in "".join(c["source"]) for c in code)
    assert any(c["metadata"].get("slideshow", {}).get("slide_type") == "slide" for c in cells)
    (out / "02-namespaces-uts-ipc.ipynb").write_text("{}")  # a hand edit is reported stale
    assert notebooks.stale(src, out) == [out / "02-namespaces-uts-ipc.ipynb"]


def test_a_notebooks_own_files_are_copied_and_kept_in_step(tmp_path):
    src, out = tmp_path / "solutions", tmp_path / "notebooks"
    (src / "02-files/ctx").mkdir(parents=True)
    (src / "02-namespaces-uts-ipc.ipynb").write_bytes((REPO / "solutions/02-namespaces-uts-ipc.ipynb").read_bytes())
    (src / "02-files/ctx/Containerfile").write_text("FROM busybox\n")
    (src / "02-files/old.txt").write_text("old\n")
    notebooks.generate(src, out)
    assert (out / "02-files/ctx/Containerfile").read_text() == "FROM busybox\n"
    assert notebooks.stale(src, out) == []
    (out / "02-files/ctx/Containerfile").write_text("FROM scratch\n")  # a hand edit is stale
    (src / "02-files/old.txt").unlink()  # and a file solutions/ dropped is an orphan
    assert notebooks.stale(src, out) == [out / "02-files/ctx/Containerfile", out / "02-files/old.txt"]
    notebooks.generate(src, out)
    assert not (out / "02-files/old.txt").exists() and notebooks.stale(src, out) == []


def test_notebook_10s_files_are_in_both_trees():
    source = REPO / "solutions/10-files/lecture"
    assert (source / "Dockerfile").read_text().lower().count("add ") >= 3  # the lecture's lowercase `add`
    assert (REPO / "notebooks/10-files/lecture/Dockerfile").read_text() == (source / "Dockerfile").read_text()


# --- check helpers ------------------------------------------------------------------------


def test_check_passes_and_fails_with_a_short_hint(capsys):
    checks.check("98.1", "one is one", lambda: len("a") == 1)  # ids without two-step hints
    assert "exercise 98.1: one is one" in capsys.readouterr().out
    with pytest.raises(checks.ExerciseFailed) as info:
        checks.check("98.2", "two is one", lambda: len("ab") == 1, hint="count again")
    lines = info.value._render_traceback_()
    assert lines[0].startswith("\u2718 exercise 98.2: two is one") and lines[-1] == "  hint: count again"
    assert info.value.outcome.status == "fail"


def test_a_missing_or_stubbed_exercise_is_todo():
    with pytest.raises(checks.ExerciseFailed) as info:
        checks.check("01.3", "defined", lambda: undefined_function())  # noqa: F821
    assert info.value.outcome.status == "todo"
    with pytest.raises(checks.ExerciseFailed) as info, checks.exercise("01.4", hint="h"):
        raise NotImplementedError(checks.stub_message("01.4", "h"))
    assert info.value.outcome.status == "todo" and "not done yet" in str(info.value)
    with pytest.raises(ValueError, match="NN.M"):
        checks.check("1.1", "bad id", lambda: True)


def test_value_of_reraises_what_the_child_raised():
    from labkit.kernel import namespaces

    def stub():
        raise NotImplementedError(checks.stub_message("02.3"))

    with pytest.raises(NotImplementedError, match="exercise 02.3"):
        checks.value_of(namespaces.run(stub))
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        checks.value_of(namespaces.run(lambda: 1 / 0))
    assert checks.value_of(namespaces.run(lambda: 42)) == 42


# --- figures --------------------------------------------------------------------------------


def test_figures_have_titles_labels_and_the_machine(tmp_path):
    from labkit.kernel import mounts, namespaces
    from labkit.lab import plots, timeline

    one_start = [timeline.Segment("client", 0, 30), timeline.Segment("namespaces", 30, 31.5),
                 timeline.Segment("exec", 31.5, 33)]  # fmt: skip
    made = [
        plots.lab_map(),
        plots.namespace_matrix({"a": namespaces.namespaces_of(), "b": namespaces.namespaces_of(os.getppid())}),
        plots.process_trees({"host": [(10, 1, "sh"), (11, 10, "sleep")], "inside": [(1, 0, "sh"), (2, 1, "sleep")]}),
        plots.mount_tables({"here": mounts.mountinfo()}),
        plots.timeseries({"x": ([0, 1], [2, 3])}, title="t", ylabel="y (%)", what="w"),
        plots.bar_panels({"start time (ms)": {"process": 1.5, "VM": 4000.0}}, title="t", what="w", log=True,
                         xlabel="what was started"),
        timeline.gantt({"labkit": [one_start, one_start], "runc": [one_start]}, title="t", what="w"),
    ]
    for fig in made:
        texts = [t.get_text() for t in fig.texts]
        assert fig._suptitle is not None and fig._suptitle.get_text()
        assert any(plots.machine() in t for t in texts), texts
        assert all(ax.get_xlabel() for ax in fig.axes)
    made[0].savefig(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 10_000
    assert plots.machine().startswith("Linux ") and "CPUs" in plots.machine()


# --- the live monitor, on a real cgroup ------------------------------------------------------


def test_monitor_reads_cpu_and_changes_limits_live():
    from labkit.kernel import cgroups
    from labkit.lab.widgets import Monitor, describe

    with cgroups.create(f"test-monitor-{os.getpid()}") as cg:
        busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
        try:
            cg.add(busy.pid)
            mon = Monitor(cg, interval=0.2)
            assert mon.poll().cpu_percent == 0.0  # no interval yet
            time.sleep(0.4)
            r = mon.poll()
            assert r.cpu_percent > 20, r  # a busy loop keeps (most of) a CPU busy
            assert r.pids == 1 and r.memory_bytes >= 0  # v1 leaves earlier pages charged where they were
            assert "CPU" in describe(r)["cpu"] and "MiB" in describe(r)["memory"]
            mon.apply(cpus=0.5, memory_mib=64)
            limits = cg.stats()
            assert limits.memory_limit == 64 * 1024 * 1024
            if cg.version == 1:
                quota = (cg.paths["cpu"] / "cpu.cfs_quota_us").read_text().strip()
                assert quota == "50000"
            else:
                assert (cg.path / "cpu.max").read_text().split()[0] == "50000"
            assert list(mon.series()) == ["CPU %", "memory MiB"]
        finally:
            busy.send_signal(signal.SIGKILL)
            busy.wait()


# --- the student notebooks fail exactly at their exercises ----------------------------------


def _expected_failures(nb_path: Path) -> dict[str, set[str]]:
    """'Cell N' -> exercise ids, for every code cell that must fail in a student notebook:
    each check cell, and each cell whose stub raises at the top level of the cell."""
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    out = {}
    for n, cell in enumerate(code):
        src = "".join(cell["source"])
        stubs, checked = notebooks.exercise_ids(src)
        top_level_stub = any(line.startswith("raise NotImplementedError(") for line in src.splitlines())
        if checked or (stubs and top_level_stub):
            out[f"Cell {n}"] = checked | stubs
    return out


def test_student_notebooks_fail_at_every_check_and_nowhere_else(tmp_path):
    report = tmp_path / "nbval.xml"
    cmd = [PY, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval-lax", "--nbval-current-env",
           "--nbval-cell-timeout=120", f"--junitxml={report}", "notebooks/"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert report.exists(), res.stdout[-2000:] + res.stderr[-2000:]
    failed: dict[str, set[str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            # classname "notebooks.02-namespaces-uts-ipc.ipynb" -> the notebook's stem
            stem = case.get("classname", "").removesuffix(".ipynb").rpartition(".")[2]
            failed.setdefault(stem, set()).add(case.get("name"))
    expected_ids = set()
    for nb_path in sorted((REPO / "notebooks").glob("[0-9][0-9]-*.ipynb")):
        must = _expected_failures(nb_path)
        assert must, f"{nb_path.name} has no exercise check"
        got = failed.get(nb_path.stem, set())
        assert got == set(must), f"{nb_path.name}: failed {sorted(got)}, expected {sorted(must)}"
        expected_ids |= set().union(*must.values())
    assert res.returncode != 0
    assert all(len(i.split(".")) == 2 for i in expected_ids)


def test_a_labkit_error_in_a_cell_is_one_line_not_a_traceback():
    """A student's bad value (here a memory limit) shows labkit's one line and hint."""
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance(colors='nocolor')\n"
        "import labkit.lab.checks\n"
        "assert labkit.lab.checks.install()\n"
        "shell.run_cell('from labkit.kernel import cgroups; cgroups.Limits.parse(memory=\"64XB\")')\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    out = (r.stdout + r.stderr).strip()
    assert "InvalidValue: invalid memory limit '64XB'" in out, out
    assert "Traceback" not in out and "limits.py" not in out, out


# --- hints in two steps: the idea first, the code only when asked --------------------------


def _solution_lines(source: str) -> set[str]:
    """The code lines of a cell's solution regions that would give the answer away."""
    out, inside = set(), False
    for line in source.splitlines():
        if notebooks.BEGIN in line:
            inside = True
        elif notebooks.END in line:
            inside = False
        elif inside:
            code = line.split("  #")[0].strip()
            if len(code) >= 12 and not code.startswith("#") and code not in ("else:", "while True:"):
                out.add(code)
    return out


def _leaks(lines: set[str], text: str) -> set[str]:
    return {line for line in lines if line in text}


def _exercise_cells() -> dict[str, tuple[str, str]]:
    """exercise id -> (solution cell source, the same cell in the student copy)."""
    out = {}
    for path in sorted((REPO / "solutions").glob("[0-9][0-9]-*.ipynb")):
        solved = notebooks.load(path)["cells"]
        student = notebooks.load(REPO / "notebooks" / path.name)["cells"]
        for cell, blank in zip(solved, student):
            ids, _ = notebooks.exercise_ids(notebooks._source(cell))
            if ids and notebooks.BEGIN in notebooks._source(cell):
                out[next(iter(ids))] = (notebooks._source(cell), notebooks._source(blank))
    return out


def test_leak_detector_finds_a_solution_line():  # the test below can fail
    lines = _solution_lines("# EXERCISE 09.1\n### BEGIN SOLUTION\nreturn os.stat(path).st_ino\n### END SOLUTION")
    assert _leaks(lines, "HINT: return os.stat(path).st_ino") == {"return os.stat(path).st_ino"}
    assert _leaks(lines, "read the inode of the link's target") == set()


def test_every_exercise_has_two_step_hints_and_neither_stub_nor_step_1_is_the_answer():
    from labkit.lab import hints

    cells = _exercise_cells()
    assert set(cells) == set(hints.HINTS), f"hints without exercise or exercise without hints: {set(cells) ^ set(hints.HINTS)}"
    for exercise_id, (solved, student) in cells.items():
        lines = _solution_lines(solved)
        assert lines, exercise_id
        h = hints.HINTS[exercise_id]
        assert not _leaks(lines, h.look + h.idea + hints.text(exercise_id, 1)), f"{exercise_id}: step 1 gives the code"
        assert not _leaks(lines, student), f"{exercise_id}: the student's stub gives the code"
        assert f"look at: {h.look}" in student and f"hint({exercise_id!r}, 2)" in student, student
        assert "# HINT:" not in solved, f"{exercise_id}: a '# HINT:' line in the solution (the stub would copy it)"
        assert h.code.strip() and "hint 2 of 2" in hints.text(exercise_id, 2)


def test_check_hints_are_not_the_answer_and_point_at_the_two_steps():
    cells = _exercise_cells()
    for path in sorted((REPO / "solutions").glob("[0-9][0-9]-*.ipynb")):
        for cell in notebooks.load(path)["cells"]:
            src = notebooks._source(cell)
            _, checked = notebooks.exercise_ids(src)
            for exercise_id in checked:
                given = " ".join(re.findall(r"hint=\"([^\"]*)\"|hint='([^']*)'", src)[0]) if "hint=" in src else ""
                assert not _leaks(_solution_lines(cells[exercise_id][0]), given), f"{exercise_id}: the check's hint is the code"
    with pytest.raises(checks.ExerciseFailed) as info:
        checks.check("04.1", "never", lambda: False, hint="think of peer groups")
    assert info.value.outcome.hint == "think of peer groups; hint('04.1') explains the idea"


def test_hint_shows_the_idea_then_the_code(capsys):
    from labkit.lab import hints

    hints.hint("04.1")
    first = capsys.readouterr().out
    assert "hint 1 of 2" in first and "mount_namespaces(7)" in first and "make_private" not in first
    hints.hint("04.1", 2)
    assert 'mounts.make_private("/")' in capsys.readouterr().out
    with pytest.raises(ValueError, match="1 \\(the idea\\) or 2"):
        hints.hint("04.1", 3)
    with pytest.raises(ValueError, match="exercise id"):
        hints.hint("99.9")


# --- every question has an answer in solutions/, none in the student copies ---------------


def test_every_question_has_an_answer_that_the_student_copy_leaves_out():
    for path in sorted((REPO / "solutions").glob("[0-9][0-9]-*.ipynb")):
        solved = [notebooks._source(c) for c in notebooks.load(path)["cells"]]
        student = [notebooks._source(c) for c in notebooks.load(REPO / "notebooks" / path.name)["cells"]]
        asked = next(i for i, s in enumerate(solved) if "## Questions to think about" in s)
        questions = re.findall(r"^\d+\. ", solved[asked].split("## Questions to think about")[1], re.M)
        answers = solved[asked + 1]
        assert answers.startswith("### Answers") and notebooks.BEGIN in answers, f"{path.name}: no answers after the questions"
        assert len(re.findall(r"^\d+\. ", answers, re.M)) == len(questions), f"{path.name}: not one answer per question"
        assert student[asked + 1] == "### Answers\n\n*Your answer here.*", f"{path.name}: {student[asked + 1][:80]!r}"
        assert not any(notebooks.BEGIN in s or notebooks.END in s for s in student), path.name


def test_blank_markdown_drops_the_answers_between_html_comment_markers():
    text = "### Answers\n\n<!-- BEGIN SOLUTION -->\n1. the secret\n<!-- END SOLUTION -->\nafter"
    assert notebooks.blank_markdown(text) == "### Answers\n\n*Your answer here.*\nafter"


# --- 00 and 01 promise notebooks: every promise is true ------------------------------------

_REF = re.compile(r"[Nn]otebooks? (\d\d)((?:, \d\d)*)(?: (?:to|and) (\d\d))?")


def _promises(text: str) -> tuple[set[int], set[int]]:
    """(notebook numbers that ``text`` refers to, those it says are in preparation).

    A reference is "notebook 02", "notebooks 08 to 13" (a range), or a number in the
    "notebooks" column of a table; it is marked when the rest of its sentence (up to the
    next full stop or closing parenthesis) says "in preparation"."""
    refs, preparing = set(), set()
    for m in _REF.finditer(text):
        first, more, last = int(m.group(1)), m.group(2), m.group(3)
        numbers = {first} | {int(n) for n in re.findall(r"\d\d", more or "")}
        if last:
            numbers |= set(range(first, int(last) + 1))
        refs |= numbers
        rest = re.sub(r"^\s*\([^)]*\)", "", text[m.end():])  # "notebooks 08 to 13 (network, ...) are"
        if "in preparation" in re.split(r"[.)]", rest, maxsplit=1)[0]:
            preparing |= numbers
    column = None
    for line in text.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if "notebooks" in cols:
            column = cols.index("notebooks")
        elif column is not None and len(cols) > column:
            refs |= {int(n) for n in re.findall(r"\b\d\d\b", cols[column])}
        elif not cols:
            column = None
    return refs, preparing


def test_promise_parser_sees_ranges_tables_and_marks():
    refs, preparing = _promises("notebook 02 shows it. Notebooks 08 to 10 (a, b) are in preparation.\n\n"
                                "| a | notebooks |\n|---|---|\n| x | 04, 11 |")
    assert refs == {2, 4, 8, 9, 10, 11} and preparing == {8, 9, 10}


def test_notebooks_00_and_01_promise_only_what_exists_or_is_in_preparation():
    existing = {int(p.name[:2]) for p in (REPO / "solutions").glob("[0-9][0-9]-*.ipynb")}
    for nb_path in sorted((REPO / "solutions").glob("0[01]-*.ipynb")):
        refs, preparing = set(), set()
        for cell in notebooks.load(nb_path)["cells"]:
            if cell["cell_type"] == "markdown":
                r, p = _promises(notebooks._source(cell))
                refs, preparing = refs | r, preparing | p
        missing = sorted(refs - existing - preparing)
        assert not missing, f"{nb_path.name} refers to notebooks {missing}: not in solutions/ nor marked in preparation"
        landed = sorted(preparing & existing)
        assert not landed, f"{nb_path.name} says notebooks {landed} are in preparation, but they exist: update it"
