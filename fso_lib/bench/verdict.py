"""The verdict of a race over several seeds (thesis §6.6, figures 6.1 and 6.2; issue 12).

A race run on several seeds per method is read here as medians with their min–max range: the loss at fixed
training times and at fixed numbers of updates, the ranking there, the time to reach fixed losses, and how
many pairs of methods come out in the thesis's order. For every pair in the other order,
:func:`explain_disagreement` looks for a measured reason in the data (the seeds' ranges overlap; the thesis's own
figure, read at the same number of updates, has the same order; the method ahead per update is behind per
second because its update costs more) and says "not explained" when none holds.

The thesis's curves come from its figure 6.2, read from the pixels by ``scripts/digitize_figure_6_2.py``
(``data/reference/thesis_figure_6_2.json``), and its final ordering from ``THESIS_FINAL_TRAIN``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .report import RESULTS_DIR, THESIS_FINAL_TRAIN, Run, load_runs, loss_at, time_to_loss, tuning_provenance

#: The digitized left panel of the thesis's figure 6.2 (train squared error against updates).
THESIS_FIGURE_6_2 = RESULTS_DIR.parent / "reference" / "thesis_figure_6_2.json"

#: Our method names whose curve in the thesis has another name (the thesis's natural neural network is the
#: implicit one of chapter 6c).
THESIS_ALIASES = {"natural_nn_implicit": "natural_nn"}


def thesis_name(method: str) -> str:
    return THESIS_ALIASES.get(method, method)


def thesis_figure_6_2(path: str | Path = THESIS_FIGURE_6_2) -> dict[str, dict[int, float]]:
    """``method → {updates: train squared error}`` read from the thesis's figure 6.2 (occluded points left out)."""
    record = json.loads(Path(path).read_text())["train_squared_error_at_updates"]
    return {method: {int(u): float(v) for u, v in row.items() if not isinstance(v, str)}
            for method, row in record.items()}


def group_by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs of each method (its seeds), methods in the order they first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


def seed_stats(values) -> dict:
    """Median, min and max of one number over the seeds (inf counts as the worst value)."""
    values = np.asarray(list(values), dtype=float)
    if not len(values):
        raise ValueError("seed_stats needs at least one value")
    return {"median": float(np.median(values)), "min": float(values.min()), "max": float(values.max()),
            "n": int(values.size)}


def loss_over_seeds(runs: list[Run], x: float, x_axis: str = "time", which: str = "train") -> dict | None:
    """:func:`seed_stats` of the loss at ``x`` seconds or updates; ``None`` when a run did not get that far
    without diverging (a diverged run counts as inf from where it stopped)."""
    values = [loss_at(run, x, x_axis, which) for run in runs]
    if any(math.isnan(v) for v in values):
        return None
    return seed_stats(values)


def ranking(groups: dict[str, list[Run]], x: float, x_axis: str = "time", which: str = "train") -> list[tuple]:
    """``(method, stats)`` from the lowest median loss at ``x`` to the highest; a method some of whose runs did
    not reach ``x`` is left out (see :func:`loss_over_seeds`)."""
    rows = [(m, loss_over_seeds(runs, x, x_axis, which)) for m, runs in groups.items()]
    return sorted(((m, s) for m, s in rows if s is not None), key=lambda pair: pair[1]["median"])


def time_to_target(runs: list[Run], target: float, which: str = "train") -> dict:
    """:func:`seed_stats` of the training seconds until the loss first reached ``target`` (inf: never)."""
    return seed_stats(time_to_loss(run, target, which) for run in runs)


def updates_to_target(runs: list[Run], target: float, which: str = "train") -> dict:
    """:func:`seed_stats` of the number of updates until the loss first reached ``target`` (inf: never)."""
    return seed_stats(time_to_loss(run, target, which, x_axis="updates") for run in runs)


def common_updates(groups: dict[str, list[Run]]) -> int:
    """The most updates every run of every method made (where all can be compared per update)."""
    return int(min(run.updates[-1] for runs in groups.values() for run in runs if len(run.updates)))


def format_stats(stats: dict | None, digits: int = 3, inf: str = "diverged") -> str:
    """``median (min–max)``; '·' for a point not reached, ``inf`` for an infinite value ('diverged' for a loss,
    'never' for a time to reach a loss)."""
    if stats is None:
        return "·"

    def one(v):
        return inf if math.isinf(v) else f"{v:.{digits}g}"
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return one(stats["median"])
    return f"{one(stats['median'])} ({one(stats['min'])}–{one(stats['max'])})"


def closing_table(groups: dict[str, list[Run]], at_seconds=(60, 300, 600), at_updates=(2_000, 10_000),
                  which: str = "train") -> list[dict]:
    """One row per method, sorted by the median at the last of ``at_seconds``: the loss (median with min–max
    over the seeds) at each time and each number of updates."""
    rows = []
    for method, runs in groups.items():
        row = {"method": runs[0].label, "seeds": len(runs)}
        for t in at_seconds:
            row[f"{which} SE @ {t:g} s"] = loss_over_seeds(runs, t, "time", which)
        for u in at_updates:
            row[f"{which} SE @ {u:,} updates"] = loss_over_seeds(runs, u, "updates", which)
        rows.append((method, row))
    last = f"{which} SE @ {at_seconds[-1]:g} s"
    rows.sort(key=lambda pair: math.inf if pair[1][last] is None else pair[1][last]["median"])
    return [row for _, row in rows]


