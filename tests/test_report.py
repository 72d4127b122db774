"""The benchmark report: seed bands, the explorer's axes, tables as tables, provenance (thesis §6.6)."""
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fso_lib.bench.report import (Run, band_value_at, curve, loss_at, markdown_table, method_bands,  # noqa: E402
                                  plot_explorer, seed_band, seeds_per_method, tuning_provenance)


def synthetic_run(method, seed, updates, times, train, test=None, status="completed"):
    """A Run built in memory, as load_run would build it from a results file."""
    updates, times, train = (np.asarray(a, dtype=float) for a in (updates, times, train))
    test = train * 1.1 if test is None else np.asarray(test, dtype=float)
    header = {"config": {"method": method, "seed": seed, "task": "autoencoder"}, "method_label": method.upper()}
    ms = times[-1] / updates[-1] * 1e3
    return Run(Path(f"{method}-{seed}.jsonl"), header, updates, times, train, test, ms, status)


def three_seeds():
    updates = [0, 10, 20, 40]
    times = [0.0, 1.0, 2.0, 4.0]
    return [synthetic_run("acp", 0, updates, times, [50, 9.0, 4.0, 2.0]),
            synthetic_run("acp", 1, updates, times, [50, 7.0, 6.0, 3.0]),
            synthetic_run("acp", 2, updates, times, [50, 8.0, 5.0, 1.0])]


def test_band_of_three_seeds_is_median_min_max_at_each_x():
    band = seed_band(three_seeds(), x_axis="updates")
    assert band.n_runs == 3 and band.diverged == 0
    np.testing.assert_array_equal(band.x, [10, 20, 40])  # update 0 is dropped from a log-x curve
    np.testing.assert_array_equal(band.median, [8.0, 5.0, 2.0])
    np.testing.assert_array_equal(band.low, [7.0, 4.0, 1.0])
    np.testing.assert_array_equal(band.high, [9.0, 6.0, 3.0])


def test_band_interpolates_runs_onto_their_shared_range():
    a = synthetic_run("sgd", 0, [10, 20, 30], [1.0, 2.0, 3.0], [10.0, 8.0, 6.0])
    b = synthetic_run("sgd", 1, [10, 20, 30], [1.5, 2.5, 3.5], [12.0, 10.0, 8.0])
    band = seed_band([a, b], x_axis="time")
    np.testing.assert_allclose(band.x, [1.5, 2.0, 2.5, 3.0])  # union of both grids inside [1.5, 3.0]
    a_on_grid = np.array([9.0, 8.0, 7.0, 6.0])
    b_on_grid = np.array([12.0, 11.0, 10.0, 9.0])
    np.testing.assert_allclose(band.low, np.minimum(a_on_grid, b_on_grid))
    np.testing.assert_allclose(band.high, np.maximum(a_on_grid, b_on_grid))
    np.testing.assert_allclose(band.median, (a_on_grid + b_on_grid) / 2)


def test_band_refuses_mixed_methods():
    runs = three_seeds() + [synthetic_run("sgd", 0, [10, 20], [1.0, 2.0], [5.0, 4.0])]
    with pytest.raises(ValueError, match="one method"):
        seed_band(runs)


def test_x_axis_choice_selects_time_or_updates_and_which_selects_the_loss():
    run = synthetic_run("adam", 0, [0, 10, 20], [0.0, 0.5, 1.5], [40.0, 20.0, 10.0], test=[41.0, 22.0, 12.0])
    x, y = curve(run, "time", "train")
    np.testing.assert_array_equal(x, [0.5, 1.5])
    np.testing.assert_array_equal(y, [20.0, 10.0])
    x, y = curve(run, "updates", "test")
    np.testing.assert_array_equal(x, [10, 20])
    np.testing.assert_array_equal(y, [22.0, 12.0])
    with pytest.raises(ValueError):
        curve(run, "epochs")
    with pytest.raises(ValueError):
        curve(run, "time", "valid")


def test_loss_at_reads_the_last_evaluation_before_x_on_either_axis():
    run = synthetic_run("adam", 0, [0, 10, 20], [0.0, 0.5, 1.5], [40.0, 20.0, 10.0])
    assert loss_at(run, 15, "updates") == 20.0 and loss_at(run, 1.0, "time") == 20.0
    assert loss_at(run, 20, "updates") == 10.0
    assert math.isnan(loss_at(run, 21, "updates"))  # the run did not last that long
    diverged = synthetic_run("kfac", 0, [0, 10], [0.0, 1.0], [40.0, math.nan], status="diverged")
    assert loss_at(diverged, 50, "updates") == math.inf
    # a run stopped as diverged whose last evaluation is still finite (the optimizer kept the parameters from
    # before the bad update): past its end it is diverged (inf), not "did not last that long" (NaN), on both axes
    stopped = synthetic_run("kfac", 1, [0, 10], [0.0, 1.0], [40.0, 500.0], status="diverged")
    assert loss_at(stopped, 10, "updates") == 500.0
    assert loss_at(stopped, 11, "updates") == math.inf and loss_at(stopped, 2.0, "time") == math.inf
    assert math.isnan(loss_at(run, 2.0, "time")) and math.isnan(loss_at(run, -1, "updates"))


