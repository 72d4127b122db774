"""The race's verdict over seeds (fso_lib.bench.verdict) on hand-made runs whose answers are known."""
import math
from pathlib import Path

import numpy as np
import pytest

from fso_lib.bench.report import THESIS_FINAL_TRAIN, Run
from fso_lib.bench.verdict import (closing_table, explain_disagreement, format_stats, group_by_method,
                                   loss_over_seeds, ranking, thesis_figure_6_2, thesis_pairs, time_to_target,
                                   updates_to_target)


def make_run(method, train, ms=10.0, every=1000, status="completed", seed=0):
    """A run evaluated every ``every`` updates (update 0 included) at ``ms`` milliseconds per update."""
    train = np.asarray(train, dtype=float)
    updates = np.arange(len(train)) * float(every)
    header = {"config": {"method": method, "seed": seed}, "method_label": method.upper()}
    return Run(Path(f"{method}-{seed}.jsonl"), header, updates, updates * ms / 1e3, train, train * 1.1, ms, status)


def test_loss_over_seeds_median_range_and_unreached():
    runs = [make_run("sgd", [100, 10, 5]), make_run("sgd", [100, 20, 7]), make_run("sgd", [100, 12, 6])]
    stats = loss_over_seeds(runs, 2000, "updates")
    assert stats == {"median": 6.0, "min": 5.0, "max": 7.0, "n": 3}
    assert loss_over_seeds(runs, 15.0, "time") == {"median": 12.0, "min": 10.0, "max": 20.0, "n": 3}  # 15 s: update 1000
    short = runs + [make_run("sgd", [100, 9])]
    assert loss_over_seeds(short, 2000, "updates") is None          # one seed stopped at 1000 updates
    diverged = runs + [make_run("sgd", [100, math.nan], status="diverged")]
    assert loss_over_seeds(diverged, 2000, "updates")["max"] == math.inf


def test_ranking_orders_by_median_and_leaves_out_unreached():
    groups = group_by_method([make_run("a", [9, 3]), make_run("a", [9, 5]), make_run("b", [9, 4]),
                              make_run("b", [9, 4]), make_run("c", [9])])
    order = ranking(groups, 1000, "updates")
    assert [m for m, _ in order] == ["a", "b"] and order[0][1]["median"] == 4.0


def test_time_and_updates_to_target():
    runs = [make_run("sgd", [100, 10, 5], ms=20), make_run("sgd", [100, 30, 20], ms=20),
            make_run("sgd", [100, 8, 4], ms=20)]
    seconds = time_to_target(runs, 10)
    assert seconds["min"] == 20.0 and seconds["median"] == 20.0 and seconds["max"] == math.inf
    assert updates_to_target(runs, 5)["median"] == 2000.0
    assert format_stats(seconds, inf="never") == "20 (20–never)"
    assert format_stats({"median": 5.0, "min": 4.0, "max": math.inf, "n": 3}) == "5 (4–diverged)"
    assert format_stats(None) == "·"


def test_closing_table_sorted_by_last_time():
    groups = group_by_method([make_run("slow", [100, 50, 40], ms=10), make_run("fast", [100, 20, 5], ms=10)])
    rows = closing_table(groups, at_seconds=(10, 20), at_updates=(1000, 5000))
    assert [r["method"] for r in rows] == ["FAST", "SLOW"]
    assert rows[0]["train SE @ 20 s"]["median"] == 5.0
    assert rows[0]["train SE @ 5,000 updates"] is None


def test_thesis_pairs_counts_and_aliases():
    order = ["sgd", "kfac", "natural_nn_implicit", "adam"]          # Adam is not in the thesis
    pairs = thesis_pairs(order)
    assert len(pairs) == 3
    assert ("kfac", "sgd", False) in pairs                          # thesis: K-FAC ahead of SGD; here behind
    assert ("natural_nn_implicit", "sgd", False) in pairs           # the implicit NNN is the thesis's "natural_nn"
    assert ("kfac", "natural_nn_implicit", True) in pairs
    assert sum(agree for *_, agree in pairs) == 1


FIGURE = {"kfac": {1000: 6.0, 10_000: 2.5}, "sgd": {1000: 30.0, 10_000: 8.0}, "acp": {1000: 8.0, 10_000: 2.7},
          "batchnorm": {1000: 5.0, 10_000: 4.2}}


