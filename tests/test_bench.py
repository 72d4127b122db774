"""The benchmark harness: records, budgets, divergence, resume after a real kill (thesis §4.2, §6.6)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fso_lib.bench import RunConfig, get_method, make_task, read_records, run, run_paths
from fso_lib.bench.__main__ import main as cli_main
from fso_lib.bench.tasks import CIFAR10Unavailable, load_cifar10, squared_error

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def small(method="sgd", **kwargs):
    defaults = dict(task="small_autoencoder", method=method, sample=True, batch_size=100, eval_every=10,
                    eval_schedule="linear", train_eval_size=300, progress=False)
    defaults.update(kwargs)
    return RunConfig(**defaults)


def test_squared_error_is_summed_over_pixels_and_averaged_over_examples():
    out, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert squared_error(out, target).item() == pytest.approx((2 + 4) / 2)


def test_records_header_evals_and_end(tmp_path):
    result = run(small("adam", hyperparameters={"lr": 1e-3}, max_updates=30), tmp_path)
    records = read_records(result.results_path)
    header, evals, end = records[0], [r for r in records if r["type"] == "eval"], records[-1]
    assert header["type"] == "header" and header["config"]["method"] == "adam"
    assert {"torch", "python", "fso_lib"} <= set(header["versions"]) and header["machine"]["cpu"]
    assert header["device"] == "cpu" and "mnist" in header["dataset"] and header["hyperparameters"]["lr"] == 1e-3
    assert [r["update"] for r in evals] == [0, 10, 20, 30]
    assert all(b["time_s"] >= a["time_s"] for a, b in zip(evals, evals[1:]))
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert end == {**end, "type": "end", "status": "completed", "update": 30}
    assert run_paths(tmp_path, result.name)[1].exists()  # the checkpoint


def test_a_run_flushes_denormals_and_gives_torch_its_default_back(tmp_path, monkeypatch):
    calls = []
    real = torch.set_flush_denormal
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: calls.append(mode) or real(mode))
    result = run(small("sgd", hyperparameters={"lr": 0.1}, max_updates=10), tmp_path)
    assert calls == [True, False]  # on for the run, torch's default (off) afterwards
    assert read_records(result.results_path)[0]["config"]["flush_denormal"] is True
    run(small("sgd", hyperparameters={"lr": 0.1}, max_updates=10, flush_denormal=False, name="kept"), tmp_path)
    assert calls[2:] == [False, False]
    if real(True):  # the CPU supports it: a denormal input is read as zero
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0
    real(False)
    assert float(torch.tensor([1e-39]) * 1.0) > 0.0


def test_time_budget_stops_the_run(tmp_path):
    result = run(small(max_seconds=0.3, eval_every=1000), tmp_path)
    assert result.status == "completed" and 0.3 <= result.seconds < 3.0 and result.updates > 0


def test_divergence_is_recorded_not_raised(tmp_path):
    # a ReLU classifier's cross-entropy explodes with a huge step (the autoencoder's squared error is bounded)
    config = small("sgd", task="classification", hyperparameters={"lr": 50.0}, max_updates=200)
    result = run(config, tmp_path)
    assert result.status == "diverged" and result.updates < 200
    assert read_records(result.results_path)[-1]["status"] == "diverged"


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        get_method("sgd").hyperparameters({"learning_rate": 0.1})


def test_classification_records_the_dataset_that_ran(tmp_path):
    task = make_task("classification", sample=True)
    assert task.dataset.startswith("mnist") and task.classification
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in task.build_model(seed=0).modules())
    assert n_linear == 9  # 8 hidden layers of 100 units + the output layer
    result = run(small("sgd", task="classification", hyperparameters={"lr": 0.05}, max_updates=20), tmp_path, task=task)
    evals = [r for r in read_records(result.results_path) if r["type"] == "eval"]
    assert 0.0 <= evals[-1]["test_error"] <= 1.0 and read_records(result.results_path)[0]["dataset"] == task.dataset


def test_cifar10_checksum_is_enforced(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(CIFAR10Unavailable, match="SHA-256"):
        load_cifar10(folder=tmp_path, download=False)


def _cli(out, name, updates, *extra):
    return [sys.executable, "-m", "fso_lib.bench", "--task", "small_autoencoder", "--sample", "--method",
            "sgd_momentum", "--hp", "lr=0.01", "--batch-size", "100", "--eval-every", "20", "--eval-schedule",
            "linear", "--train-eval-size", "300", "--threads", "1", "--quiet", "--out", str(out), "--name", name,
            "--updates", str(updates), *extra]


def _evals(path):
    return [(r["update"], r["train_loss"], r["test_loss"]) for r in read_records(path) if r["type"] == "eval"]


#: what two identical runs may differ in: wall-clock stamps and the timings measured with them
CLOCK_FIELDS = {"wall_clock", "time_s", "ms_per_update"}


def _without_clock(record, ignore=()):
    return {k: v for k, v in record.items() if k not in CLOCK_FIELDS and k not in ignore}


def assert_same_run(resumed_path, reference_path, budget_differs=False):
    """Every field of every record equal, except wall-clock stamps and timings (and the run's name, and
    the budget the killed run was started with); the clock of the resumed run continues, never resets."""
    resumed = [r for r in read_records(resumed_path) if r["type"] != "resume"]
    reference = read_records(reference_path)
    assert [r["type"] for r in resumed] == [r["type"] for r in reference]
    ignore_config = {"name"} | ({"max_updates"} if budget_differs else set())
    for a, b in zip(resumed, reference):
        if a["type"] == "header":
            assert {k: v for k, v in a["config"].items() if k not in ignore_config} == \
                   {k: v for k, v in b["config"].items() if k not in ignore_config}
            assert _without_clock(a, {"name", "config"}) == _without_clock(b, {"name", "config"})
        else:
            assert _without_clock(a) == _without_clock(b), (a, b)
    resume = [r for r in read_records(resumed_path) if r["type"] == "resume"]
    assert resume, "the run was not resumed"
    evals = [r for r in read_records(resumed_path) if r["type"] == "eval"]
    times = [r["time_s"] for r in evals]
    assert all(t1 > t0 for t0, t1 in zip(times, times[1:])), times  # continuing, never reset
    for record in resume:
        at = next(r for r in evals if r["update"] == record["update"])
        assert record["time_s"] == at["time_s"]  # the clock restarts where the checkpoint left it
        later = [r for r in evals if r["update"] > record["update"]]
        assert later and later[0]["time_s"] > record["time_s"]
        baseline = next(r for r in reference if r["type"] == "eval")["train_loss"]
        assert record["divergence_baseline"] == pytest.approx(baseline, rel=1e-6)
    for a, b in zip(evals, evals[1:]):  # each interval's timing is its own clock difference
        assert b["ms_per_update"] == pytest.approx((b["time_s"] - a["time_s"]) / (b["update"] - a["update"]) * 1e3)


def test_resume_after_sigkill_continues_like_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    results, checkpoint = run_paths(tmp_path, "killed")
    process = subprocess.Popen(_cli(tmp_path, "killed", 10**6), cwd=REPO, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if results.exists() and len(_evals(results)) >= 3 and checkpoint.exists():
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(checkpoint, weights_only=False)["update"]
    assert killed_at >= 20 and read_records(results)[-1]["type"] != "end"  # it really died mid-run
    target = (killed_at // 20 + 3) * 20
    subprocess.run(_cli(tmp_path, "killed", target, "--resume"), cwd=REPO, env=env, check=True)
    subprocess.run(_cli(tmp_path, "reference", target), cwd=REPO, env=env, check=True)
    resumed, reference = _evals(results), _evals(run_paths(tmp_path, "reference")[0])
    assert [u for u, *_ in resumed] == list(range(0, target + 1, 20))
    assert resumed == reference  # identical losses: same data order, optimizer state and RNG after the resume
    assert_same_run(results, run_paths(tmp_path, "reference")[0], budget_differs=True)
    kinds = [r["type"] for r in read_records(results)]
    assert kinds.count("header") == 1 and kinds.count("resume") == 1 and kinds[-1] == "end"


def test_resume_refuses_a_changed_configuration(tmp_path):
    run(small(max_updates=10, name="x"), tmp_path)
    with pytest.raises(ValueError, match="configuration changed"):
        run(small(max_updates=20, name="x", hyperparameters={"lr": 0.5}), tmp_path, resume=True)


def test_cli_reads_tuned_hyperparameters(tmp_path, capsys):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"small_autoencoder": {"sgd": {"lr": 0.02, "init_scale": 0.5}}}))
    assert cli_main(["--task", "small_autoencoder", "--sample", "--method", "sgd", "--hp-json", str(tuned),
                     "--updates", "5", "--quiet", "--out", str(tmp_path), "--train-eval-size", "100"]) == 0
    header = read_records(tmp_path / "small_autoencoder-sgd-seed0.jsonl")[0]
    assert header["hyperparameters"] == {"lr": 0.02} and header["init_scale"] == 0.5
    assert "completed" in capsys.readouterr().out


def test_report_tables_read_the_records(tmp_path):
    from fso_lib.bench.report import load_runs, loss_at_time, race_table, time_to_loss

    run(small("sgd", hyperparameters={"lr": 0.05}, max_updates=40, name="a"), tmp_path)
    (r,) = load_runs(tmp_path)
    assert r.status == "completed" and r.method == "sgd" and r.device_label.startswith("CPU")
    t_mid = float(r.times[2])
    assert loss_at_time(r, t_mid) == pytest.approx(r.train[2])
    assert math.isnan(loss_at_time(r, r.times[-1] + 100))  # the run did not last that long
    assert time_to_loss(r, float(r.train[3])) <= r.times[3] and time_to_loss(r, -1.0) == math.inf
    (row,) = race_table([r], [t_mid], [float(r.train[-1])])
    assert row["updates"] == 40 and row["ms/update"] > 0


@pytest.mark.parametrize("method", ["acp", "kfac"])
def test_chapter6_methods_resume_exactly(tmp_path, method):
    hp = {"amortization_period": 4} if method == "acp" else {"statistics_period": 2, "inverse_period": 4}
    cfg = dict(hyperparameters=hp, init_scale=1.0, eval_every=5, train_eval_size=100)
    run(small(method, max_updates=10, name="part", **cfg), tmp_path)  # inverses at 0, 4, 8: resume mid-period
    resumed = run(small(method, max_updates=15, name="part", **cfg), tmp_path, resume=True)
    reference = run(small(method, max_updates=15, name="whole", **cfg), tmp_path)
    assert _evals(resumed.results_path) == _evals(reference.results_path)
    assert_same_run(resumed.results_path, reference.results_path, budget_differs=True)


def test_tune_range_narrows_the_declared_domain(tmp_path):
    from fso_lib.bench.tune import RunObjective, tune
    from fso_lib.search import SerialExecutor

    seen = []

    class Recording(RunObjective):
        def __call__(self, params):
            seen.append(params)
            return {"cost": params["lr"]}

    objective = Recording("small_autoencoder", "acp", str(tmp_path), max_updates=1,
                          fixed={"init_scale": 1.0}, ranges={"lr": (0.01, 0.02), "damping": (0.5, 2.0)})
    with SerialExecutor() as executor:
        tune(objective, 6, executor, seed=0, method="random")
    assert len(seen) == 6
    assert all(0.01 <= p["lr"] <= 0.02 and 0.5 <= p["damping"] <= 2.0 and "init_scale" not in p for p in seen)
    with pytest.raises(ValueError, match="not searched"):
        tune(Recording("small_autoencoder", "sgd", str(tmp_path), max_updates=1, ranges={"damping": (0.1, 1.0)}), 1,
             SerialExecutor())


# ----------------------------------------------------------------------------- the step stays on the device
from fso_lib.bench.device_check import CountHostSyncs, check  # noqa: E402
from fso_lib.bench.runner import DivergenceMonitor, Run  # noqa: E402


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(3)
    with CountHostSyncs() as counter:
        float(t.sum()), bool(t.sum() > 0), t.sum().item(), int(t.argmax()), t.nonzero(), torch.equal(t, t)
    assert len(counter.ops) == 6
    with CountHostSyncs(host_tensors=[t]) as counter:
        t[0].item(), t.sum().item()  # t[0] is a view of t's memory: excluded; the sum is a new tensor
    assert len(counter.ops) == 1


@pytest.mark.parametrize("method", ["sgd", "sgd_momentum", "adam", "acp", "kfac", "natural_nn_implicit",
                                    "acp_quadratic_model", "ekfac", "shampoo", "soap"])
def test_the_steady_state_loop_never_reads_the_device(tmp_path, method):
    """Run.steady_state_loop between evaluations: no scalar read, no data-dependent shape, in the forward,
    backward or optimizer step (ACP's and K-FAC's refresh periods are longer than the check: a refresh
    reads a factorization's status by design). On a GPU, ``python -m fso_lib.bench.device_check`` checks
    the same with torch.cuda.set_sync_debug_mode("error")."""
    result = check(method, "cpu", updates=12, out_dir=str(tmp_path))
    assert result["updates"] == 12 and result["device"] == "cpu"
    assert result["host_reads"] == 0, result["first"]


def test_divergence_monitor_flags_on_the_device_and_reads_once():
    monitor = DivergenceMonitor(10.0, torch.device("cpu"))
    with CountHostSyncs() as counter:
        monitor.observe(torch.tensor(1e6))  # no baseline yet: only non-finite losses count
        monitor.set_baseline(2.0)
        monitor.observe(torch.tensor(19.0))
    assert counter.ops == [] and not monitor.read_and_clear()
    monitor.observe(torch.tensor(21.0))
    monitor.observe(torch.tensor(1.0))  # a later good loss does not clear the flag
    assert monitor.read_and_clear() and not monitor.read_and_clear()
    monitor.observe(torch.tensor(float("nan")))
    assert monitor.read_and_clear()
    assert monitor.diverged(None) and monitor.diverged(20.5) and not monitor.diverged(19.9)


def test_a_non_finite_minibatch_loss_between_evaluations_is_caught(tmp_path):
    """A single NaN minibatch loss after update 3 must mark the run diverged at the next evaluation,
    even though the evaluated loss itself is finite (the planted NaN does not touch the parameters)."""
    state = Run(small("sgd", hyperparameters={"lr": 0.01}, max_updates=40, eval_every=20, name="nan"), tmp_path)
    state.start()
    step = state.step

    def poisoned(*args):
        loss = step(*args)
        return loss * float("nan") if state.update == 3 else loss

    state.step = poisoned
    state.train()
    result = state.finish()
    assert result.status == "diverged" and result.updates == 20 and math.isfinite(result.train_loss)


def _cxx_compiler():
    return next((name for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name and shutil.which(name)), None)


@pytest.mark.skipif(_cxx_compiler() is None,
                    reason="torch.compile on a CPU generates C++ kernels and no C++ compiler ($CXX, g++, c++, clang++) is here")
@pytest.mark.parametrize("method, hp", [("sgd_momentum", {"lr": 0.01, "momentum": 0.9}), ("adam", {}),
                                        ("kfac", {"statistics_period": 2, "inverse_period": 4})])
def test_compiled_step_gives_the_eager_run(tmp_path, method, hp):
    """RunConfig(compile=True): torch.compile'd forward/backward and optimizer step (CUDA graphs on a GPU).
    On the CPU it must reproduce the eager run's evaluations to float32 rounding."""
    common = dict(hyperparameters=hp, max_updates=20, eval_every=10, train_eval_size=300)
    eager = run(small(method, name="eager", **common), tmp_path)
    compiled = run(small(method, name="compiled", compile=True, **common), tmp_path)
    a = [r for r in eager.records if r["type"] == "eval"]
    b = [r for r in compiled.records if r["type"] == "eval"]
    assert [r["update"] for r in b] == [0, 10, 20] and compiled.status == "completed"
    assert b[-1]["train_loss"] < 0.9 * b[0]["train_loss"]  # it trained
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
        assert y["test_loss"] == pytest.approx(x["test_loss"], rel=1e-5)


def test_progress_bar_is_tqdm_on_stderr(tmp_path, capsys):
    run(small("sgd", hyperparameters={"lr": 0.01}, max_updates=20, progress=True, name="bar"), tmp_path)
    err = capsys.readouterr().err
    assert "sgd: 100%" in err and "20/20" in err and "train loss=" in err
    run(small("sgd", hyperparameters={"lr": 0.01}, max_seconds=0.3, max_updates=None, progress=True, name="t"), tmp_path)
    assert "/0.3 s of training" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["acp", "kfac"])