def test_bands_follow_the_requested_methods_and_count_seeds():
    runs = three_seeds() + [synthetic_run("sgd", 0, [0, 10, 20], [0.0, 1.0, 2.0], [50.0, 30.0, 20.0])]
    assert [b.method for b in method_bands(runs, methods=["sgd", "acp", "kfac"])] == ["sgd", "acp"]
    assert seeds_per_method(runs) == {"acp": 3, "sgd": 1}


def test_explorer_reads_the_median_at_the_reading_point_and_ranks_the_legend():
    runs = three_seeds() + [synthetic_run("sgd", 0, [0, 10, 20, 40], [0.0, 1.0, 2.0, 4.0], [50, 6.0, 5.5, 5.0])]
    ax, reading = plot_explorer(runs, x_axis="updates", read_at=0.5)  # half of 40 updates
    assert reading == {"acp": 5.0, "sgd": 5.5}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("ACP, 3 seeds") and labels[1].startswith("SGD")  # best first
    assert len(ax.collections) == 1  # one shaded band: only ACP has several seeds
    _, reading_by_time = plot_explorer(runs, x_axis="time", read_at=0.25)  # 1 s
    assert reading_by_time == {"acp": 8.0, "sgd": 6.0}
    plt.close("all")


def test_band_value_at_is_nan_outside_the_band():
    band = seed_band(three_seeds(), x_axis="updates")
    assert math.isnan(band_value_at(band, 5)) and math.isnan(band_value_at(band, 41))
    assert band_value_at(band, 39) == 5.0


def test_markdown_table_renders_rows_and_marks_missing_values():
    rows = [{"method": "ACP", "loss": 2.5, "s to 4": math.inf}, {"method": "SGD", "loss": math.nan, "s to 4": 12.0}]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| method | loss | s to 4 |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| ACP | 2.5 | never |" and lines[3] == "| SGD | · | 12 |"
    assert markdown_table([]) == "*(no runs)*"


def test_tuning_provenance_counts_trials_over_every_search(tmp_path):
    def write_search(folder, costs, updates=300):
        (tmp_path / folder).mkdir()
        records = [{"type": "search", "method": "biased"}]
        records += [{"type": "trial", "index": k, "cost": c, "info": {"updates": updates}} for k, c in enumerate(costs)]
        (tmp_path / folder / "search-autoencoder-acp.jsonl").write_text("\n".join(json.dumps(r) for r in records))

    write_search("tuning", [200.0, 170.0, 180.0])
    write_search("tuning2", [9.0, 12.0])
    prov = tuning_provenance(tmp_path, "acp")
    assert prov == {"searches": 2, "trials": 5, "updates_per_trial": 300, "best_cost": 9.0,
                    "best_cost_per_search": [170.0, 9.0]}
    assert tuning_provenance(tmp_path, "sgd")["searches"] == 0


def test_tables_markdown_table_formats_cells_and_refuses_ragged_rows():
    from fso_lib.tables import MarkdownTable, markdown_table as table

    text = table(["method", "loss"], [["sgd", 1.23456], ["kfac", float("nan")], ["acp", float("inf")]])
    assert isinstance(text, MarkdownTable) and text._repr_markdown_() == str(text)
    assert text.splitlines() == ["| method | loss |", "|---|---:|", "| sgd | 1.23 |", "| kfac | · |", "| acp | never |"]
    with pytest.raises(ValueError, match="2 columns"):
        table(["a", "b"], [[1]])


def test_race_bands_draw_every_method_in_three_panels_with_the_reference_points():
    from fso_lib.bench.report import plot_race_bands

    runs = three_seeds() + [synthetic_run("sgd", 0, [0, 10, 20], [0.0, 1.0, 2.0], [50.0, 30.0, 20.0])]
    reference = {"acp": {10: 9.0, 20: 4.0}, "kfac": {10: 8.0}}  # K-FAC did not run: its points are not drawn
    fig, axes = plot_race_bands(runs, reference=reference)
    assert len(axes) == 3
    for ax in axes:
        assert sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_"))[:2] == \
            sorted({r.label for r in runs})
    hollow = [line for line in axes[0].get_lines() if line.get_marker() == "o"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [10, 20]
    assert "thesis, figure 6.2" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert axes[0].get_xscale() == axes[1].get_xscale() == "log"
    plt.close(fig)
