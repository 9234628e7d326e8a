"""The interactive course in a real browser: JupyterLab served on localhost, headless Chromium driven by
selenium opens 00_welcome and 01_simclr, runs every cell, moves a widget control and checks that the
widget's output changes.  Screenshots go to docs/screenshots/.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them); skipped, with that reason, without.
The notebooks run on copies in a temporary folder, in quick mode, so the committed ones are never touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")


def _why_not() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -r requirements.txt)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return ("Chromium or chromedriver is not installed: apt-get install chromium chromium-driver "
                "(.ci/run installs them)")
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")

FIND_PANEL = """
const app = window.jupyterapp;
const panel = app && Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === arguments[0]);
"""
NOTEBOOK_STATE = FIND_PANEL + """
if (!panel || !panel.content || !panel.sessionContext || !panel.sessionContext.session) { return null; }
const kernel = panel.sessionContext.session.kernel;
const code = panel.content.widgets.filter(cell => cell.model.type === 'code');
const errors = code.flatMap(cell => cell.model.outputs.toJSON())
                   .filter(output => output.output_type === 'error')
                   .map(output => output.ename + ': ' + output.evalue);
return {kernel: kernel ? kernel.status : 'none', cells: code.length,
        executed: code.filter(cell => cell.model.executionCount !== null).length, errors: errors};
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free localhost port over copies of the notebooks; yields (base URL, token)."""
    work = tmp_path_factory.mktemp("lab")
    course = work / "course"  # the folder JupyterLab shows: the two notebooks only
    course.mkdir()
    for name in ("00_welcome.ipynb", "01_simclr.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, course / name)
    settings = {  # every cell in the DOM (no virtual scrolling), so the test finds the widgets of any cell
        "notebook-extension/tracker": {"windowingMode": "none"},
        "apputils-extension/notification": {"fetchNews": "false"},  # no news pop-up (and no request for it)
    }
    for name, values in settings.items():
        path = work / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "COURSE_QUICK": "1", "COURSE_FIGURES_DIR": str(work / "figures"),
           "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    log = open(work / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course}", "--LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=course)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"JupyterLab exited: {(work / 'lab.log').read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(up, 90, "JupyterLab to answer on localhost")
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _run_all_cells(driver, base: str, token: str, notebook: str, timeout: float) -> dict:
    driver.get(f"{base}/lab/workspaces/{Path(notebook).stem}/tree/{notebook}?reset&token={token}")
    _wait(lambda: (driver.execute_script(NOTEBOOK_STATE, notebook) or {}).get("kernel") == "idle", 120,
          f"{notebook} to open with an idle kernel")
    driver.execute_script(FIND_PANEL + "app.shell.activateById(panel.id); "
                          "app.commands.execute('notebook:run-all-cells');", notebook)

    last: dict = {}

    def finished():
        state = driver.execute_script(NOTEBOOK_STATE, notebook)
        if state is None:
            return None
        last.update(state)
        if state["errors"]:
            raise AssertionError(f"{notebook} raised in the browser: {state['errors']}")
        return state if state["executed"] == state["cells"] and state["kernel"] == "idle" else None

    try:
        return _wait(finished, timeout, f"every cell of {notebook} to run")
    except AssertionError as error:
        _screenshot(driver, f"{Path(notebook).stem}-timeout.png")
        raise AssertionError(f"{error}; last state {last} (screenshot in {SCREENSHOTS})") from None


def _screenshot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / name))


def _move_and_check(browser, css: str, move, what: str) -> None:
    """Find the first widget control matching ``css``, wait for its widget's figure, ``move(control)`` and
    wait until the figure has changed."""
    control = _wait(lambda: browser.find_elements("css selector", css), 30, f"the {what} control")[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", control)
    box = control.find_element("xpath", "ancestor::div[contains(@class, 'widget-vbox')][1]")
    output = box.find_element("css selector", ".widget-output")

    def figure() -> str | None:
        return output.get_attribute("innerHTML") if output.find_elements("css selector", "img") else None

    before = _wait(figure, 60, f"the {what} figure")
    move(control)
    _wait(lambda: figure() not in (None, before), 60, f"the {what} figure to change after the control moved")


def test_welcome_runs_in_the_browser_and_the_explorer_follows_its_dropdown(lab, browser):
    from selenium.webdriver.support.select import Select

    base, token = lab
    state = _run_all_cells(browser, base, token, "00_welcome.ipynb", timeout=240)
    assert state["cells"] > 5

    def choose_second_value(dropdown) -> None:
        _screenshot(browser, "00_welcome-explorer-before.png")
        Select(dropdown).select_by_index(1)

    _move_and_check(browser, ".widget-dropdown select", choose_second_value, "ShapesWorld explorer")
    _screenshot(browser, "00_welcome-explorer-after.png")


def test_simclr_runs_in_the_browser_and_the_augmentation_view_follows_its_slider(lab, browser):
    from selenium.webdriver.common.keys import Keys

    base, token = lab
    _run_all_cells(browser, base, token, "01_simclr.ipynb", timeout=300)

    def three_steps_left(handle) -> None:
        handle.click()
        for _ in range(3):
            handle.send_keys(Keys.ARROW_LEFT)

    _move_and_check(browser, ".widget-slider .noUi-handle", three_steps_left, "augmentation explorer")
    _screenshot(browser, "01_simclr-augmentation-explorer.png")