def test_chapter6_divergence_is_read_from_the_optimizers_flag_at_evaluation(tmp_path, method):
    """The runner builds the chapter-6 optimizers with check_every=None (no host read per step) and reads
    their non-finite flag at the next evaluation: the run stops there, with the optimizer's reason."""
    state = Run(small(method, task="classification", hyperparameters={"lr": 1e6}, max_updates=60), tmp_path)
    assert state.optimizer.check_every is None
    state.start()
    state.train()
    result = state.finish()
    assert result.status == "diverged" and result.updates == 10
    assert result.records[-1]["divergence"].startswith(f"DivergenceError: {type(state.optimizer).__name__}")
    assert all(bool(torch.isfinite(p).all()) for p in state.model.parameters())  # the bad update was skipped


# ----------------------------------------------------------------------------- the race's methods and budgets (issue 12)
def test_min_updates_carries_a_run_past_its_time_budget(tmp_path):
    result = run(small("sgd", max_seconds=1e-4, min_updates=30, eval_every=10), tmp_path)
    assert result.status == "completed" and result.updates == 30 and result.seconds > 1e-4


def test_kfac_thesis_protocol_and_kfac_search_domain():
    import inspect

    from fso_lib.bench.methods import RACE_METHODS
    from fso_lib.optim import KFAC

    method = get_method("kfac_thesis")
    built = method.build(make_task("small_autoencoder", sample=True).build_model(seed=0), method.hyperparameters())
    opt = built.optimizer
    assert isinstance(opt, KFAC) and (opt.statistics_period, opt.inverse_period, opt.running_average) == (100, 100, 0.0)
    assert method.uses_statistics and set(RACE_METHODS) <= set(__import__("fso_lib.bench", fromlist=["METHODS"]).METHODS)
    accepted = set(inspect.signature(KFAC.__init__).parameters)
    for name in ("kfac", "kfac_thesis", "ekfac"):  # EKFAC (a KFAC) races against K-FAC with the same options
        names = set(get_method(name).domain.names)
        assert {"lr", "damping", "momentum", "init_scale"} <= names
        for option in ("kl_clip", "damping_adaptation", "step_rule"):  # Martens & Grosse's options, where KFAC has them
            assert (option in names) == (option in accepted)


