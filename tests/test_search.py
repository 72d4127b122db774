"""Grid, random and biased random search (thesis §2.3, §4.1, Algorithm 1)."""
import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fso_lib.search import (Domain, Param, SerialExecutor, acceptance_probability, biased_random_search,
                            grid_points, grid_search, nearest_neighbour_cost, random_search, run_search)

DOMAIN = Domain([Param("lr", 1e-4, 1.0, log=True), Param("scale", 0.0, 2.0)])


def bowl(params):
    """A smooth landscape with its minimum 1.0 at lr = 1e-2, scale = 1.5."""
    return 1.0 + (math.log10(params["lr"]) + 2.0) ** 2 + 4 * (params["scale"] - 1.5) ** 2


def explodes_for_large_lr(params):
    if params["lr"] > 0.3:
        raise FloatingPointError("boom")
    if params["lr"] > 0.1:
        return math.nan
    return bowl(params)


def test_log_parameters_are_log_uniform_and_round_trip():
    p = Param("lr", 1e-4, 1.0, log=True)
    assert p.from_unit(0.0) == pytest.approx(1e-4) and p.from_unit(1.0) == pytest.approx(1.0)
    assert p.from_unit(0.5) == pytest.approx(1e-2) and p.to_unit(1e-3) == pytest.approx(0.25)
    samples = [DOMAIN.sample(np.random.default_rng(k))["lr"] for k in range(2000)]
    assert min(samples) >= 1e-4 and max(samples) <= 1.0
    assert np.mean(np.log10(samples) < -2) == pytest.approx(0.5, abs=0.05)  # half the draws below the middle
    with pytest.raises(ValueError):
        Param("lr", 0.0, 1.0, log=True)


def test_acceptance_rule_of_algorithm_1():
    assert acceptance_probability(1.0, c_min=1.0, c_max=3.0) == 1.0  # near the best: always kept
    assert acceptance_probability(3.0, c_min=1.0, c_max=3.0) == 0.0  # near the worst: always rejected
    assert acceptance_probability(2.5, c_min=1.0, c_max=3.0) == pytest.approx(0.25)
    assert acceptance_probability(7.0, c_min=7.0, c_max=7.0) == 1.0  # ties: no information, keep


def test_nearest_neighbour_model():
    points, costs = np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([5.0, 9.0])
    assert nearest_neighbour_cost(points, costs, np.array([0.2, 0.3])) == 5.0
    assert nearest_neighbour_cost(points, costs, np.array([0.9, 0.6])) == 9.0


def test_grid_search_tries_every_combination():
    result = grid_search(bowl, DOMAIN, 16, executor=SerialExecutor())
    lrs = sorted({round(math.log10(t.params["lr"]), 6) for t in result.trials})
    assert len(result.trials) == 16 and lrs == pytest.approx([-3.5, -2.5, -1.5, -0.5])
    shifted = grid_points(DOMAIN, 16, np.random.default_rng(1))
    assert len(shifted) == 16 and shifted != grid_points(DOMAIN, 16)


def test_biased_search_concentrates_where_the_cost_is_low():
    n_searches, n_trials = 20, 60
    random_best, biased_best, random_dist, biased_dist = [], [], [], []
    optimum = DOMAIN.to_unit({"lr": 1e-2, "scale": 1.5})
    for k in range(n_searches):
        r = random_search(bowl, DOMAIN, n_trials, seed=k, executor=SerialExecutor())
        b = biased_random_search(bowl, DOMAIN, n_trials, seed=k, executor=SerialExecutor())
        random_best.append(r.best_cost)
        biased_best.append(b.best_cost)
        random_dist.append(np.mean([np.linalg.norm(DOMAIN.to_unit(t.params) - optimum) for t in r.trials[30:]]))
        biased_dist.append(np.mean([np.linalg.norm(DOMAIN.to_unit(t.params) - optimum) for t in b.trials[30:]]))
    assert np.mean(biased_dist) < 0.85 * np.mean(random_dist)  # later trials sit closer to the optimum
    assert np.mean(biased_best) < np.mean(random_best)
    assert max(t.draws for t in b.trials[:2]) == 1  # the first trials are accepted unconditionally


