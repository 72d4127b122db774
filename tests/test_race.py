"""The equal-budget race (fso_lib.bench.race; thesis §4.1, §6.6, issue 12): same trials and horizon for every
method, the narrowed second round, resuming after a kill, distinct seeds, the seed summary, the budget."""
import json
import math
from pathlib import Path

import pytest

from fso_lib.bench.race import (Interrupted, RaceConfig, final_summary, plan, read_trial_log, run_race,
                                search_file, tune_method)
from fso_lib.bench.runner import read_records
from fso_lib.search import Domain, narrow


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny(out, **kwargs):
    defaults = dict(out=str(out), task="small_autoencoder", methods=("sgd", "adam", "kfac"), rounds=(3, 2),
                    horizon=6, final_seeds=(1, 2), final_seconds=0.05, final_min_updates=12, workers=0, threads=1,
                    batch_size=100, trial_eval_every=3, final_eval_every=4, train_eval_size=200, sample=True)
    defaults.update(kwargs)
    return RaceConfig(**defaults)


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    config = tiny(tmp_path_factory.mktemp("race"))
    tuned = run_race(config, echo=lambda *a: None)
    return config, tuned


def trial_runs(path):
    return [read_records(t.info["file"]) for t in read_trial_log(path)[1]]


def test_every_method_gets_the_same_trials_horizon_and_data_seed(race):
    config, tuned = race
    for method in config.methods:
        for round_index, n_trials in enumerate(config.rounds):
            header, trials = read_trial_log(search_file(config, method, round_index))
            assert len(trials) == n_trials and header["horizon_updates"] == 6 and header["data_seed"] == 0
            for records in trial_runs(search_file(config, method, round_index)):
                assert records[0]["config"]["max_updates"] == 6 and records[0]["config"]["seed"] == 0
                assert records[0]["init"] == "sparse" and records[-1]["type"] == "end"
                assert records[-1]["status"] == "diverged" or records[-1]["update"] == 6
        best = tuned["_provenance"]["small_autoencoder"][method]
        assert best["trials"] == 5 and best["horizon_updates"] == 6
    assert sorted(tuned["small_autoencoder"]) == sorted(config.methods)


def test_the_second_round_searches_inside_the_first_domain_around_its_best(race):
    config, tuned = race
    for method in config.methods:
        first_header, first = read_trial_log(search_file(config, method, 0))
        second_header, second = read_trial_log(search_file(config, method, 1))
        first_domain, second_domain = Domain.from_json(first_header["domain"]), Domain.from_json(second_header["domain"])
        best = min((t for t in first if t.finite), key=lambda t: t.cost)
        assert second_domain == narrow(first_domain, best.params, config.narrow_width)
        assert second_domain.contains(best.params)
        assert all(second_domain.contains(t.params) and first_domain.contains(t.params) for t in second)
        overall = min((t for t in first + second if t.finite), key=lambda t: t.cost)  # the final runs' settings
        assert tuned["small_autoencoder"][method] == {"init": "sparse", **overall.params}


def test_a_killed_tuning_resumes_with_the_uninterrupted_trials(tmp_path):
    whole = tiny(tmp_path / "whole", methods=("kfac",))
    tune_method(whole, "kfac")
    killed = tiny(tmp_path / "killed", methods=("kfac",))
    (tmp_path / "killed").mkdir()
    with pytest.raises(Interrupted):
        tune_method(killed, "kfac", stop_after=4)  # round 1 done, round 2 stopped after its first trial
    assert len(read_trial_log(search_file(killed, "kfac", 1))[1]) == 1
    tune_method(killed, "kfac")
    for round_index in (0, 1):
        a = read_trial_log(search_file(whole, "kfac", round_index))
        b = read_trial_log(search_file(killed, "kfac", round_index))
        assert a[0] == b[0]  # same header: domain, seeds, horizon
        assert [(t.params, t.cost, t.status) for t in a[1]] == [(t.params, t.cost, t.status) for t in b[1]]


def test_final_runs_use_distinct_seeds_other_than_the_tuning_seed(race):
    config, tuned = race
    for method in config.methods:
        headers, curves = [], []
        for seed in config.final_seeds:
            records = read_records(f"{config.out}/small_autoencoder-{method}-seed{seed}.jsonl")
            headers.append(records[0])
            curves.append([r["train_loss"] for r in records if r["type"] == "eval"][:3])
            assert records[-1]["type"] == "end" and records[-1]["update"] >= 12  # min_updates beyond the time budget
            assert "1 torch thread" in records[0]["config"]["note"]
            assert records[0]["config"]["clock"] == config.clock == "process"  # the race's default clock
        assert [h["config"]["seed"] for h in headers] == [1, 2]
        assert headers[0]["hyperparameters"] == headers[1]["hyperparameters"]
        assert curves[0][0] != curves[1][0]  # another initialization ...
        assert curves[0][1:] != curves[1][1:]  # ... and another data order