def test_a_fixed_alpha_is_absorbed_by_the_learning_rate_and_the_damping():
    """ACP with a fixed α: the update is (η/α)·g(C + (ε/α)I)⁻¹, so (η, ε, α) and (η/α, ε/α, 1) train alike;
    the race searches η and ε with α = 1 (``acp_fixed_alpha``) instead of a redundant α."""
    from fso_lib.optim import make_optimizer

    torch.manual_seed(0)
    x = torch.rand(64, 12, dtype=torch.float64)

    def train(lr, damping, alpha):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(12, 5), torch.nn.Sigmoid(), torch.nn.Linear(5, 12)).double()
        opt = make_optimizer("acp", net, lr=lr, damping=damping, alpha=alpha, amortization_period=2)
        for _ in range(5):
            if opt.needs_statistics():
                opt.update_statistics(x[32:])
            opt.zero_grad()
            squared_error(net(x[:32]), x[:32]).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    start = train(0.0, 0.3, 4.0)
    scaled, unit, lr_only = train(0.2, 0.3, 4.0), train(0.05, 0.075, 1.0), train(0.05, 0.3, 1.0)
    torch.testing.assert_close(scaled, unit, rtol=1e-10, atol=1e-12)
    assert (scaled - start).abs().max() > 1e-2  # it trained
    assert (lr_only - scaled).abs().max() > 1e-4  # and the damping must be scaled too


