"""The lab in a real browser: `sudo make lab` on this host (vagrant/lab.sh), opened in
headless Chromium, notebook 02 run through the UI, its checks passing (tests/browser.py).

Notebook 02's solution goes into the lab's work folder in place of the student's copy, so
every check can pass. The same browser run against the course VM is in test_vm_vagrant.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from browser import run_notebook
from conftest import need_tool
from test_lab import Lab, processes_mentioning

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "02-namespaces-uts-ipc.ipynb"


def test_make_lab_runs_notebook_02_in_chromium():
    need_tool("chromium")
    need_tool("chromedriver")
    lab = Lab(lambda lab: ["bash", str(REPO / "vagrant" / "lab.sh")], env_extra={"LABKIT_LAB_IP": "127.0.0.1"})
    try:
        # lab.sh has copied the student's notebooks into work/ by now; the solution replaces 02
        shutil.copy(REPO / "solutions" / NOTEBOOK, lab.work / NOTEBOOK)
        try:
            run = run_notebook(f"http://127.0.0.1:{lab.port}", lab.token, NOTEBOOK, lab.dir / "chromium",
                               "browser-make-lab-02")
        except Exception:
            print(lab.log.read_text()[-4000:])  # the server's side of what went wrong
            raise
        print(f"\nnotebook 02 in Chromium against make lab: {run.seconds:.0f} s; screenshot {run.screenshot}; "
              f"dialogs: {run.dialogs}")
        assert run.errors == []
        assert run.executed == run.code_cells
        assert len(run.passed) == 3, run.passed  # exercises 02.1, 02.2, 02.3
        assert run.screenshot.stat().st_size > 10_000
    finally:
        left = lab.stop()
        shutil.rmtree(lab.dir, ignore_errors=True)
    assert left == []
    assert processes_mentioning(str(lab.dir)) == []  # no browser, driver or kernel is left