def thesis_pairs(order: list[str], reference: dict[str, float] = THESIS_FINAL_TRAIN) -> list[tuple[str, str, bool]]:
    """Every pair ``(a, b)`` of methods present in both, with ``a`` ahead of ``b`` in the thesis (lower
    ``reference`` value; ties skipped), and whether ``order`` (best first, our names) has them the same way."""
    ours = [m for m in order if thesis_name(m) in reference]
    pairs = []
    for i, first in enumerate(ours):
        for second in ours[i + 1:]:
            a, b = reference[thesis_name(first)], reference[thesis_name(second)]
            if a == b:
                continue
            pairs.append((first, second, True) if a < b else (second, first, False))
    return pairs


def _per_update_point(groups: dict[str, list[Run]], figure: dict) -> int:
    """The largest number of updates read from the thesis's figure that every run reached."""
    reached = common_updates(groups)
    points = sorted({u for row in figure.values() for u in row if u <= reached})
    return points[-1] if points else reached


def explain_disagreement(groups: dict[str, list[Run]], ahead: str, behind: str, seconds: float,
                         figure: dict | None = None) -> tuple[str, str]:
    """The thesis puts ``ahead`` before ``behind``; here ``behind`` has the lower median at ``seconds``. Why?
    Returns ``(reason, sentence)``, reason one of

    * ``"seeds"``: the two methods' min–max ranges over the seeds overlap at ``seconds`` (three seeds cannot
      order them);
    * ``"horizon"``: in the thesis's own figure 6.2, read at the number of updates both reached here, the
      thesis's curves are in our order too (the thesis's order holds only later in its 3×10⁵ updates);
    * ``"cost"``: per update (at that same number of updates) the two are in the thesis's order, and the method
      the thesis prefers costs more per update;
    * ``"not explained"``.
    """
    a_runs, b_runs = groups[ahead], groups[behind]
    a_time, b_time = loss_over_seeds(a_runs, seconds), loss_over_seeds(b_runs, seconds)
    if a_time is None or b_time is None:
        raise ValueError(f"{ahead} or {behind} did not reach {seconds} s on every seed")
    label_a, label_b = a_runs[0].label, b_runs[0].label
    if a_time["min"] <= b_time["max"]:
        return "seeds", (f"{label_a} {format_stats(a_time)} and {label_b} {format_stats(b_time)} at {seconds:g} s: "
                         "the ranges over the seeds overlap")
    figure = thesis_figure_6_2() if figure is None else figure
    point = _per_update_point({m: groups[m] for m in (ahead, behind)}, figure)
    thesis_a, thesis_b = (figure.get(thesis_name(m), {}).get(point) for m in (ahead, behind))
    if thesis_a is not None and thesis_b is not None and thesis_b < thesis_a:
        return "horizon", (f"at {point:,} updates the thesis's own curves are in this order too ({label_b} "
                           f"{thesis_b:.3g} < {label_a} {thesis_a:.3g} in its figure 6.2): the thesis's order "
                           "comes later in its 3×10⁵ updates")
    a_update, b_update = loss_over_seeds(a_runs, point, "updates"), loss_over_seeds(b_runs, point, "updates")
    a_ms = float(np.median([r.ms_per_update for r in a_runs]))
    b_ms = float(np.median([r.ms_per_update for r in b_runs]))
    if a_update["median"] < b_update["median"] and a_ms > b_ms:
        return "cost", (f"per update the thesis's order holds (at {point:,} updates {label_a} "
                        f"{format_stats(a_update)} < {label_b} {format_stats(b_update)}), but one update of "
                        f"{label_a} costs {a_ms / b_ms:.2f}× one of {label_b} ({a_ms:.0f} against {b_ms:.0f} ms)")
    per_update = ("the same order holds per update" if b_update["median"] <= a_update["median"] else
                  f"per update the thesis's order holds, yet {label_a}'s update is not the dearer")
    return "not explained", (f"at {seconds:g} s {label_b} {format_stats(b_time)} < {label_a} {format_stats(a_time)}; "
                             f"{per_update} (at {point:,} updates {label_b} {format_stats(b_update)}, "
                             f"{label_a} {format_stats(a_update)}): not explained by the seeds, the horizon or "
                             "the cost of an update")


# ----------------------------------------------------------------------------- a race folder read by two chapters
def _is_done(run: Run) -> bool:
    return run.status in ("completed", "diverged")


def read_race(race_folder: str | Path) -> dict:
    """The race's protocol as the race wrote it (``race.json`` in ``race_folder``; thesis §6.6)."""
    return json.loads((Path(race_folder) / "race.json").read_text())