def test_explanations_each_reason():
    # seeds: SGD ahead of K-FAC at the median, but the ranges overlap
    groups = group_by_method([make_run("kfac", [100, 10, 6]), make_run("kfac", [100, 10, 4.5]),
                              make_run("sgd", [100, 10, 5]), make_run("sgd", [100, 10, 5.5])])
    assert explain_disagreement(groups, "kfac", "sgd", 20, FIGURE)[0] == "seeds"
    # horizon: the thesis's own figure at 1,000 updates puts batch norm ahead of K-FAC too
    groups = group_by_method([make_run("kfac", [100, 9, 6], ms=10), make_run("batchnorm", [100, 5, 3], ms=10)])
    reason, sentence = explain_disagreement(groups, "kfac", "batchnorm", 20, FIGURE)
    assert reason == "horizon" and "1,000 updates" in sentence
    # cost: per update K-FAC is ahead of SGD, but its update costs 4× as much, so at 20 s SGD leads
    kfac = [make_run("kfac", [100, 3, 2], ms=40, every=500)]          # 20 s = 500 updates; 1,000 updates at 40 s
    sgd = [make_run("sgd", [100, 9, 8, 2.5, 2], ms=10, every=500)]    # 20 s = 2,000 updates
    groups = {"kfac": kfac, "sgd": sgd}
    assert loss_over_seeds(sgd, 20)["median"] < loss_over_seeds(kfac, 20)["median"]
    reason, sentence = explain_disagreement(groups, "kfac", "sgd", 20, FIGURE)
    assert reason == "cost" and "4.00×" in sentence
    # not explained: same cost, SGD ahead per update and per second, thesis's figure in the thesis's order
    groups = group_by_method([make_run("kfac", [100, 9, 8], ms=10), make_run("sgd", [100, 5, 3], ms=10)])
    assert explain_disagreement(groups, "kfac", "sgd", 20, FIGURE)[0] == "not explained"
    # not explained either: ahead per update, behind at 20 s, at the same cost per update
    groups = group_by_method([make_run("kfac", [100, 3, 6], ms=10), make_run("sgd", [100, 8, 2], ms=10)])
    reason, sentence = explain_disagreement(groups, "kfac", "sgd", 20, FIGURE)
    assert reason == "not explained" and "not the dearer" in sentence


def test_digitized_figure_agrees_with_the_thesis_final_ordering():
    figure = thesis_figure_6_2()
    final = {m: row[300_000] for m, row in figure.items() if 300_000 in row}
    # K-FAC lowest, batch norm and SGD the two highest, as in THESIS_FINAL_TRAIN (read by eye)
    assert min(final, key=final.get) == "kfac" == min(THESIS_FINAL_TRAIN, key=THESIS_FINAL_TRAIN.get)
    assert sorted(final, key=final.get)[-2:] == ["batchnorm", "sgd"]
    for method, value in final.items():                            # the two readings within 20 %
        assert abs(value / THESIS_FINAL_TRAIN[method] - 1) < 0.2, (method, value)
    for row in figure.values():                                    # every curve decreases
        values = [row[u] for u in sorted(row)]
        assert all(a > b for a, b in zip(values, values[1:]))


def test_seed_stats_median_range_and_refusal():
    from fso_lib.bench.verdict import seed_stats

    assert seed_stats([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    with pytest.raises(ValueError):
        seed_stats([])


# ----------------------------------------------------------------------------- a race folder (final_groups, ...)
def write_run(path, method, seed, train, every=100, ms=10.0, status="completed", task="autoencoder"):
    """A results file as the runner writes it: a header, one eval record every ``every`` updates, an end record
    (none when ``status`` is 'partial': a run still going)."""
    import json

    records = [{"type": "header", "config": {"method": method, "seed": seed, "task": task},
                "method_label": method.upper()}]
    records += [{"type": "eval", "update": k * every, "time_s": k * every * ms / 1e3, "train_loss": loss,
                 "test_loss": loss} for k, loss in enumerate(train)]
    if status != "partial":
        records.append({"type": "end", "status": status})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def make_race_folder(tmp_path):
    import json

    (tmp_path / "race.json").write_text(json.dumps({"task": "autoencoder", "final_seeds": [1, 2], "rounds": [3, 2]}))
    write_run(tmp_path / "autoencoder-kfac-seed1.jsonl", "kfac", 1, [50, 8, 4])
    write_run(tmp_path / "autoencoder-kfac-seed2.jsonl", "kfac", 2, [50, 9, 5], status="diverged")
    write_run(tmp_path / "autoencoder-adam-seed1.jsonl", "adam", 1, [50, 20])
    write_run(tmp_path / "autoencoder-adam-seed2.jsonl", "adam", 2, [50, 30], status="partial")   # still running
    write_run(tmp_path / "autoencoder-soap-seed1.jsonl", "soap", 1, [50, 6])                     # one seed only
    write_run(tmp_path / "autoencoder-soap-seed0.jsonl", "soap", 0, [50, 1])                     # not a final seed
    write_run(tmp_path / "autoencoder-ekfac-seed1.jsonl", "ekfac", 1, [50, 1], task="other")     # another task
    (tmp_path / "tuning1").mkdir()
    write_run(tmp_path / "tuning1" / "autoencoder-ekfac-abc.jsonl", "ekfac", 1, [50, 2])         # a tuning trial
    (tmp_path / "tuning1" / "search-autoencoder-kfac.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"type": "trial", "cost": 7.0}, {"type": "trial", "cost": 3.5},
                                          {"type": "trial", "cost": None}]) + "\n")
    return tmp_path


