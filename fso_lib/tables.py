"""Tables as tables: Markdown tables that notebooks display and that read well as text (no pandas needed)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["MarkdownTable", "format_cell", "markdown_table"]


class MarkdownTable(str):
    """A Markdown table: a plain ``str`` that Jupyter renders as a table when it is displayed."""

    def _repr_markdown_(self) -> str:
        return str(self)


def format_cell(value, digits: int = 3) -> str:
    """One cell: floats to ``digits`` significant figures (large ones whole), NaN as '·' (not reached),
    ±inf as 'never'; anything else through ``str``."""
    if isinstance(value, float):
        if math.isnan(value):
            return "·"
        if math.isinf(value):
            return "never"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], digits: int = 3) -> MarkdownTable:
    """``rows`` under ``header`` as a Markdown table; the first column left-aligned, the others right-aligned."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if k == 0 else "---:" for k in range(len(header))) + "|"]
    for row in rows:
        cells = [format_cell(value, digits).replace("|", "\\|") for value in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells but the header has {len(header)} columns: {row!r}")
        lines.append("| " + " | ".join(cells) + " |")
    return MarkdownTable("\n".join(lines))
