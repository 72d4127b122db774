"""The book in a real browser: JupyterLab in headless Chromium, driven by Playwright.

1. A slider of an ipywidgets control redraws the figure it drives: the first slider of 01, and in every
   notebook the widget cell marked with the line ``# browser-test: this widget redraws its figure``.
2. Every notebook of ``notebooks/`` (found when the tests are collected) runs in fast mode in JupyterLab
   without an error output and with every widget displayed.
3. The server is started with the arguments of the README's command, and the page it opens is the index, with the
   repository as the file browser's root; every relative link of the index opens its target, and a citation link of
   a chapter reaches its entry in the bibliography.

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
                             mirror_repository, missing_requirements, open_notebook, readme_lab_arguments, run_all_cells,
                             save_screenshots, start_lab, write_lab_settings)
from test_links import links_in_markdown, notebook_markdown_cells

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
    """JupyterLab started as the README says, on a copy of the repository whose notebooks have no outputs, in fast
    mode, with test settings."""
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
    server = start_lab(root, settings, base / "jupyterlab.log", {"FSO_FAST": "1"},
                       lab_arguments=readme_lab_arguments(REPO / "README.md"))
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
    """02b (momentum/Adam paths), 03b (training race), 03c (reparametrization), 06c (damping and refresh explorer) and
    07 (results explorer) are browser-tested."""
    expected = {"02b_momentum_and_adaptive_methods.ipynb", "03b_gauss_newton_and_fisher.ipynb",
                "03c_costs_and_invariance.ipynb", "06c_factorized_optimizers.ipynb", "07_benchmark.ipynb"}
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


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n not in MARKED_NOTEBOOKS])
def test_notebook_runs_in_the_browser(page, lab, artifacts, name):
    """Every notebook runs without an error in JupyterLab (the widget notebooks: in the test above, which runs
    all their cells before it moves the slider, so that CI does not run them twice)."""
    try:
        open_notebook(page, lab, f"notebooks/{name}", workspace=re.sub(r"\W", "-", name))
        _no_errors(page, name, run_all_cells(page))
    except BaseException:
        _screenshot_failure(page, lab, artifacts, name)
        raise


# ----------------------------------------------------------------------------------------------- opening the book
INDEX = "notebooks/00_index.ipynb"
CURRENT_TAB_LABEL = "#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel"
CURRENT_DOCUMENT = ".jp-MainAreaWidget:not(.lm-mod-hidden)"
#: the links of the markdown cells of the notebook in front
MARKDOWN_LINKS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-MarkdownCell .jp-RenderedMarkdown a[href]"


def _first_line_of(relative: str) -> str:
    """The first line a reader sees in a file: a notebook's title, a Markdown file's heading, a module's first line."""
    path = REPO / relative
    if path.suffix == ".ipynb":
        text = notebook_markdown_cells(path)[0][1]
    else:
        text = path.read_text(encoding="utf-8")
    first = next(line for line in text.splitlines() if line.strip())
    return first.lstrip("#").strip().strip('"').strip()


def _bring_to_front(page, tab_label: str) -> None:
    page.locator("#jp-main-dock-panel .lm-TabBar-tab", has_text=tab_label).first.click()
    page.wait_for_selector(f'{CURRENT_TAB_LABEL}:text-is("{tab_label}")')


def _link_targets(page, lab) -> list[str | None]:
    """Each link of the visible notebook's markdown, in page order, as ``path#fragment`` relative to the server's
    root when it points to a file of the server (JupyterLab rewrites relative links to ``/files/...``), else None."""
    targets = []
    for href in page.locator(MARKDOWN_LINKS).evaluate_all("links => links.map(a => a.getAttribute('href'))"):
        match = re.match(rf"^(?:{re.escape(lab.url)})?/files/([^?#]+)(?:\?[^#]*)?(#.*)?$", href)
        targets.append(match.group(1) + (match.group(2) or "") if match else None)
    return targets


def _click_link(page, lab, target: str, source: str) -> None:
    """Click the first link to ``target`` in the notebook ``source`` (after bringing its tab to the front)."""
    _bring_to_front(page, Path(source).name)
    link = page.locator(MARKDOWN_LINKS).nth(_link_targets(page, lab).index(target))
    link.scroll_into_view_if_needed()
    link.click()


def test_readme_command_opens_the_index_at_the_repository_root(page, lab, artifacts):
    """The README's command roots the server at the repository and opens the index (issue 13)."""
    try:
        url = lab.browser_open_url()
        assert url.split("?")[0].endswith("/lab/tree/" + INDEX), f"the README's command opens {url}, not the index"
        root_listing = {entry["name"] for entry in lab.api("GET", "/api/contents")["content"]}
        assert {"fso_lib", "notebooks", "README.md", "data"} <= root_listing, f"server root holds {sorted(root_listing)}"
        page.goto(url)
        page.wait_for_selector(".jp-Notebook .jp-Cell")
        page.wait_for_selector(f'{CURRENT_TAB_LABEL}:text-is("00_index.ipynb")')
        _wait_for_text(page.locator(f"{CURRENT_DOCUMENT} h1").first, _first_line_of(INDEX), INDEX)
        page.locator(".jp-BreadCrumbs-home").first.click()               # the file browser's root: the repository
        page.locator(".jp-DirListing-itemName", has_text="fso_lib").first.wait_for(state="visible")
    except BaseException:
        _screenshot_failure(page, lab, artifacts, "readme-command")
        raise


