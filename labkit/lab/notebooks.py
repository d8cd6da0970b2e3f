"""Student notebooks from the solution notebooks: blank the exercises, add navigation.

``solutions/NN-title.ipynb`` is the only source. Exercise code in it sits between two
marker lines, nbgrader's convention:

    # EXERCISE 02.1: give the child its own UTS namespace
    ### BEGIN SOLUTION
    child = namespaces.run(["hostname"], new={"uts"}, hostname="box")
    ### END SOLUTION

``generate()`` writes ``notebooks/NN-title.ipynb`` with each region replaced by a stub
that raises ``NotImplementedError("exercise 02.1 is not done yet ... (look at: ...)")``,
outputs and execution counts cleared. Where to look comes from labkit.lab.hints (whose
``hint("02.1")`` and ``hint("02.1", 2)`` give the idea, then code); an exercise that
has no entry there uses the cell's first ``# HINT:`` line instead.
Regions between ``BEGIN HIDDEN TESTS`` and ``END HIDDEN TESTS`` are dropped. It also
writes the navigation (previous / contents / next) as the first and last cell of every
notebook, in solutions/ too so both agree, a contents page ``README.md`` in both
folders, and RISE slide metadata for headings. The JSON is written the way nbformat
writes it (sorted keys, one-space indent), and a file is only rewritten when its text
changes, so git shows no diff when nothing changed.

Layer: lab. Called by scripts/make_notebooks.py and by the code that copies notebooks
into a student's work folder (which this module never touches).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.errors import InvalidValue

NOTEBOOK_NAME = re.compile(r"^(\d{2})-[a-z0-9-]+\.ipynb$")
BEGIN, END = "BEGIN SOLUTION", "END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
EXERCISE_LINE = re.compile(r"#\s*EXERCISE\s+(\d{2}\.\d{1,2})\b", re.IGNORECASE)
HINT_LINE = re.compile(r"^\s*#\s*HINT:\s*(.+?)\s*$")
CHECK_CALL = re.compile(r"\b(?:check|exercise)\(\s*[\"'](\d{2}\.\d{1,2})[\"']")
STUB_CALL = re.compile(r"NotImplementedError\(\s*[\"']exercise (\d{2}\.\d{1,2})\b")
FILES_DIR = re.compile(r"^(\d{2})-files$")  # a notebook's own files (a build context), copied as they are
NAV_KEY = "labkit_nav"  # cell metadata marking a generated navigation cell
CONTENTS = "README.md"
STUDENT_METADATA = ("slideshow", "tags", NAV_KEY)  # cell metadata a student copy keeps


@dataclass(frozen=True)
class Entry:
    """One notebook of the course, as the contents page lists it."""

    number: str
    name: str  # file name
    title: str  # the H1, without '# '
    summary: str  # the first sentence after the title


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _lines(text: str) -> list[str]:
    """nbformat's on-disk form of a source: a list of lines, each keeping its newline."""
    return text.splitlines(keepends=True)


def exercise_ids(source: str) -> tuple[set[str], set[str]]:
    """(ids of exercises with a solution region or a stub, ids that a check names)."""
    exercises = set()
    if BEGIN in source or STUB_CALL.search(source):
        exercises = set(EXERCISE_LINE.findall(source)) | set(STUB_CALL.findall(source))
    return exercises, set(CHECK_CALL.findall(source))


def _stub(exercise_id: str, indent: str, hints: list[str], first_hint: str) -> list[str]:
    """The lines that replace a solution region. For an exercise with two-step hints in
    labkit.lab.hints the message names only where to look, and a comment says how to
    ask for the hints; the idea and the code stay out of the notebook's text."""
    from labkit.lab import hints as two_step
    from labkit.lab.checks import stub_message

    out = [f"{indent}# YOUR CODE HERE\n"]
    out += [f"{indent}# HINT: {h}\n" for h in hints]
    if exercise_id in two_step.HINTS:
        first_hint = two_step.HINTS[exercise_id].look
        out.append(f"{indent}# stuck? hint({exercise_id!r}) explains the idea, hint({exercise_id!r}, 2) shows code\n")
    out.append(f"{indent}raise NotImplementedError({stub_message(exercise_id, first_hint)!r})\n")
    return out