def test_diverged_and_failing_trials_are_recorded_and_avoided():
    result = biased_random_search(explodes_for_large_lr, DOMAIN, 60, seed=3, executor=SerialExecutor())
    statuses = {t.status for t in result.trials}
    assert statuses == {"ok", "diverged", "error"}
    for t in result.trials:  # each trial's status follows from where it landed
        expected = "error" if t.params["lr"] > 0.3 else "diverged" if t.params["lr"] > 0.1 else "ok"
        assert t.status == expected, (t.params, t.status)
    assert all(math.isinf(t.cost) for t in result.trials if t.status != "ok")
    assert "FloatingPointError" in next(t for t in result.trials if t.status == "error").info["error"]
    assert result.best.params["lr"] <= 0.1 and math.isfinite(result.best_cost)
    late_bad = np.mean([t.params["lr"] > 0.1 for t in result.trials[30:]])
    assert late_bad < 0.2  # the exploding region (a quarter of the log range) is mostly rejected later


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {"cost": math.nan, "steps": 3}])
def test_a_non_finite_cost_is_a_diverged_trial(value):
    result = random_search(lambda params: value, DOMAIN, 2, seed=0, executor=SerialExecutor())
    assert [t.status for t in result.trials] == ["diverged", "diverged"]
    assert all(t.cost == math.inf and not t.finite for t in result.trials)
    if isinstance(value, dict):
        assert result.trials[0].info == {"steps": 3}


def test_same_search_runs_on_thread_and_process_pools():
    serial = biased_random_search(bowl, DOMAIN, 12, seed=5, executor=SerialExecutor())
    with ThreadPoolExecutor(1) as pool:
        threaded = biased_random_search(bowl, DOMAIN, 12, seed=5, executor=pool, max_in_flight=1)
    assert [t.params for t in threaded.trials] == [t.params for t in serial.trials]  # one in flight: identical
    pooled = run_search(bowl, DOMAIN, 8, method="random", seed=5)  # default: a local process pool
    assert len(pooled.trials) == 8 and all(t.status == "ok" for t in pooled.trials)
    assert [t.index for t in pooled.trials] == list(range(8))


def test_search_runs_on_a_dask_cluster_executor():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            result = biased_random_search(bowl, DOMAIN, 10, seed=0, executor=client.get_executor(), max_in_flight=2)
    assert len(result.trials) == 10 and all(t.status == "ok" for t in result.trials)
    assert result.best_cost == min(bowl(t.params) for t in result.trials)


