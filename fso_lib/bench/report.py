"""Figures and tables of the benchmark from results files (thesis §6.6, figures 6.1 and 6.2).

Everything here reads the JSON-lines files written by :mod:`fso_lib.bench.runner`; nothing is hard-coded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..plotting import method_color
from .runner import read_records

#: The committed results of the book (``data/results`` of the repository, wherever the notebook runs from).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "data" / "results"


@dataclass
class Run:
    """One results file: its header, its evaluations as arrays, and how it ended (``status``)."""

    path: Path
    header: dict
    updates: np.ndarray
    times: np.ndarray
    train: np.ndarray
    test: np.ndarray
    ms_per_update: float
    status: str  # "completed", "diverged", "error" or "partial" (no end record: killed or still running)

    @property
    def method(self) -> str:
        return self.header["config"]["method"]

    @property
    def label(self) -> str:
        return self.header.get("method_label", self.method)

    @property
    def device_label(self) -> str:
        """``GPU: <name>`` or ``CPU: <model> (<threads> threads)``: where the clock ran."""
        machine = self.header.get("machine", {})
        if self.header.get("device", "cpu").startswith("cuda"):
            return f"GPU: {machine.get('gpu', 'unknown')}"
        return f"CPU: {machine.get('cpu', 'unknown')} ({machine.get('torch_threads', '?')} threads)"


def load_run(path: str | Path) -> Run:
    records = read_records(path)
    if not records or records[0].get("type") != "header":
        raise ValueError(f"{path} is not a benchmark results file (no header record).")
    evals = [r for r in records if r.get("type") == "eval"]
    end = next((r for r in reversed(records) if r.get("type") == "end"), None)

    def column(key):
        return np.array([math.nan if r.get(key) is None else r[key] for r in evals], dtype=float)

    updates, times = column("update"), column("time_s")
    ms = times[-1] / updates[-1] * 1e3 if len(evals) and updates[-1] > 0 else math.nan
    return Run(Path(path), records[0], updates, times, column("train_loss"), column("test_loss"), ms,
               end["status"] if end else "partial")


def load_runs(folder: str | Path, task: str | None = None, recursive: bool = True) -> list[Run]:
    """All results files under ``folder`` (in its subfolders too when ``recursive``; tuning trials live in
    subfolders), optionally only those of ``task``."""
    runs = []
    pattern = Path(folder).rglob if recursive else Path(folder).glob
    for path in sorted(pattern("*.jsonl")):
        try:
            run = load_run(path)
        except (ValueError, KeyError):
            continue
        if task is None or run.header["config"]["task"] == task:
            runs.append(run)
    return runs


def best_runs(runs: list[Run]) -> list[Run]:
    """Per (method, device), the run with the lowest final train loss (the thesis plots only the best)."""
    chosen: dict[tuple, Run] = {}
    for run in runs:
        key = (run.method, run.device_label)
        final = _final(run)
        if key not in chosen or final < _final(chosen[key]):
            chosen[key] = run
    return list(chosen.values())


def _final(run: Run) -> float:
    finite = run.train[np.isfinite(run.train)]
    return float(finite[-1]) if len(finite) else math.inf


# ----------------------------------------------------------------------------- figures
def plot_race(runs: list[Run], title: str | None = None, axes=None, log_y: bool = True):
    """Three panels in the style of thesis figures 6.1/6.2: train loss vs updates, train loss vs time,
    test loss vs time, log scales. A diverged run ends with a cross."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    else:
        fig = axes[0].figure
    panels = [("updates", "train", "updates"), ("times", "train", "training time (s)"),
              ("times", "test", "training time (s)")]
    for ax, (x_name, y_name, x_label) in zip(axes, panels):
        for run in runs:
            x, y = getattr(run, x_name), getattr(run, y_name)
            keep = (x > 0) & np.isfinite(y)
            style = dict(color=method_color(run.method), label=run.label, lw=1.5)
            ax.plot(x[keep], y[keep], **style)
            if run.status == "diverged" and keep.any():
                ax.plot(x[keep][-1], y[keep][-1], "x", color=style["color"], ms=8)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of log axes overlap
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{y_name} loss")
    axes[0].set_title("train loss vs updates")
    axes[1].set_title("train loss vs time")
    axes[2].set_title("test loss vs time")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.subplots_adjust(wspace=0.32, top=0.86, bottom=0.14)
    if handles:
        fig.legend(handles, labels, loc="center right", bbox_to_anchor=(1.0, 0.5))
        fig.subplots_adjust(right=0.82)
    if title:
        fig.suptitle(title)
    return fig, axes