def blank_code(source: str, where: str = "") -> str:
    """A code cell's source with its solution regions stubbed and hidden tests removed."""
    if BEGIN not in source and BEGIN_HIDDEN not in source:
        return source
    ids = EXERCISE_LINE.findall(source)
    if BEGIN in source and len(set(ids)) != 1:
        raise InvalidValue(f"exercise cell {where}", source.splitlines()[0][:60],
                           "exactly one '# EXERCISE NN.M' line in a cell with a solution region")
    hints = [m.group(1) for m in map(HINT_LINE.match, source.splitlines()) if m]
    first_hint = hints[0] if hints else ""
    out: list[str] = []
    region: str | None = None  # None, "solution" or "hidden"
    region_hints: list[str] = []
    indent = ""
    for line in _lines(source):
        if region is None and BEGIN in line:
            region, region_hints = "solution", []
            indent = line[: len(line) - len(line.lstrip())]
        elif region is None and BEGIN_HIDDEN in line:
            region = "hidden"
        elif region == "solution" and END in line:
            out += _stub(ids[0], indent, region_hints, first_hint)
            region = None
        elif region == "hidden" and END_HIDDEN in line:
            region = None
        elif region == "solution":
            m = HINT_LINE.match(line)
            if m:
                region_hints.append(m.group(1))
        elif region is None:
            out.append(line)
    if region is not None:
        raise InvalidValue(f"cell {where}", source.splitlines()[0][:60], f"a closing '{END}' line")
    return "".join(out).rstrip("\n")


def blank_markdown(source: str) -> str:
    """Answers in markdown cells (between the same markers) become a prompt."""
    if BEGIN not in source:
        return source
    out, inside = [], False
    for line in _lines(source):
        if BEGIN in line:
            inside = True
            out.append("*Your answer here.*\n")
        elif END in line:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out).rstrip("\n")


def _title(nb: dict, path: Path) -> tuple[str, str]:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown" and NAV_KEY not in cell.get("metadata", {}):
            text = _source(cell).strip()
            if text.startswith("# "):
                first, _, rest = text.partition("\n")
                summary = rest.strip().split("\n\n")[0].replace("\n", " ")
                summary = re.split(r"(?<=[.!?])\s", summary)[0] if summary else ""
                return first[2:].strip(), summary
    raise InvalidValue("notebook", str(path), "a first markdown cell that starts with '# Title'")


def _label(e: Entry) -> str:
    return e.title if e.title.startswith(e.number) else f"{e.number} {e.title}"


def _nav(entries: list[Entry], i: int, where: str) -> dict:
    parts = []
    if i > 0:
        parts.append(f"[\u2190 {_label(entries[i - 1])}]({entries[i - 1].name})")
    parts.append(f"[Contents]({CONTENTS})")
    if i + 1 < len(entries):
        parts.append(f"[{_label(entries[i + 1])} \u2192]({entries[i + 1].name})")
    return {
        "cell_type": "markdown",
        "id": f"nav-{where}",
        "metadata": {NAV_KEY: where, "slideshow": {"slide_type": "skip"}},
        "source": _lines(" | ".join(parts)),
    }


def _slide_type(cell: dict) -> None:
    """Headings start slides (RISE / jupyterlab_rise); an author's own choice wins."""
    meta = cell.setdefault("metadata", {})
    if cell["cell_type"] != "markdown" or "slideshow" in meta:
        return
    text = _source(cell).lstrip()
    if text.startswith(("# ", "## ")):
        meta["slideshow"] = {"slide_type": "slide"}
    elif text.startswith("### "):
        meta["slideshow"] = {"slide_type": "subslide"}


def _with_nav(nb: dict, entries: list[Entry], i: int) -> dict:
    cells = [c for c in nb["cells"] if NAV_KEY not in c.get("metadata", {})]
    for cell in cells:
        _slide_type(cell)
        cell["source"] = _lines(_source(cell))
    nb = dict(nb, cells=[_nav(entries, i, "top"), *cells, _nav(entries, i, "bottom")])
    return nb