def test_table41_thesis_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    from fso_lib.bench import table41
    from fso_lib.search import SerialExecutor

    calls = []

    def fake_trial(params, sample=False, sizes=(), **kwargs):
        calls.append(params)
        return math.log10(params["lr"]) ** 2 + params["init_scale"] + len(sizes)

    monkeypatch.setattr(table41, "sgd_trial", fake_trial)
    whole = table41.build_table_resumable(3, tmp_path / "whole", executor=SerialExecutor(), echo=lambda *a: None)
    assert len(calls) == 9 and len(whole["costs"]) == 3 and whole["sizes"] == list(table41.THESIS_SIZES)
    lines = (tmp_path / "whole" / "trials.jsonl").read_text().splitlines()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "trials.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # 4 nodes + a torn line
    calls.clear()
    resumed = table41.build_table_resumable(3, tmp_path / "killed", executor=SerialExecutor(), echo=lambda *a: None)
    assert len(calls) == 5 and resumed["costs"] == whole["costs"]
    assert len((tmp_path / "killed" / "trials.jsonl").read_text().splitlines()) == 10  # header + 9 whole lines
    assert table41.TableObjective(resumed)({"lr": 1e-3 * 1.01, "init_scale": 0.26}) == whole["costs"][0][0]
    with pytest.raises(SystemExit, match="another table"):
        table41.build_table_resumable(4, tmp_path / "killed", executor=SerialExecutor(), echo=lambda *a: None)