# ----------------------------------------------------------------------------- tables
def loss_at_time(run: Run, seconds: float, which: str = "train") -> float:
    """The loss at the last evaluation at or before ``seconds`` of training; NaN if the run stopped earlier
    without reaching that time (it did not last that long), inf if it had diverged by then."""
    y = getattr(run, which)
    inside = run.times <= seconds
    if not inside.any():
        return math.nan
    if run.times[-1] < seconds and run.status != "diverged":
        return math.nan
    value = y[inside][-1]
    return math.inf if not np.isfinite(value) else float(value)


def time_to_loss(run: Run, target: float, which: str = "train") -> float:
    """Training seconds until the loss first reached ``target`` or lower (inf if it never did)."""
    y = getattr(run, which)
    hit = np.flatnonzero(np.isfinite(y) & (y <= target))
    return float(run.times[hit[0]]) if len(hit) else math.inf


def race_table(runs: list[Run], times: list[float], targets: list[float], which: str = "train") -> list[dict]:
    """One row per run: ms/update, loss at each time, time to each target, best test loss, status."""
    rows = []
    for run in sorted(runs, key=_final):
        finite_test = run.test[np.isfinite(run.test)]
        row = {"method": run.label, "device": run.device_label, "status": run.status,
               "updates": int(run.updates[-1]) if len(run.updates) else 0,
               "ms/update": run.ms_per_update,
               **{f"{which} @ {t:g} s": loss_at_time(run, t, which) for t in times},
               **{f"s to {which} ≤ {L:g}": time_to_loss(run, L, which) for L in targets},
               "best test": float(finite_test.min()) if len(finite_test) else math.nan}
        rows.append(row)
    return rows


def format_table(rows: list[dict], digits: int = 3) -> str:
    """A plain-text table (NaN shown as '·' = not reached in the run's budget, inf as 'never'/'diverged')."""
    if not rows:
        return "(no runs)"

    def cell(value):
        if isinstance(value, float):
            if math.isnan(value):
                return "·"
            if math.isinf(value):
                return "never"
            return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    columns = list(rows[0])
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


#: Final train squared error of each method after 3×10⁵ updates, *read by eye* from the thesis's figures 6.1
#: and 6.2 (Titan Black GPU); a reference for the ordering, not data of ours. Source: thesis §6.6.
THESIS_FINAL_TRAIN = {"kfac": 0.9, "acp": 1.0, "acp_fixed_alpha": 1.0, "natural_nn": 1.1,
                      "mean_only_batchnorm": 1.5, "batchnorm": 1.8, "sgd": 2.1, "centered_gd": 2.4}


def common_horizon(runs: list[Run]) -> float:
    """The longest training time every run reached (or diverged before): where all can be compared."""
    ends = [float(r.times[-1]) for r in runs if len(r.times) and r.status != "diverged"]
    return min(ends) if ends else math.nan


def ranking_at_time(runs: list[Run], seconds: float, which: str = "train") -> list[tuple[str, float]]:
    """(method, loss at ``seconds``) from best to worst; diverged runs last."""
    pairs = [(r.method, loss_at_time(r, seconds, which)) for r in runs]
    return sorted(pairs, key=lambda p: (math.isnan(p[1]), p[1]))


def rank_agreement(ours: list[str], reference: dict[str, float]) -> tuple[int, int]:
    """How many pairs of methods (present in both) are ordered the same way as in ``reference``:
    (concordant pairs, comparable pairs). Ties in the reference are not counted."""
    common = [m for m in ours if m in reference]
    agree = total = 0
    for i, a in enumerate(common):
        for b in common[i + 1:]:
            if reference[a] == reference[b]:
                continue
            total += 1
            agree += reference[a] < reference[b]  # ``ours`` lists a before b: a was better for us
    return agree, total