def test_results_are_written_as_json_lines(tmp_path):
    import json

    result = random_search(bowl, DOMAIN, 5, seed=0, executor=SerialExecutor())
    result.write_jsonl(tmp_path / "s.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "search" and [r["cost"] for r in lines[1:]] == pytest.approx(result.costs().tolist())


def test_c_max_quantile_ignores_outliers():
    """A landscape with a few catastrophic points: the thesis's rule accepts nearly everything else,
    c_max at the median keeps the search near the minimum."""

    def with_cliff(params):
        return 1e3 if params["scale"] < 0.2 else bowl(params)

    def late_median(q):
        return np.median([np.median(biased_random_search(with_cliff, DOMAIN, 60, seed=k, c_max_quantile=q,
                                                         executor=SerialExecutor()).costs()[30:]) for k in range(8)])

    assert late_median(0.5) < 0.5 * late_median(1.0)


# ----------------------------------------------------------------------------- choices, optional values, narrowing, resuming
from fso_lib.search import Choice, append_trial, narrow, read_trial_log, start_trial_log  # noqa: E402

MIXED = Domain([Param("lr", 1e-4, 1.0, log=True), Param("clip", 1e-3, 1.0, log=True, none_fraction=0.5),
                Choice("mode", ["fixed", "adaptive"]), Param("scale", 0.0, 2.0)])


def test_choices_and_optional_values_map_to_and_from_the_unit_interval():
    clip, mode = MIXED.params[1], MIXED.params[2]
    assert clip.from_unit(0.3) is None and clip.from_unit(0.5) == pytest.approx(1e-3)
    assert clip.from_unit(1.0) == pytest.approx(1.0) and clip.from_unit(0.75) == pytest.approx(10 ** -1.5)
    assert clip.to_unit(None) == 0.25 and clip.to_unit(10 ** -1.5) == pytest.approx(0.75)
    assert [mode.from_unit(u) for u in (0.0, 0.49, 0.51, 1.0)] == ["fixed", "fixed", "adaptive", "adaptive"]
    assert mode.to_unit("adaptive") == 0.75
    draws = [MIXED.sample(np.random.default_rng(k)) for k in range(400)]
    assert 0.4 < np.mean([d["clip"] is None for d in draws]) < 0.6
    assert {d["mode"] for d in draws} == {"fixed", "adaptive"} and all(MIXED.contains(d) for d in draws)
    assert Domain.from_json(json.loads(json.dumps(MIXED.to_json()))) == MIXED
    with pytest.raises(ValueError):
        Param("lr", 1e-4, 1.0).to_unit(None)  # not optional


@pytest.mark.parametrize("best", [
    {"lr": 0.5, "clip": None, "mode": "adaptive", "scale": 0.1},  # near the top / bottom edges, clipping off
    {"lr": 1e-2, "clip": 0.02, "mode": "fixed", "scale": 1.0},
])
def test_narrowed_domain_is_inside_the_first_and_around_its_best(best):
    small = narrow(MIXED, best, width=0.25)
    assert small.names == MIXED.names and small.contains(best)
    rng = np.random.default_rng(0)
    for _ in range(300):
        point = small.sample(rng)
        assert MIXED.contains(point)
        assert point["mode"] == best["mode"] and (point["clip"] is None) == (best["clip"] is None)
        for p in (MIXED.params[0], MIXED.params[3]):  # a quarter of each continuous unit range
            assert abs(p.to_unit(point[p.name]) - p.to_unit(best[p.name])) <= 0.25 + 1e-9
    lr_small, lr_big = small.params[0], MIXED.params[0]
    assert lr_small.to_unit(lr_small.high) - lr_small.to_unit(lr_small.low) == pytest.approx(1.0)  # its own unit
    assert lr_big.to_unit(lr_small.high) - lr_big.to_unit(lr_small.low) == pytest.approx(0.25)


def test_a_search_resumed_from_its_trials_file_proposes_the_uninterrupted_trials(tmp_path):
    whole = biased_random_search(bowl, MIXED_FREE, 12, seed=4, executor=SerialExecutor())
    log = tmp_path / "trials.jsonl"
    assert start_trial_log(log, {"seed": 4}) == []

    class Killed(Exception):
        pass

    def record(trial):
        append_trial(log, trial)
        if trial.index == 4:
            raise Killed  # as if the process died after 5 trials

    with pytest.raises(Killed):
        biased_random_search(bowl, MIXED_FREE, 12, seed=4, executor=SerialExecutor(), on_trial=record)
    calls = []

    def counting(params):
        calls.append(params)
        return bowl(params)

    with open(log, "a") as handle:
        handle.write('{"type": "trial", "ind')  # the kill tore the line being written
    history = start_trial_log(log, {"seed": 4})
    assert len(history) == 5
    resumed = biased_random_search(counting, MIXED_FREE, 12, seed=4, executor=SerialExecutor(), history=history,
                                   on_trial=lambda t: append_trial(log, t))
    assert len(calls) == 7  # the 5 recorded trials are not run again
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]
    assert [t.cost for t in read_trial_log(log)[1]] == pytest.approx(whole.costs().tolist())  # the torn line is gone
    with pytest.raises(ValueError, match="another search"):
        start_trial_log(log, {"seed": 5})
    with pytest.raises(ValueError, match="not the point"):
        biased_random_search(bowl, MIXED_FREE, 12, seed=5, executor=SerialExecutor(), history=history)


MIXED_FREE = Domain([Param("lr", 1e-4, 1.0, log=True), Param("scale", 0.0, 2.0), Choice("mode", ["a", "b"])])
