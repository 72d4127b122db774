"""Every relative link of the book points somewhere: no browser, a few milliseconds.

Checked: the markdown cells of every notebook of ``notebooks/``, and the repository's Markdown files (README.md,
CONTRIBUTING.md). For each link or image that is not a web address:

* the target file or folder exists, inside the repository; from a notebook, it is a file (JupyterLab shows an error
  dialog for a link to a folder);
* a ``#fragment`` into a notebook (or within one) names an anchor JupyterLab can scroll to: an HTML element with
  ``id="..."`` in a markdown cell (the bibliography's ``<a id="KEY"></a>``), or a heading, whose id JupyterLab 4
  makes from the heading's text with every space replaced by ``-`` (``## 2.3 Two hyperparameters`` ->
  ``2.3-Two-hyperparameters``);
* a ``#fragment`` into a Markdown file names one of its headings as GitHub spells it (lower case, punctuation
  dropped, spaces to ``-``): these files are read on GitHub first.

The browser test (tests/test_browser.py) clicks the index's links and a citation in JupyterLab itself.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
MARKDOWN_FILES = ("README.md", "CONTRIBUTING.md")

FENCED_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", re.DOTALL)
INLINE_MATH = re.compile(r"(?<!\\)\$[^$\n]+?(?<!\\)\$")
MARKDOWN_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ID = re.compile(r"<[a-zA-Z][^>]*?\bid\s*=\s*[\"']([^\"']+)[\"']")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    source: str   # repository-relative path of the file holding the link (and the cell, for a notebook)
    target: str   # the link as written


def _without_code(text: str) -> str:
    """Markdown with code blocks, code spans and math removed (brackets in them are not links)."""
    text = FENCED_CODE.sub("", text)
    text = INLINE_CODE.sub("", text)
    text = DISPLAY_MATH.sub("", text)
    return INLINE_MATH.sub("", text)


def links_in_markdown(text: str) -> list[str]:
    """Every link target of ``text``: inline links and images, reference definitions, HTML href/src."""
    text = _without_code(text)
    targets = MARKDOWN_LINK.findall(text) + REFERENCE_DEFINITION.findall(text) + HTML_LINK.findall(text)
    return [t for t in targets if t]


def _heading_text(raw: str) -> str:
    """The text content a rendered heading shows: markup removed, math kept as typed."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)       # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)                         # HTML tags
    text = re.sub(r"`([^`]*)`", r"\1", text)                     # code spans -> their content
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)              # bold
    text = re.sub(r"\*(?![\s*])(.+?)(?<![\s*])\*", r"\1", text)                # italics with *
    text = re.sub(r"(?<!\w)_(?![\s_])(.+?)(?<![\s_])_(?!\w)", r"\1", text)    # italics with _ (not inside words)
    return text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").strip()


def jupyterlab_heading_id(raw: str) -> str:
    """The id JupyterLab 4 gives a markdown heading: its text with every space replaced by ``-``."""
    return _heading_text(raw).replace(" ", "-")


def github_heading_id(raw: str) -> str:
    """The fragment GitHub gives a heading of a Markdown file."""
    text = _heading_text(raw).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of_markdown(text: str, heading_id) -> set[str]:
    code_free = FENCED_CODE.sub("", text)
    anchors = {heading_id(m.group(2)) for m in ATX_HEADING.finditer(code_free)}
    return anchors | set(HTML_ID.findall(code_free))


def notebook_markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def anchors_of(path: Path) -> set[str]:
    """The fragments a link into ``path`` may use (empty for files that are neither notebooks nor Markdown)."""
    if path.suffix == ".ipynb":
        return set().union(*(anchors_of_markdown(text, jupyterlab_heading_id) for _, text in notebook_markdown_cells(path)))
    if path.suffix == ".md":
        return anchors_of_markdown(path.read_text(encoding="utf-8"), github_heading_id)
    return set()


def problems_of_link(source_file: Path, target: str, repo: Path) -> str | None:
    """Why ``target``, written in ``source_file``, is broken; None when it is fine or not a relative link."""
    if SCHEME.match(target) or target.startswith("//"):
        return None          # a web address (or mailto:); not checked here
    path_part, _, fragment = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    resolved = (source_file.parent / path_part).resolve() if path_part else source_file.resolve()
    try:
        resolved.relative_to(repo.resolve())
    except ValueError:
        return f"points outside the repository ({resolved})"
    if not resolved.exists():
        return f"{path_part} does not exist"
    if resolved.is_dir() and source_file.suffix == ".ipynb":
        return f"{path_part} is a folder: JupyterLab cannot open a folder from a link (link a file in it)"
    if fragment:
        fragment = unquote(fragment)
        if resolved.suffix not in (".ipynb", ".md"):
            return f"has a fragment #{fragment} but {resolved.name} is not a notebook or Markdown file"
        if fragment not in anchors_of(resolved):
            return f"#{fragment} is not an anchor of {resolved.name}"
    return None