def _student(nb: dict, name: str) -> dict:
    cells = []
    for n, cell in enumerate(nb["cells"]):
        src = _source(cell)
        meta = {k: v for k, v in cell.get("metadata", {}).items() if k in STUDENT_METADATA}
        new = {"cell_type": cell["cell_type"], "id": cell.get("id", f"cell-{n}"), "metadata": meta}
        if cell["cell_type"] == "code":
            new |= {"execution_count": None, "outputs": [], "source": _lines(blank_code(src, f"{name}#{n}"))}
        elif cell["cell_type"] == "markdown":
            new["source"] = _lines(blank_markdown(src))
        else:
            new["source"] = _lines(src)
        cells.append(new)
    meta = {k: v for k, v in nb.get("metadata", {}).items() if k in ("kernelspec", "language_info")}
    if "language_info" in meta:
        meta["language_info"] = {"name": meta["language_info"].get("name", "python")}
    return {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}


def dumps(nb: dict) -> str:
    """Notebook JSON exactly as nbformat writes it: stable, so git sees no diff."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False, separators=(",", ": ")) + "\n"


def _contents(entries: list[Entry], student: bool) -> str:
    lines = ["# labkit: the notebooks", ""]
    lines.append("Work through them in order: each one builds on the one before."
                 if student else "The complete notebooks, with every exercise solved.")
    lines += ["Run each check cell after your exercise: it tells you what is still missing.", ""]
    lines += ["| # | notebook | what it is about |", "|---|---|---|"]
    lines += [f"| {e.number} | [{e.title}]({e.name}) | {e.summary} |" for e in entries]
    lines += ["", "Generated by `make notebooks` from `solutions/`; edit the solutions, not this page.", ""]
    return "\n".join(lines)


def plan(src_dir: Path | str, out_dir: Path | str) -> dict[Path, str]:
    """Every file ``generate`` would write, with its text (solutions/ included)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    paths = sorted(p for p in src_dir.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
    loaded = [(p, json.loads(p.read_text())) for p in paths]
    entries = [Entry(p.name[:2], p.name, *_title(nb, p)) for p, nb in loaded]
    files: dict[Path, str] = {}
    for i, (path, nb) in enumerate(loaded):
        full = _with_nav(nb, entries, i)
        files[path] = dumps(full)
        files[out_dir / path.name] = dumps(_student(full, path.name))
    files[src_dir / CONTENTS] = _contents(entries, student=False)
    files[out_dir / CONTENTS] = _contents(entries, student=True)
    for path in _own_files(src_dir):
        files[out_dir / path.relative_to(src_dir)] = path.read_text()
    return files


def _own_files(top: Path) -> list[Path]:
    """The files in ``top``'s ``NN-files/`` folders (text only), which a notebook reads."""
    return sorted(p for d in top.iterdir() if d.is_dir() and FILES_DIR.match(d.name)
                  for p in d.rglob("*") if p.is_file())  # fmt: skip


def _orphans(out_dir: Path, files: dict[Path, str]) -> list[Path]:
    out = Path(out_dir)
    notebooks = [p for p in out.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name)]
    return [p for p in notebooks + (_own_files(out) if out.is_dir() else []) if p not in files]


def stale(src_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Files that differ from what ``generate`` would write, plus orphans in out_dir."""
    files = plan(src_dir, out_dir)
    out = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    return sorted(out + _orphans(Path(out_dir), files))


def generate(src_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Write the student notebooks and both contents pages; returns the files changed.

    A notebook's folder ``NN-files/`` is copied as it is. Notebooks in ``out_dir`` whose
    solution is gone are removed (only ``NN-*.ipynb``), and so are files of its ``NN-files/``
    folders that solutions/ no longer has.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    changed = []
    files = plan(src_dir, out_dir)
    for path, text in files.items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    for orphan in _orphans(Path(out_dir), files):
        orphan.unlink()
        changed.append(orphan)
    return changed


def load(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
