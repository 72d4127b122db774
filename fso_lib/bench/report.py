"""Figures and tables of the benchmark from results files (thesis §6.6, figures 6.1 and 6.2).

Everything here reads the JSON-lines files written by :mod:`fso_lib.bench.runner`; nothing is hard-coded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import tables
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
    def clock(self) -> str:
        """``"wall"`` or ``"process"`` (CPU seconds of the run's process): what ``times`` count
        (:data:`fso_lib.bench.runner.CLOCKS`)."""
        return self.header["config"].get("clock", "wall")

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



def plot_race_bands(runs: list[Run], reference: dict[str, dict[int, float]] | None = None, title: str | None = None,
                    methods: list[str] | None = None, log_y: bool = True):
    """:func:`plot_race` for a race run on several seeds: per method the median over its seeds with a shaded
    min–max band (:func:`seed_band`). ``reference``: ``method → {updates: loss}`` drawn as hollow circles on the
    updates panel (the thesis's figure 6.2, read by :func:`fso_lib.bench.verdict.thesis_figure_6_2`; keys are
    our method names)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("updates", "train", "train loss vs updates"), ("time", "train", "train loss vs time"),
              ("time", "test", "test loss vs time")]
    for ax, (x_axis, which, panel_title) in zip(axes, panels):
        for band in method_bands(runs, x_axis, which, methods):
            if not len(band.x):
                continue
            _draw_band(ax, band, lw=1.5, label=band.label)
        _loss_axes(ax, x_axis, which, log_y)
        ax.set_title(panel_title)
    shown = {r.method for r in runs}
    for method, points in (reference or {}).items():
        if method in shown and points:
            xs = sorted(points)
            axes[0].plot(xs, [points[x] for x in xs], "o", mfc="none", color=method_color(method), ms=6)
    handles, labels = axes[0].get_legend_handles_labels()
    if reference:
        handles.append(plt.Line2D([], [], ls="none", marker="o", mfc="none", color="0.3"))
        labels.append("thesis, figure 6.2")
    fig.subplots_adjust(wspace=0.32, top=0.86, bottom=0.14, right=0.82)
    fig.legend(handles, labels, loc="center right", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig, axes


# ----------------------------------------------------------------------------- tables
def loss_at_time(run: Run, seconds: float, which: str = "train") -> float:
    """The loss at the last evaluation at or before ``seconds`` of training; NaN before the first evaluation
    and past the end of a run that stopped without diverging (it did not last that long); inf past the end of a
    run that diverged (it stopped because it diverged), and where the evaluated loss itself is not finite."""
    return _loss_at(run, run.times, getattr(run, which), seconds)


def _loss_at(run: Run, xs: np.ndarray, y: np.ndarray, x: float) -> float:
    inside = xs <= x
    if not inside.any():
        return math.nan
    if xs[-1] < x:  # past the run's last evaluation
        return math.inf if run.status == "diverged" else math.nan
    value = y[inside][-1]
    return math.inf if not np.isfinite(value) else float(value)


def time_to_loss(run: Run, target: float, which: str = "train", x_axis: str = "time") -> float:
    """Training seconds (``x_axis="updates"``: updates) until the loss first reached ``target`` or lower (inf if
    it never did)."""
    y = getattr(run, which)
    hit = np.flatnonzero(np.isfinite(y) & (y <= target))
    return float(getattr(run, X_AXES[x_axis][0])[hit[0]]) if len(hit) else math.inf


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


# ----------------------------------------------------------------------------- tables as tables
def markdown_table(rows: list[dict], digits: int = 3, columns: list[str] | None = None) -> str:
    """The rows as a Markdown table (for ``IPython.display.Markdown``); cells through
    :func:`fso_lib.tables.format_cell`: NaN as '·' (not reached in the run's budget), inf as 'never'."""
    if not rows:
        return "*(no runs)*"
    columns = columns or list(rows[0])
    return tables.markdown_table(columns, ([row.get(c) for c in columns] for row in rows), digits)


# ----------------------------------------------------------------------------- provenance
def tuning_provenance(set_folder: str | Path, method: str, task: str = "autoencoder") -> dict:
    """How much tuning a result set's ``method`` had, read from the search files the tuner wrote
    (``tuning*/search-TASK-METHOD.jsonl`` under ``set_folder``, in folder order): number of searches, trials
    in all, the longest trial in updates, the best cost overall and per search. ``searches == 0`` when the set
    holds no tuning record."""
    searches = sorted(Path(set_folder).glob(f"tuning*/search-{task}-{method}.jsonl"))
    per_search = [[r for r in read_records(path) if r.get("type") == "trial"] for path in searches]
    trials = [r for search in per_search for r in search]
    updates = [r.get("info", {}).get("updates") for r in trials]
    updates = [u for u in updates if u is not None]

    def best(records):
        costs = [r["cost"] for r in records if r.get("cost") is not None and math.isfinite(r["cost"])]
        return min(costs) if costs else math.nan

    return {"searches": len(searches), "trials": len(trials),
            "updates_per_trial": max(updates) if updates else None,
            "best_cost": best(trials), "best_cost_per_search": [best(search) for search in per_search]}


def seeds_per_method(runs: list[Run]) -> dict[str, int]:
    """Number of distinct seeds each method was run with in ``runs``."""
    seeds: dict[str, set] = {}
    for run in runs:
        seeds.setdefault(run.method, set()).add(run.header["config"].get("seed"))
    return {method: len(s) for method, s in seeds.items()}


# ----------------------------------------------------------------------------- the explorer
#: The two x axes of the benchmark: run attribute and axis label.
X_AXES = {"time": ("times", "training time (s)"), "updates": ("updates", "updates")}


def curve(run: Run, x_axis: str = "time", which: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The run's (x, loss) points for a log-x plot: ``x_axis`` 'time' (training seconds) or 'updates',
    ``which`` 'train' or 'test'; points at x = 0 and non-finite losses are dropped."""
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {sorted(X_AXES)}, not {x_axis!r}")
    if which not in ("train", "test"):
        raise ValueError(f"which must be 'train' or 'test', not {which!r}")
    x, y = getattr(run, X_AXES[x_axis][0]), getattr(run, which)
    keep = (x > 0) & np.isfinite(y)
    return x[keep], y[keep]


def loss_at(run: Run, x: float, x_axis: str = "time", which: str = "train") -> float:
    """:func:`loss_at_time` on either axis: ``x`` in seconds (``x_axis="time"``) or updates (``"updates"``)."""
    if x_axis == "time":
        return loss_at_time(run, x, which)
    return _loss_at(run, getattr(run, X_AXES[x_axis][0]), getattr(run, which), x)


@dataclass
class Band:
    """One method's curve over its seeds: the median loss with the min–max band, on a common x grid."""

    method: str
    label: str
    x: np.ndarray
    median: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n_runs: int
    diverged: int  # how many of the runs diverged


def seed_band(runs: list[Run], x_axis: str = "time", which: str = "train") -> Band:
    """Median and min–max over the runs of one method (its seeds), at every x where all runs have a point:
    each run is interpolated linearly onto the union of their x values inside the range they share."""
    if not runs:
        raise ValueError("seed_band needs at least one run")
    if len({r.method for r in runs}) != 1:
        raise ValueError("seed_band combines the seeds of one method; got " + ", ".join(sorted({r.method for r in runs})))
    curves = [curve(r, x_axis, which) for r in runs]
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        empty = np.array([])
        return Band(runs[0].method, runs[0].label, empty, empty, empty, empty, len(runs),
                    sum(r.status == "diverged" for r in runs))
    start, end = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x[(x >= start) & (x <= end)] for x, _ in curves]))
    values = np.array([np.interp(grid, x, y) for x, y in curves])
    return Band(runs[0].method, runs[0].label, grid, np.median(values, axis=0), values.min(axis=0),
                values.max(axis=0), len(curves), sum(r.status == "diverged" for r in runs))