def book_links(repo: Path = REPO) -> list[tuple[Link, Path]]:
    """Every link of the book's notebooks and Markdown files, with the file it sits in."""
    found = []
    for notebook in sorted((repo / "notebooks").glob("*.ipynb")):
        for index, text in notebook_markdown_cells(notebook):
            for target in links_in_markdown(text):
                found.append((Link(f"notebooks/{notebook.name} (cell {index})", target), notebook))
    for name in MARKDOWN_FILES:
        path = repo / name
        if path.exists():
            for target in links_in_markdown(path.read_text(encoding="utf-8")):
                found.append((Link(name, target), path))
    return found


def broken_links(repo: Path = REPO) -> list[str]:
    broken = []
    for link, path in book_links(repo):
        problem = problems_of_link(path, link.target, repo)
        if problem:
            broken.append(f"{link.source}: ({link.target}) {problem}")
    return broken


# ------------------------------------------------------------------------------------------------ the book


def test_every_relative_link_of_the_book_resolves():
    broken = broken_links()
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_book_has_links_to_check():
    """Guards the extractor itself: the index links every chapter, the notation page and the bibliography."""
    index_targets = {link.target.split("#")[0] for link, _ in book_links() if link.source.startswith("notebooks/00_index")}
    chapters = {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} - {"00_index.ipynb"}
    assert chapters <= index_targets, f"notebooks the index does not link: {sorted(chapters - index_targets)}"


def test_every_citation_key_has_one_entry():
    """Each ``91_references.ipynb#KEY`` used anywhere is an anchor there, and no key is defined twice."""
    references = NOTEBOOK_DIR / "91_references.ipynb"
    assert references.exists(), "the bibliography notebooks/91_references.ipynb is missing"
    ids = [i for _, text in notebook_markdown_cells(references) for i in HTML_ID.findall(FENCED_CODE.sub("", text))]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"keys defined twice in 91_references.ipynb: {duplicates}"
    cited = {link.target.split("#", 1)[1] for link, _ in book_links()
             if link.target.split("#")[0].endswith("91_references.ipynb") and "#" in link.target}
    assert cited, "no notebook cites the bibliography"
    assert cited <= set(ids), f"cited keys without an entry: {sorted(cited - set(ids))}"


# ------------------------------------------------------------------------------------------------ the checker


def _write_notebook(path: Path, markdown_cells: list[str]) -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": text} for text in markdown_cells]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_the_checker_finds_each_kind_of_broken_link(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "module.py").write_text("")
    _write_notebook(tmp_path / "notebooks" / "refs.ipynb", ['<a id="smith2001"></a> Smith, 2001.',
                                                            "## 2.3 Two *hyper*parameters"])
    _write_notebook(tmp_path / "notebooks" / "a.ipynb", [
        "[ok](refs.ipynb#smith2001) [ok](refs.ipynb#2.3-Two-hyperparameters) [ok](../lib/module.py) "
        "[web](https://example.org/x#y) `[code](nowhere.ipynb)` $[a](b)$",
        "[missing file](nothing.ipynb) [missing key](refs.ipynb#jones1999) [folder](../lib#x) "
        "![image](missing.png) <a href=\"gone.ipynb\">html</a> [outside](../../elsewhere.txt) [self](#No-such-heading) "
        "[a folder](../lib)",
    ])
    (tmp_path / "README.md").write_text("# Title\n## Measured times\n[ok](#measured-times) [bad](#Measured-times)\n")
    broken = broken_links(tmp_path)
    expected = ["(nothing.ipynb)", "(refs.ipynb#jones1999)", "(../lib#x)", "(missing.png)", "(gone.ipynb)",
                "(../../elsewhere.txt)", "(#No-such-heading)", "(../lib) ../lib is a folder", "README.md: (#Measured-times)"]
    for fragment in expected:
        assert any(fragment in line for line in broken), f"{fragment} not reported; reported: {broken}"
    assert len(broken) == len(expected), broken


@pytest.mark.parametrize("heading, lab_id", [
    ("## 2.1.1 Gradient descent and the learning rate", "2.1.1-Gradient-descent-and-the-learning-rate"),
    ("## 6.1.1 · The criterion and its `closed-form` solution", "6.1.1-·-The-criterion-and-its-closed-form-solution"),
    ("### A **first** widget", "A-first-widget"),
])
def test_jupyterlab_heading_ids(heading, lab_id):
    assert anchors_of_markdown(heading, jupyterlab_heading_id) == {lab_id}