def test_the_index_links_open_their_targets(page, lab, artifacts):
    """Click every relative link of the index once (each distinct target): the target opens in a new tab and shows
    its title, without an error dialog."""
    expected = {link.split("#")[0] for _, text in notebook_markdown_cells(REPO / INDEX) for link in links_in_markdown(text)
                if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link)}
    expected = {str((REPO / "notebooks" / link).resolve().relative_to(REPO)) for link in expected}
    target = None
    try:
        page.goto(f"{lab.url}/lab/workspaces/links/tree/{INDEX}?token={lab.token}")
        page.wait_for_selector(f'{MARKDOWN_LINKS}[href*="/files/"]', state="attached")
        targets = list(dict.fromkeys(t for t in _link_targets(page, lab) if t))
        assert {t.split("#")[0] for t in targets} == expected, (
            f"links rendered in the browser {sorted(t.split('#')[0] for t in targets)} != links of the file {sorted(expected)}")
        for target in targets:
            path = target.split("#")[0]
            started = time.monotonic()
            _click_link(page, lab, target, INDEX)
            page.wait_for_selector(f'{CURRENT_TAB_LABEL}:text-is("{Path(path).name}")', timeout=30_000)
            _wait_for_text(page.locator(f"{CURRENT_DOCUMENT} :is(h1, .cm-line)").first, _first_line_of(path), target)
            assert page.locator(".jp-Dialog").count() == 0, f"{target}: {page.locator('.jp-Dialog').first.inner_text()}"
            _close_current_tab(page)
            print(f"{target}: {time.monotonic() - started:.1f} s")
        lab.shutdown_sessions(keep=(INDEX,))
    except BaseException:
        _screenshot_failure(page, lab, artifacts, f"index-link-{target}")
        raise


def test_a_citation_link_reaches_its_entry(page, lab, artifacts):
    """The cited work whose entry lies furthest down the bibliography, clicked in a chapter that cites it: the
    bibliography opens, and a second click (JupyterLab 4.6 scrolls to a fragment only in a notebook already open)
    scrolls it down to the entry."""
    references = REPO / "notebooks" / "91_references.ipynb"
    keys_in_order = [k for _, text in notebook_markdown_cells(references) for k in re.findall(r'<a id="([^"]+)"></a>', text)]
    citing = {}
    for name in NOTEBOOKS:
        for _, text in notebook_markdown_cells(REPO / "notebooks" / name):
            for link in links_in_markdown(text):
                if link.startswith("91_references.ipynb#"):
                    citing.setdefault(link.split("#", 1)[1], name)
    assert citing, "no chapter cites the bibliography"
    key = max(citing, key=keys_in_order.index)
    chapter, target = f"notebooks/{citing[key]}", f"notebooks/91_references.ipynb#{key}"
    try:
        page.goto(f"{lab.url}/lab/workspaces/citation/tree/{chapter}?token={lab.token}")
        page.wait_for_selector(f'{MARKDOWN_LINKS}[href*="/files/"]', state="attached")
        for _ in range(2):
            _click_link(page, lab, target, chapter)
            page.wait_for_selector(f'{CURRENT_TAB_LABEL}:text-is("91_references.ipynb")', timeout=30_000)
            _wait_for_text(page.locator(f"{CURRENT_DOCUMENT} h1").first, _first_line_of("notebooks/91_references.ipynb"), target)
        document = page.locator(CURRENT_DOCUMENT).first
        entry = document.locator(f'[data-jupyter-id="{key}"]').first
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not _inside(entry, document):
            time.sleep(0.25)
        assert _inside(entry, document), f"{target}, clicked in {chapter}: the entry is not in view"
        scrolled = document.locator(".jp-WindowedPanel-outer").first.evaluate("e => e.scrollTop")
        assert scrolled > 0, f"{target}: the entry is in view without scrolling; pick an entry further down"
        lab.shutdown_sessions()
    except BaseException:
        _screenshot_failure(page, lab, artifacts, f"citation-{key}")
        raise


def _close_current_tab(page) -> None:
    """Close the current tab without saving (opening a notebook can mark it modified, e.g. by adding cell ids)."""
    tabs = page.locator("#jp-main-dock-panel .lm-TabBar-tab")
    before = tabs.count()
    page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").first.click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and tabs.count() >= before:
        discard = page.locator(".jp-Dialog button", has_text="Discard")
        if discard.count():
            discard.first.click()
        time.sleep(0.1)
    assert tabs.count() < before, "the tab did not close"


def _wait_for_text(element, text: str, what: str, timeout_s: float = 30) -> None:
    """Wait until ``element`` shows ``text`` (the opened document is the link's target, rendered)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if element.count() and text in element.inner_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: the page does not show {text!r}")


def _inside(element, container) -> bool:
    """Whether ``element`` lies within the visible box of ``container``."""
    inner, outer = element.bounding_box(), container.bounding_box()
    return bool(inner and outer and outer["y"] <= inner["y"] and inner["y"] + inner["height"] <= outer["y"] + outer["height"])
