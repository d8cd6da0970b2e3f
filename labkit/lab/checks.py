"""Check cells for the notebooks' exercises: assert on the state a student's code left.

A check cell names its exercise by a stable id ("02.1" = notebook 02, exercise 1), so a
grade report can find it even when a student adds or moves cells (nbval names cells by
position, which is useless for that). Two forms, pick the one that reads better:

    check("02.1", "the child has its own UTS namespace",
          lambda: child_ns[Kind.UTS] != host_ns[Kind.UTS])

    with exercise("02.2", hint="spawn(..., new={'ipc'})"):
        assert child_ipc != host_ipc, "the child still shares the host's IPC namespace"

A check looks at kernel state (a namespace inode, a pid in cgroup.procs, a whiteout
file), never at printed output. On failure it shows one short hint instead of a
traceback (HTML in Jupyter, plain text elsewhere) and still fails the cell, so nbval and
the grader count it. The stubs in the student notebooks raise
``NotImplementedError("exercise 02.1 is not done yet ...")``; importing this module in a
notebook makes IPython render those as one line too.

How the short rendering works: IPython calls an exception's ``_render_traceback_()``
when it has one and shows the lines it returns in place of the traceback, and
``set_custom_exc`` lets us do the same for the built-in NotImplementedError.

Layer: lab. Used by the notebooks in solutions/ and notebooks/, and by labkit.lab.grading.
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from labkit.errors import LabkitError

EXERCISE_ID = re.compile(r"^\d{2}\.\d{1,2}$")  # "02.1": notebook number, exercise number
STUB_PREFIX = "exercise "  # the stubs' NotImplementedError messages start with this
_PASS, _FAIL, _TODO = "\u2714", "\u2718", "\u270e"  # check mark, cross, pencil


@dataclass(frozen=True)
class Outcome:
    """What one check found; ``status`` is "pass", "fail" or "todo" (stub not filled)."""

    exercise: str
    what: str
    status: str
    detail: str = ""
    hint: str = ""

    def text(self) -> str:
        mark = {"pass": _PASS, "fail": _FAIL, "todo": _TODO}[self.status]
        line = f"{mark} exercise {self.exercise}: {self.what}"
        if self.status == "pass":
            return line
        lines = [line]
        if self.detail:
            lines.append(f"  {self.detail}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class ExerciseFailed(LabkitError, AssertionError):
    """A check did not hold. Renders as its hint lines, not as a traceback."""

    def __init__(self, outcome: Outcome, *, shown: bool = False) -> None:
        LabkitError.__init__(self, outcome.text(), hint=outcome.hint)
        self.outcome = outcome
        self.shown = shown  # True when the hint is already on screen as HTML

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead
        if self.shown:  # one line under the HTML box, so the hint is not shown twice
            return [f"ExerciseFailed: exercise {self.outcome.exercise} ({self.outcome.status})"]
        return str(self).splitlines()


def _validate_id(exercise_id: str) -> None:
    if not EXERCISE_ID.match(exercise_id):
        from labkit.errors import InvalidValue

        raise InvalidValue("exercise id", exercise_id, "NN.M, e.g. '02.1'")


def _in_jupyter() -> bool:
    shell = _ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _ipython() -> Any:
    if "IPython" not in sys.modules:  # never import IPython just to ask
        return None
    from IPython import get_ipython

    return get_ipython()


def _show(outcome: Outcome) -> bool:
    """Show the outcome; True if a failure went out as HTML (Jupyter only)."""
    if outcome.status == "pass":
        print(outcome.text())
        return False
    if _in_jupyter():
        from IPython.display import HTML, display

        colour = "#b00020" if outcome.status == "fail" else "#8a6d00"
        body = "<br>".join(html.escape(line) for line in outcome.text().splitlines())
        display(HTML(f'<div style="border-left:4px solid {colour};padding:4px 8px">{body}</div>'))
        return True
    return False


def _not_done(err: BaseException) -> bool:
    """Did this come from an untouched stub (or a name the stub never defined)?"""
    if isinstance(err, NotImplementedError):
        return True
    return isinstance(err, NameError)


def _outcome_from_error(exercise_id: str, what: str, err: BaseException, hint: str) -> Outcome:
    hint = _more(exercise_id, hint)
    if _not_done(err):
        detail = "not done yet" if isinstance(err, NotImplementedError) else f"not done yet ({err})"
        return Outcome(exercise_id, what, "todo", detail, hint)
    if isinstance(err, AssertionError):
        return Outcome(exercise_id, what, "fail", str(err) or "the check did not hold", hint)
    detail = f"{type(err).__name__}: {err}"
    return Outcome(exercise_id, what, "fail", detail, hint)


def check(exercise_id: str, what: str, condition: Callable[[], Any], *, hint: str = "") -> None:
    """Run ``condition()``; pass when it returns a true value, fail the cell otherwise.

    ``what`` says, in one line, what must be true. Any exception inside ``condition``
    (a NameError because the exercise cell was not run, an OSError from a /proc file
    that is gone) fails the check with that one line, never a traceback.
    """
    _validate_id(exercise_id)
    try:
        result = condition()
    except Exception as err:  # noqa: BLE001 - every failure becomes a hint
        outcome = _outcome_from_error(exercise_id, what, err, hint)
    else:
        status = "pass" if result else "fail"
        outcome = Outcome(exercise_id, what, status, "" if result else "it is not true yet", _more(exercise_id, hint))
    shown = _show(outcome)
    if outcome.status != "pass":
        raise ExerciseFailed(outcome, shown=shown)


@contextmanager
def exercise(exercise_id: str, what: str = "", *, hint: str = "") -> Iterator[None]:
    """A block of asserts for one exercise: any failure inside becomes one hint."""
    _validate_id(exercise_id)
    label = what or "all checks hold"
    try:
        yield
    except Exception as err:  # noqa: BLE001
        outcome = _outcome_from_error(exercise_id, label, err, hint)
        raise ExerciseFailed(outcome, shown=_show(outcome)) from None
    outcome = Outcome(exercise_id, label, "pass")
    _show(outcome)


def value_of(completed: Any) -> Any:
    """The return value of a function that ran in a child (``namespaces.run(f).value``).

    When the function raised in the child, its traceback went to the child's stderr and
    the value is None: re-raise here, in one line, so the check can say what happened
    (a stub's NotImplementedError counts as "not done yet").
    """
    if completed.returncode == 0:
        return completed.value
    lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"the child exited with status {completed.returncode}"
    if last.startswith("NotImplementedError"):
        raise NotImplementedError(last.partition(": ")[2])
    raise AssertionError(f"in the child: {last}")


def stub_message(exercise_id: str, look: str = "") -> str:
    """The message a student notebook's stub raises (make_notebooks writes it): where to
    look, never what to type."""
    msg = f"{STUB_PREFIX}{exercise_id} is not done yet: write your code here"
    return f"{msg} (look at: {look})" if look else msg


def _more(exercise_id: str, hint: str) -> str:
    """A check's hint, plus how to ask for the two-step hints when the exercise has them."""
    from labkit.lab.hints import HINTS

    if exercise_id not in HINTS:
        return hint
    more = f"hint({exercise_id!r}) explains the idea"
    return f"{hint}; {more}" if hint else more


def _render_stub(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> Any:
    """IPython's custom handler for NotImplementedError: one line for our stubs."""
    message = str(value)
    if message.startswith(STUB_PREFIX):
        lines = [f"{_TODO} {message}"]
        if _in_jupyter():
            from IPython.display import HTML, display

            display(HTML(f'<div style="border-left:4px solid #8a6d00;padding:4px 8px">{html.escape(lines[0])}</div>'))
        return lines
    return shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)


def _render_labkit_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> Any:
    """A LabkitError is a mistake labkit explains itself (a bad limit, a missing image, a
    refused mount): show its one line and hint, not the traceback through labkit."""
    render = getattr(value, "_render_traceback_", None)
    if render is not None:  # ExerciseFailed draws itself
        return render()
    return [f"{type(value).__name__}: {value.one_line()}"]  # type: ignore[attr-defined]


def install() -> bool:
    """Make IPython show the stubs' NotImplementedError and labkit's own errors as one
    line each. True if installed."""
    shell = _ipython()
    if shell is None:
        return False

    def handler(shell_: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> Any:
        render = _render_labkit_error if isinstance(value, LabkitError) else _render_stub
        stb = render(shell_, etype, value, tb, tb_offset)
        # The ZMQ shell sends what we return as the error's traceback: nbval still sees
        # an error, so the cell fails, but the student reads one line.
        shell_._showtraceback(etype, value, stb)

    shell.set_custom_exc((NotImplementedError, LabkitError), handler)
    return True


install()