def final_groups(race_folder: str | Path) -> tuple[dict[str, list[Run]], dict[str, list[Run]]]:
    """The final runs of a race (thesis §6.6), grouped by method: ``(groups, finished)``.

    ``groups``: every results file at the top level of ``race_folder`` (the tuning trials live in subfolders) of the
    race's task whose seed is one of ``race["final_seeds"]``, running ones included. ``finished``: the methods of
    ``groups`` with one run per final seed, every one of them completed or diverged (a race is read only there)."""
    race = read_race(race_folder)
    runs = [r for r in load_runs(race_folder, task=race["task"], recursive=False)
            if r.header["config"]["seed"] in race["final_seeds"]]
    groups = group_by_method(runs)
    n_seeds = len(race["final_seeds"])
    finished = {m: group for m, group in groups.items() if len(group) == n_seeds and all(map(_is_done, group))}
    return groups, finished


def progress_rows(race_folder: str | Path, methods, labels: dict[str, str], groups: dict[str, list[Run]]) -> list[dict]:
    """How far the race has got for each of ``methods`` (thesis §6.6): tuning trials written / the budget, the best
    trial's train squared error (NaN: none yet), final runs completed or diverged / the final seeds."""
    race = read_race(race_folder)
    rows = []
    for method in methods:
        provenance = tuning_provenance(race_folder, method, race["task"])
        rows.append({"method": labels.get(method, method),
                     "tuning trials": f"{provenance['trials']} / {sum(race['rounds'])}",
                     "best trial's train SE": provenance["best_cost"],
                     "final seeds done": f"{sum(map(_is_done, groups.get(method, [])))} / {len(race['final_seeds'])}"})
    return rows


def target_rows(groups: dict[str, list[Run]], labels: dict[str, str], targets=(10, 5, 4), which: str = "train") -> list[dict]:
    """One row per method (thesis §6.6, figure 6.1's question turned around): the training seconds, then the
    updates, until the loss first reached each target, as median (min–max) over the seeds, 'never' when not."""
    rows = []
    for method, runs in groups.items():
        row = {"method": labels.get(method, method)}
        for target in targets:
            row[f"s to SE ≤ {target:g}"] = format_stats(time_to_target(runs, target, which), inf="never")
        for target in targets:
            row[f"updates to SE ≤ {target:g}"] = format_stats(updates_to_target(runs, target, which), digits=6, inf="never")
        rows.append(row)
    return rows


def reading_orders(groups: dict[str, list[Run]], readings, which: str = "train") -> dict[str, list[tuple]]:
    """``name → ranking`` (:func:`ranking`) for each reading ``(x, x_axis, name)``, e.g.
    ``(600, "time", "after 600 s")`` or ``(10_000, "updates", "at 10,000 updates")``."""
    return {name: ranking(groups, x, axis, which) for x, axis, name in readings}


def ranking_lines(groups: dict[str, list[Run]], labels: dict[str, str], readings, which: str = "train") -> list[str]:
    """The Markdown bullet lines of the race's orderings (thesis §6.6): for each reading ``(x, x_axis, name)`` the
    methods from the lowest median loss to the highest, with the methods that did not get there named; a reading
    no method reached gives no line."""
    lines = []
    for name, order in reading_orders(groups, readings, which).items():
        if not order:
            continue
        line = " < ".join(f"{labels.get(m, m)} {format_stats({**s, 'min': s['median'], 'max': s['median']})}"
                          for m, s in order)
        missing = [labels.get(m, m) for m in groups if m not in dict(order)]
        lines.append(f"- **{name}**: {line}" + (f" (not reached by {', '.join(missing)})" if missing else ""))
    return lines


def compare_pair(first: list[Run], second: list[Run], x: float, x_axis: str = "time", which: str = "train") -> dict | None:
    """Two methods' seeds read at ``x`` seconds or updates (thesis §6.6): their :func:`loss_over_seeds`, whether
    their min–max ranges overlap (then three seeds cannot order them: a tie within the seeds' range) and, when
    they do not, which one is ahead (``"first"`` or ``"second"``). ``None`` when either did not get there."""
    a, b = loss_over_seeds(first, x, x_axis, which), loss_over_seeds(second, x, x_axis, which)
    if a is None or b is None:
        return None
    overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
    ahead = None if overlap else ("first" if a["median"] < b["median"] else "second")
    return {"first": a, "second": b, "overlap": overlap, "ahead": ahead}


def comparison_phrase(comparison: dict | None, first_label: str, second_label: str, where: str) -> str:
    """One clause for :func:`compare_pair`'s answer: '{where}, A 3.1 (2.9–3.3) against B 3.4 (3.2–3.6): a tie
    within the seeds' range' (or 'A ahead' / 'B ahead'; 'not reached by both' when ``None``)."""
    if comparison is None:
        return f"{where}, not reached by both"
    verdict = ("a tie within the seeds' range" if comparison["overlap"] else
               f"{first_label if comparison['ahead'] == 'first' else second_label} ahead, the ranges apart")
    return (f"{where}, {first_label} {format_stats(comparison['first'])} against {second_label} "
            f"{format_stats(comparison['second'])}: {verdict}")