def method_bands(runs: list[Run], x_axis: str = "time", which: str = "train",
                 methods: list[str] | None = None) -> list[Band]:
    """One :class:`Band` per method (all its seeds), in the order of ``methods`` (default: by name)."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    names = [m for m in (methods if methods is not None else sorted(by_method)) if m in by_method]
    return [seed_band(by_method[m], x_axis, which) for m in names]


def band_value_at(band: Band, x: float) -> float:
    """The band's median at the last grid point at or before ``x`` (NaN before its first point or, for a
    band that did not diverge, past its last point)."""
    inside = band.x <= x
    if not inside.any() or (band.x[-1] < x and not band.diverged):
        return math.nan
    return float(band.median[inside][-1])


def _draw_band(ax, band: Band, **style):
    """A method's median line, its min–max band when it has several seeds, a cross where it diverged."""
    color = method_color(band.method)
    (line,) = ax.plot(band.x, band.median, color=color, **style)
    if band.n_runs > 1:
        ax.fill_between(band.x, band.low, band.high, color=color, alpha=0.2, lw=0)
    if band.diverged:
        ax.plot(band.x[-1], band.median[-1], "x", color=color, ms=8)
    return line


def _loss_axes(ax, x_axis: str, which: str, log_y: bool) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of log axes overlap
    ax.set_xlabel(X_AXES[x_axis][1])
    ax.set_ylabel(f"{which} loss (squared error)")


def plot_explorer(runs: list[Run], methods: list[str] | None = None, x_axis: str = "time",
                  which: str = "train", log_y: bool = True, read_at: float | None = None, ax=None,
                  title: str | None = None):
    """The results explorer's figure: per method the median over its seeds (a shaded min–max band when it
    has several), log x; a dashed vertical line at ``read_at`` (a fraction of the x range every shown
    method reached) and the legend, outside the axes, ranking the methods by their loss there."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9.0, 4.2))
    bands = [b for b in method_bands(runs, x_axis, which, methods) if len(b.x)]
    reach = min((b.x[-1] for b in bands if not b.diverged), default=max((b.x[-1] for b in bands), default=1.0))
    x_read = None if read_at is None else read_at * reach
    entries = []
    for band in bands:
        line = _draw_band(ax, band, lw=1.6)
        value = band_value_at(band, x_read) if x_read is not None else math.nan
        seeds = f", {band.n_runs} seeds" if band.n_runs > 1 else ""
        reading = f"  {value:.3g}" if x_read is not None else ""
        entries.append((value if math.isfinite(value) else math.inf, line,
                        f"{band.label}{seeds}{' (diverged)' if band.diverged else ''}{reading}"))
    if x_read is not None:
        ax.axvline(x_read, color="0.3", ls="--", lw=1)
        entries.sort(key=lambda e: e[0])
    _loss_axes(ax, x_axis, which, log_y)
    if entries:
        heading = (f"{which} loss at {x_read:.3g} {'s' if x_axis == 'time' else 'updates'}"
                   if x_read is not None else None)
        ax.legend([e[1] for e in entries], [e[2] for e in entries], loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), title=heading, fontsize=8, title_fontsize=8)
    if title:
        ax.set_title(title)
    return ax, {b.method: band_value_at(b, x_read) for b in bands} if x_read is not None else {}