def test_the_process_clock_drives_the_time_budget(tmp_path, monkeypatch):
    """clock="process" reads time.process_time (through runner.CLOCKS): a fake CPU clock that advances 0.25 s per
    reading stops a 2-second run after a number of updates fixed by the readings, not by the machine's load."""
    from fso_lib.bench import runner

    readings = iter(range(10_000))
    monkeypatch.setitem(runner.CLOCKS, "process", lambda: 0.25 * next(readings))
    result = run(small(max_seconds=2.0, eval_every=1000, clock="process"), tmp_path)
    records = read_records(run_paths(tmp_path, result.name)[0])
    assert records[0]["config"]["clock"] == "process"
    # one reading at the start and one per update: 2.0 s are spent after 8 updates; one more reading stops the clock
    assert result.status == "completed" and result.updates == 8 and result.seconds == 2.25


def test_clock_choices_are_checked():
    with pytest.raises(ValueError, match="clock must be one of"):
        small(max_updates=5, clock="cpu")
    with pytest.raises(ValueError, match="GPU"):
        small(max_updates=5, clock="process", device="cuda")


def test_the_header_names_the_code_revision_the_run_imported(tmp_path):
    from fso_lib.bench import runner

    result = run(small(max_updates=2), tmp_path)
    header = read_records(run_paths(tmp_path, result.name)[0])[0]
    assert header["versions"]["code"] == runner.CODE_REVISION
    inside_git = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=Path(runner.__file__).parent,
                                capture_output=True).returncode == 0
    assert (runner.CODE_REVISION is not None) == inside_git