def test_final_groups_reads_the_top_level_final_seeds_and_finished_methods(tmp_path):
    from fso_lib.bench.verdict import final_groups

    groups, finished = final_groups(make_race_folder(tmp_path))
    assert {m: sorted(r.header["config"]["seed"] for r in runs) for m, runs in groups.items()} == \
        {"adam": [1, 2], "kfac": [1, 2], "soap": [1]}
    assert list(finished) == ["kfac"]          # a diverged seed counts as done; adam's seed 2 is still running


def test_progress_rows_count_trials_best_cost_and_done_seeds(tmp_path):
    from fso_lib.bench.verdict import final_groups, progress_rows

    folder = make_race_folder(tmp_path)
    groups, _ = final_groups(folder)
    rows = progress_rows(folder, ["kfac", "adam", "shampoo"], {"kfac": "K-FAC"}, groups)
    assert rows[0] == {"method": "K-FAC", "tuning trials": "3 / 5", "best trial's train SE": 3.5,
                       "final seeds done": "2 / 2"}
    assert rows[1]["final seeds done"] == "1 / 2" and rows[1]["tuning trials"] == "0 / 5"
    assert math.isnan(rows[2]["best trial's train SE"]) and rows[2]["final seeds done"] == "0 / 2"


def test_target_rows_seconds_then_updates():
    from fso_lib.bench.verdict import target_rows

    groups = group_by_method([make_run("kfac", [100, 8, 4], ms=20), make_run("kfac", [100, 12, 3], ms=20),
                              make_run("kfac", [100, 9, 6], ms=20)])
    (row,) = target_rows(groups, {"kfac": "K-FAC"}, targets=(10, 5))
    assert list(row) == ["method", "s to SE ≤ 10", "s to SE ≤ 5", "updates to SE ≤ 10", "updates to SE ≤ 5"]
    assert row["method"] == "K-FAC"
    assert row["s to SE ≤ 10"] == "20 (20–40)"                 # 1,000 updates at 20 ms; the second seed at 2,000
    assert row["updates to SE ≤ 5"] == "2000 (2000–never)"     # the third seed never reaches 5
    assert row["updates to SE ≤ 10"] == "1000 (1000–2000)"


def test_ranking_lines_orders_and_names_the_missing():
    from fso_lib.bench.verdict import ranking_lines

    groups = group_by_method([make_run("a", [9, 5, 2]), make_run("b", [9, 3]), make_run("c", [9, 4, 3])])
    lines = ranking_lines(groups, {"a": "A", "b": "B"}, [(1000, "updates", "at 1,000 updates"),
                                                         (2000, "updates", "at 2,000 updates"),
                                                         (9000, "updates", "at 9,000 updates")])
    assert lines == ["- **at 1,000 updates**: B 3 < c 4 < A 5",
                     "- **at 2,000 updates**: A 2 < c 3 (not reached by B)"]


def test_compare_pair_overlap_ahead_and_unreached():
    from fso_lib.bench.verdict import compare_pair, comparison_phrase

    first = [make_run("ekfac", [9, 3.0]), make_run("ekfac", [9, 3.5]), make_run("ekfac", [9, 4.0])]
    tied = [make_run("kfac", [9, 3.9]), make_run("kfac", [9, 4.5]), make_run("kfac", [9, 5.0])]
    apart = [make_run("kfac", [9, 4.1]), make_run("kfac", [9, 4.5]), make_run("kfac", [9, 5.0])]
    comparison = compare_pair(first, tied, 1000, "updates")
    assert comparison["overlap"] and comparison["ahead"] is None
    assert comparison_phrase(comparison, "EKFAC", "K-FAC", "at 1,000 updates") == \
        "at 1,000 updates, EKFAC 3.5 (3–4) against K-FAC 4.5 (3.9–5): a tie within the seeds' range"
    comparison = compare_pair(apart, first, 1000, "updates")
    assert not comparison["overlap"] and comparison["ahead"] == "second"
    assert comparison_phrase(comparison, "K-FAC", "EKFAC", "x").endswith("EKFAC ahead, the ranges apart")
    assert compare_pair(first, tied, 2000, "updates") is None
    assert comparison_phrase(None, "A", "B", "after 600 s") == "after 600 s, not reached by both"
