"""The notebook check itself: a broken cell must fail the suite, volatile output must not.

Each case writes a small notebook, runs pytest on it with the project's nbval options
(pyproject.toml) in a subprocess, and looks at the outcome.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """cells: (source, stored text output) pairs; the stored output is what a previous run printed."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for count, (source, stored) in enumerate(cells, start=1):
        cell = nbformat.v4.new_code_cell(source, execution_count=count)
        if stored:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def _run_nbval(notebook: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-q", str(notebook)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


def test_good_notebook_passes(tmp_path):
    nb = _notebook(tmp_path / "good.ipynb", [
        ("x = 2 + 2\nassert x == 4\nprint('took', 0.123, 's')", "took 9.87 s\n"),  # volatile timing: not compared
        ("# NBVAL_CHECK_OUTPUT\nprint(sum(range(5)))", "10\n"),
    ])
    result = _run_nbval(nb)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_failing_assert_fails_the_suite(tmp_path):
    nb = _notebook(tmp_path / "broken.ipynb", [("x = 1", ""), ("assert x == 2, 'the formula does not hold'", "")])
    result = _run_nbval(nb)
    assert result.returncode != 0
    assert "the formula does not hold" in result.stdout


def test_exception_fails_the_suite(tmp_path):
    nb = _notebook(tmp_path / "raises.ipynb", [("import fso_lib\nfso_lib.no_such_helper()", "")])
    result = _run_nbval(nb)
    assert result.returncode != 0 and "AttributeError" in result.stdout


def test_checked_output_that_changed_fails(tmp_path):
    nb = _notebook(tmp_path / "changed.ipynb", [("# NBVAL_CHECK_OUTPUT\nprint(6 * 7)", "41\n")])
    result = _run_nbval(nb)
    assert result.returncode != 0 and "42" in result.stdout