def test_a_second_invocation_skips_what_is_finished(race):
    config, _ = race
    sizes = {p: p.stat().st_size for p in Path(config.out).rglob("*.jsonl") if p.name != "race_log.jsonl"}
    run_race(config, echo=lambda *a: None)
    assert {p: p.stat().st_size for p in sizes} == sizes
    with pytest.raises(SystemExit, match="another race"):
        run_race(tiny(config.out, horizon=7), echo=lambda *a: None)


def _write_run(path, seed, points, status="completed"):
    records = [{"type": "header", "config": {"method": "sgd", "task": "autoencoder", "seed": seed}, "device": "cpu"}]
    records += [{"type": "eval", "update": u, "time_s": t, "train_loss": loss, "test_loss": loss} for u, t, loss in points]
    records.append({"type": "end", "status": status, "update": points[-1][0], "time_s": points[-1][1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_three_seed_summary_is_the_median_and_range_of_the_seeds(tmp_path):
    config = RaceConfig(out=str(tmp_path), methods=("sgd",), final_seeds=(1, 2, 3))
    _write_run(tmp_path / "autoencoder-sgd-seed1.jsonl", 1, [(0, 0, 90.0), (2000, 50, 7.0), (10000, 250, 4.0)])
    _write_run(tmp_path / "autoencoder-sgd-seed2.jsonl", 2, [(0, 0, 90.0), (1000, 30, 8.0), (2500, 75, 5.0), (10000, 300, 3.5)])
    _write_run(tmp_path / "autoencoder-sgd-seed3.jsonl", 3, [(0, 0, 90.0), (2000, 60, 9.5)], status="diverged")
    summary = final_summary(config, at_updates=(1000, 2000, 10_000), at_seconds=(40, 400))
    row = summary["sgd"]
    assert row["seeds"] == 3
    # at 2,000 updates: 7.0, 8.0 (its last evaluation at or before 2,000) and 9.5 (seed 3's last evaluation, the
    # one that found it diverged, still measured its loss: fso_lib.bench.report.loss_at) -> median 8.0
    assert row["2000 updates"] == {"median": 8.0, "min": 7.0, "max": 9.5, "n": 3}
    assert row["1000 updates"] == {"median": 90.0, "min": 8.0, "max": 90.0, "n": 3}  # before seed 3 diverged
    # at 10,000 updates: 4.0, 3.5 and inf -> median 4.0
    assert row["10000 updates"] == {"median": 4.0, "min": 3.5, "max": math.inf, "n": 3}
    # at 40 s: seed 1's evaluation at 0 s -> 90.0; seed 2 at 30 s -> 8.0; seed 3 at 0 s -> 90.0
    assert row["40 s"] == {"median": 90.0, "min": 8.0, "max": 90.0, "n": 3}
    assert "400 s" not in row  # no run trained that long


def test_plan_arithmetic(tmp_path):
    speed = {"results": {"sgd": {"amortized_ms": 10.0, "breakdown_ms": {"forward": 4.0, "statistics": 0.0}}}}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    old = tmp_path / "old"
    old.mkdir()
    (old / "autoencoder-sgd-seed0.jsonl").write_text(
        json.dumps({"type": "header", "config": {"method": "sgd"}}) + "\n" + json.dumps({"type": "end", "ms_per_update": 25.0}) + "\n")
    config = RaceConfig(methods=("sgd",), rounds=(2, 1), horizon=100, trial_eval_every=50, final_seeds=(1, 2),
                        final_seconds=100.0, final_min_updates=1000, train_eval_size=1000, batch_size=200)
    p = plan(config, tmp_path / "speed.json", old)
    assert p["slowdown"] == 2.5  # 25 ms in the old race / 10 ms in the speed file
    eval_s = 4.0 * 2.5 * (1000 + 10_000) / 200 / 1e3  # forward of SGD over the evaluation images
    assert p["eval_s"] == pytest.approx(eval_s)
    row = p["methods"]["sgd"]
    assert row["ms_per_update"] == 25.0
    assert row["trial_s"] == pytest.approx(100 * 0.025 + 3 * eval_s)  # evaluations at 0, 50, 100
    assert row["tuning_h"] == pytest.approx(3 * row["trial_s"] / 3600)
    assert row["final_s"] > 100.0  # 4,000 updates in 100 s > 1,000: the time budget decides, plus evaluations
    assert p["machine_hours"] == pytest.approx((row["tuning_h"] + row["finals_h"]) / 2)


def test_plan_counts_the_quadratic_model_rule_of_kfac_from_the_speed_file(tmp_path):
    from fso_lib.bench.methods import get_method

    if "step_rule" not in get_method("kfac").domain.names:
        pytest.skip("this KFAC has no step_rule option")
    speed = {"results": {"sgd": {"amortized_ms": 10.0, "breakdown_ms": {"forward": 4.0, "statistics": 0.0}},
                         "kfac": {"amortized_ms": 20.0, "breakdown_ms": {"forward": 4.0, "statistics": 1.0}},
                         "kfac_quadratic_model": {"amortized_ms": 50.0, "breakdown_ms": {}}}}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    config = RaceConfig(methods=("kfac",), rounds=(4, 2), horizon=100, trial_eval_every=100, threads=2, clock="wall",
                        final_seeds=(1,), final_seconds=1.0, final_min_updates=10, train_eval_size=1000)
    p = plan(config, tmp_path / "speed.json", tmp_path / "no_old_race")
    row, evals = p["methods"]["kfac"], 2 * p["eval_s"]  # threads=2: the speed file's own condition, slowdown 1
    assert p["slowdown"] == 1.0 and row["ms_per_update"] == 50.0  # later rounds and finals: the dearer rule
    assert row["trial_s"] == pytest.approx(100 * (20.0 + 50.0) / 2 / 1e3 + evals)  # round 1: either rule alike
    assert row["tuning_h"] * 3600 == pytest.approx(4 * row["trial_s"] + 2 * (100 * 0.05 + evals))


def _domain_points(method):
    """Two points of the method's domain, and for K-FAC every combination of its choices (kl_clip set)."""
    import itertools

    import numpy as np

    from fso_lib.bench.methods import get_method
    from fso_lib.search import Choice

    domain = get_method(method).domain
    rng = np.random.default_rng(1)
    points = [domain.sample(rng) for _ in range(2)]
    choices = [p for p in domain.params if isinstance(p, Choice)]
    for values in itertools.product(*(p.choices for p in choices)):
        point = domain.from_unit([0.6] * len(domain.params))  # kl_clip (if searched) set, mid-range values
        points.append({**point, **dict(zip((p.name for p in choices), values))})
    return points


@pytest.mark.parametrize("method", RaceConfig().methods)
def test_every_point_of_every_race_domain_builds_and_trains(tmp_path, method):
    """What a tuning trial runs: each method from points of its declared search domain, a few updates."""
    from fso_lib.bench.runner import RunConfig, run

    for k, point in enumerate(_domain_points(method)):
        hp = dict(point)
        init_scale = hp.pop("init_scale")
        config = RunConfig(task="small_autoencoder", method=method, hyperparameters=hp, init="sparse",
                           init_scale=init_scale, max_updates=6, eval_every=3, eval_schedule="linear",
                           batch_size=50, train_eval_size=100, sample=True, progress=False, name=f"p{k}")
        result = run(config, tmp_path)  # an error would raise here
        assert result.status in ("completed", "diverged"), (point, result.status)


def test_the_new_domains_contain_the_old_race_settings_and_the_issue_probe():
    """The 2026-11-27 race's tuned settings (data/results/tuned_cpu.json) and issue 12's K-FAC probe
    (η 0.1, ε 0.01, μ 0.9, kl_clip 0.01) lie inside the race's search domains."""
    from fso_lib.bench.methods import get_method

    old = json.loads((Path(__file__).resolve().parents[1] / "data/results/tuned_cpu.json").read_text())["autoencoder"]
    for method, params in old.items():
        domain, defaults = get_method(method).domain, get_method(method).defaults
        assert {"lr", "init_scale"} <= set(params) and set(domain.names) & set(params) >= {"lr", "init_scale"}
        # what the old race did not search takes the method's default (K-FAC's momentum 0.9, Adam's eps), or a
        # mid-domain value for an option the old race did not have
        full = {p.name: params.get(p.name, defaults.get(p.name, p.from_unit(0.5))) for p in domain.params}
        assert domain.contains(full), (method, params)
    kfac = get_method("kfac").domain
    probe = {p.name: p.from_unit(0.5) for p in kfac.params}
    probe.update(lr=0.1, damping=0.01, momentum=0.9, kl_clip=0.01, init_scale=1.0)
    assert kfac.contains(probe)


def test_the_process_clock_needs_one_thread():
    with pytest.raises(ValueError, match="threads=1"):
        RaceConfig(out="unused", threads=2)
    assert RaceConfig(out="unused", threads=2, clock="wall").clock == "wall"
