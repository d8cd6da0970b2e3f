"""A student's browser, for the tests: headless Chromium driven through selenium.

The lab is only proven to work when a real browser opens it: JupyterLab is a JavaScript
application, and a server that answers HTTP can still show a student a blank page. So this
opens the lab's URL with its token, opens a notebook, runs all its cells from the Run menu
(as a student clicks), saves it from the File menu, and reads the saved notebook back
through Jupyter's contents API: every code cell ran, and every check cell printed its
check mark. A screenshot of the page is kept as the test's artifact.

Debian's `chromium` and `chromium-driver`; selenium speaks WebDriver to chromedriver.
Used by tests/test_browser.py (the host's `make lab`) and tests/test_vm_vagrant.py (the VM).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots; git ignores it
PASS_MARK = "\u2714 exercise "  # what labkit.lab.checks prints for a check that passed
FAIL_MARKS = ("\u2718 exercise ", "\u270e exercise ")  # failed, not done


@dataclass(frozen=True)
class NotebookRun:
    """What the browser's run of one notebook left in the saved file."""

    code_cells: int
    executed: int
    passed: list[str]  # the check lines that passed
    errors: list[str]  # "cell N: ename: evalue" for each error output, and failed checks
    dialogs: list[str]  # the titles of dialogs JupyterLab showed (and the test closed)
    screenshot: Path
    seconds: float


def _saved_notebook(base: str, token: str, path: str) -> dict:
    req = urllib.request.Request(f"{base}/api/contents/{path}?content=1", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as reply:
        return json.loads(reply.read())["content"]


def _kernel_states(base: str, token: str) -> list[str]:
    """Each running kernel's state: starting, busy, idle."""
    req = urllib.request.Request(f"{base}/api/kernels", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as reply:
        return [k["execution_state"] for k in json.loads(reply.read())]


def _kernel_busy(base: str, token: str) -> bool:
    return any(state != "idle" for state in _kernel_states(base, token))


def _summarise(nb: dict) -> tuple[int, int, list[str], list[str]]:
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    passed, errors = [], []
    for n, cell in enumerate(code, 1):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/html", ""))
            passed += [line for line in text.splitlines() if line.startswith(PASS_MARK)]
            if out["output_type"] == "error":
                errors.append(f"cell {n}: {out['ename']}: {out['evalue']}")
            errors += [f"cell {n}: {m}" for m in FAIL_MARKS if m in text]
    return len(code), sum(1 for c in code if c.get("execution_count")), passed, errors


def _dismiss_dialogs(driver) -> list[str]:
    """Close JupyterLab's modal dialogs (they would take the next click); their titles."""
    from selenium.webdriver.common.by import By

    seen = []
    for dialog in driver.find_elements(By.CSS_SELECTOR, "dialog.jp-Dialog"):
        seen.append(dialog.get_attribute("aria-label") or "a dialog")
        buttons = dialog.find_elements(By.CSS_SELECTOR, "button.jp-Dialog-button")
        if buttons:
            buttons[-1].click()
    return seen


def _click_menu(driver, menu: str, item: str) -> None:
    """Open a menu of JupyterLab's menu bar and click one of its commands."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    wait.until(ready.element_to_be_clickable(
        (By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel') and text()='{menu}']"))).click()
    wait.until(ready.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-Menu-item')][.//div[contains(@class,'lm-Menu-itemLabel') "
                   f"and text()='{item}']]"))).click()


def run_notebook(base: str, token: str, path: str, profile: Path, shot_name: str,
                 timeout: float = 600) -> NotebookRun:
    """Open `path` in the lab at `base` in headless Chromium, Run > Run All Cells, save it,
    and return what the saved file says. The browser is gone when this returns."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{shot_name}.png"
    started = time.monotonic()
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.set_page_load_timeout(120)
        driver.get(f"{base}/lab/tree/{path}?token={token}")
        wait = WebDriverWait(driver, 180)
        # the notebook is open, and its kernel has started and waits for code
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")))
        wait.until(lambda d: _kernel_states(base, token) == ["idle"])
        time.sleep(2)  # let the kernel's status reach the page too
        dialogs = _dismiss_dialogs(driver)
        _click_menu(driver, "Run", "Run All Cells")
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(3)
            if not _kernel_busy(base, token):
                dialogs += _dismiss_dialogs(driver)
                _click_menu(driver, "File", "Save Notebook")
                time.sleep(1)
                code, executed, passed, errors = _summarise(_saved_notebook(base, token, path))
                if executed == code or errors:
                    break
            if time.monotonic() > deadline:
                break
        return NotebookRun(code, executed, passed, errors, dialogs, shot, time.monotonic() - started)
    finally:
        driver.save_screenshot(str(shot))  # also of a run that went wrong: what the student would see
        driver.quit()
