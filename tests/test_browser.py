"""The book in a real browser: JupyterLab in headless Chromium, driven by Playwright.

1. A slider of an ipywidgets control redraws the figure it drives: the first slider of 01, and in every
   notebook the widget cell marked with the line ``# browser-test: this widget redraws its figure``.
2. Every notebook of ``notebooks/`` (found when the tests are collected) runs in fast mode in JupyterLab
   without an error output and with every widget displayed.

Without Chromium or Python Playwright the tests are skipped with the reason — except when ``CI`` is set,
where they fail: CI must install them (see ``.ci/run``). Screenshots of failures go to
``$FSO_BROWSER_ARTIFACTS`` (default: ``browser-artifacts/`` under pytest's temporary directory).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from browser_helpers import (CHROMIUM, CHROMIUM_ARGS, OUTPUT_TEXT_JS, copy_notebooks_without_outputs,
                             mirror_repository, missing_requirements, open_notebook, run_all_cells, save_screenshots, start_lab,
                             write_lab_settings)

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(path.name for path in (REPO / "notebooks").glob("*.ipynb"))
SLIDER_NOTEBOOK = "01_neural_networks.ipynb"
WIDGET_MARKER = "# browser-test: this widget redraws its figure"


def _marked_widget_notebooks() -> list[str]:
    """Notebooks with a code cell carrying WIDGET_MARKER (read at collection time)."""
    marked = []
    for name in NOTEBOOKS:
        cells = json.loads((REPO / "notebooks" / name).read_text())["cells"]
        if any(c["cell_type"] == "code" and WIDGET_MARKER in "".join(c["source"]) for c in cells):
            marked.append(name)
    return marked


MARKED_NOTEBOOKS = _marked_widget_notebooks()
WIDGET_ERRORS = re.compile(r"Error displaying widget|Error rendering|model not found|"
                           r"^(VBox|HBox|interactive|Output)\(.*(children|outputs)=", re.MULTILINE)
TRACEBACK = "Traceback (most recent call last)"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    override = os.environ.get("FSO_BROWSER_ARTIFACTS")
    return Path(override) if override else tmp_path_factory.getbasetemp() / "browser-artifacts"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    """JupyterLab serving a copy of the notebooks without outputs, in fast mode, with test settings."""
    reason = missing_requirements()
    if reason:
        if _in_ci():
            pytest.fail(f"CI is set but the browser test cannot run: {reason}. .ci/run must install it.")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("lab")
    root, settings = base / "book", base / "settings"
    copy_notebooks_without_outputs(REPO / "notebooks", root / "notebooks")
    mirror_repository(REPO, root)
    write_lab_settings(settings)
    server = start_lab(root, settings, base / "jupyterlab.log", {"FSO_FAST": "1"})
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def browser(lab, request):
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    request.addfinalizer(playwright.stop)
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    request.addfinalizer(chromium.close)
    return chromium


@pytest.fixture
def page(browser, lab):
    """A fresh browser page; its kernels are shut down after the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()
    lab.shutdown_kernels()


def _screenshot_failure(page, lab, artifacts, stem, element=None):
    saved = save_screenshots(page, artifacts, re.sub(r"[^\w.-]+", "_", stem), element)
    print(f"screenshots of the failure: {[str(p) for p in saved]}; JupyterLab log: {lab.log}")


def _no_errors(page, name: str, prompts: list[str]) -> None:
    texts = page.evaluate(OUTPUT_TEXT_JS)
    tracebacks = [t for t in texts if TRACEBACK in t]
    assert not tracebacks, f"{name}: error output in the browser:\n{tracebacks[0][-2000:]}"
    unrun = [i for i, p in enumerate(prompts) if not re.search(r"\[\d+\]", p)]
    assert not unrun, f"{name}: code cells {unrun} did not run (prompts {[prompts[i] for i in unrun]})"
    broken = [t for t in texts if WIDGET_ERRORS.search(t)]
    assert not broken, f"{name}: a widget was not displayed: {broken[0][:500]}"


def _press_slider_and_wait_for_redraw(widget_cell, timeout_s: float = 30) -> None:
    """Focus the first slider handle in ``widget_cell``, press ArrowRight, wait until its figure changes."""
    widget_cell.scroll_into_view_if_needed()
    figure = widget_cell.locator(".jp-OutputArea-output img").first
    figure.wait_for(state="visible")
    before = figure.get_attribute("src")
    handle = widget_cell.locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    deadline = time.monotonic() + timeout_s
    after = before
    while time.monotonic() < deadline and after == before:
        time.sleep(0.25)
        current = widget_cell.locator(".jp-OutputArea-output img").first
        if current.count():
            after = current.get_attribute("src")
    assert after != before, "moving the slider did not redraw the figure (image source unchanged)"


def test_slider_redraws_its_figure(page, lab, artifacts):
    if SLIDER_NOTEBOOK not in NOTEBOOKS:
        pytest.skip(f"{SLIDER_NOTEBOOK} is not in notebooks/")
    widget_cell = None
    try:
        open_notebook(page, lab, f"notebooks/{SLIDER_NOTEBOOK}", workspace="slider")
        _no_errors(page, SLIDER_NOTEBOOK, run_all_cells(page))
        widget_cell = page.locator(".jp-CodeCell", has=page.locator(".noUi-handle")).first
        _press_slider_and_wait_for_redraw(widget_cell)
    except BaseException:
        _screenshot_failure(page, lab, artifacts, "slider", element=widget_cell)
        raise


def test_the_widget_chapters_are_marked():
    """03b (training race), 06c (damping and refresh explorer) and 07 (results explorer) are browser-tested."""
    expected = {"03b_gauss_newton_and_fisher.ipynb", "06c_factorized_optimizers.ipynb", "07_benchmark.ipynb"}
    assert expected <= set(MARKED_NOTEBOOKS), f"not marked with {WIDGET_MARKER!r}: {expected - set(MARKED_NOTEBOOKS)}"


@pytest.mark.parametrize("name", MARKED_NOTEBOOKS)
def test_marked_widget_redraws_its_figure(page, lab, artifacts, name):
    """The widget cell a chapter marks (03b's training race, 06c's damping explorer, 07's results explorer)."""
    widget_cell = None
    try:
        open_notebook(page, lab, f"notebooks/{name}", workspace="marked-" + re.sub(r"\W", "-", name))
        _no_errors(page, name, run_all_cells(page))
        widget_cell = page.locator(".jp-CodeCell", has_text=WIDGET_MARKER).first
        widget_cell.locator(".noUi-handle").first.wait_for(state="attached")
        _press_slider_and_wait_for_redraw(widget_cell)
    except BaseException:
        _screenshot_failure(page, lab, artifacts, "marked-" + name, element=widget_cell)
        raise


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_the_browser(page, lab, artifacts, name):
    try:
        open_notebook(page, lab, f"notebooks/{name}", workspace=re.sub(r"\W", "-", name))
        _no_errors(page, name, run_all_cells(page))
    except BaseException:
        _screenshot_failure(page, lab, artifacts, name)
        raise
