"""The GPU lease's tooling (issue 15): the smoke pass, the reading of a GPU set, the committed H200 set, and
``scripts/gpu_session.sh`` dry-run on the CPU (thesis §6.6, figure 6.2).

Everything trains on the 1,000-image MNIST sample for a few updates; all outputs go to ``tmp_path``.
"""
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from fso_lib.bench import RunConfig, read_records, run
from fso_lib.bench.gpu_set import (PROTOCOL_UPDATES, THESIS_SECONDS, GpuSet, best_loss, host_reads, load_gpu_set,
                                   on_alone_clock, per_update_rows, protocol_rows, same_seed_rows)
from fso_lib.bench.report import RESULTS_DIR, load_runs
from fso_lib.bench.smoke import float32_settings, main as smoke_main, read_tuned, smoke
import fso_lib.bench.smoke as smoke_module

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def evals_of(path):
    return [r for r in read_records(path) if r.get("type") == "eval"]


# ----------------------------------------------------------------------------- 1. the smoke pass
TUNED = {"sgd": {"lr": 0.05, "init": "sparse", "init_scale": 1.1}, "kfac": {"lr": 0.1, "damping": 0.3}}


def test_smoke_runs_each_method_with_its_tuned_hyperparameters(tmp_path):
    rows = smoke(["sgd", "kfac"], "cpu", 6, TUNED, tmp_path, seed=3, sample=True)
    summary = json.loads((tmp_path / "smoke.json").read_text())
    assert summary["results"] == rows and [r["method"] for r in rows] == ["sgd", "kfac"]
    assert summary["device"] == "cpu" and summary["updates"] == 6 and summary["seed"] == 3
    assert summary["float32"] == float32_settings() and "gpu" not in summary["machine"]
    for row in rows:
        assert row["status"] == "completed" and row["updates"] == 6 and row["tuned"] is True
        assert row["ms_per_update"] > 0 and row["ms_per_update_second_half"] > 0 and row["wall_s"] >= row["train_s"]
        assert row["ms_per_update"] == pytest.approx(row["train_s"] / 6 * 1e3)
        records = read_records(tmp_path / f"smoke-{row['method']}.jsonl")
        header, evals = records[0], [r for r in records if r["type"] == "eval"]
        # evaluations at the middle and the end; the second half is the last interval's time per update
        assert [e["update"] for e in evals] == [0, 3, 6]
        assert row["ms_per_update_second_half"] == evals[-1]["ms_per_update"]
        assert row["train_loss"] == evals[-1]["train_loss"] < evals[0]["train_loss"]
        assert header["config"]["seed"] == 3 and header["device"] == "cpu" and header["n_train"] == 1000
    # the tuned table reached the runs: the method's hyperparameters and the model's initialization
    sgd_header = read_records(tmp_path / "smoke-sgd.jsonl")[0]
    assert sgd_header["hyperparameters"]["lr"] == 0.05
    assert (sgd_header["init"], sgd_header["init_scale"]) == ("sparse", 1.1)
    kfac_header = read_records(tmp_path / "smoke-kfac.jsonl")[0]
    assert kfac_header["hyperparameters"]["lr"] == 0.1 and kfac_header["hyperparameters"]["damping"] == 0.3
    assert kfac_header["init"] == "glorot"  # the task's default: the table gave none


def test_a_failing_method_is_an_error_row_and_the_pass_goes_on(tmp_path):
    rows = smoke(["no_such_method", "sgd"], "cpu", 4, {}, tmp_path, task_name="small_autoencoder", sample=True)
    assert [r["method"] for r in rows] == ["no_such_method", "sgd"]
    assert rows[0]["status"] == "error" and "no_such_method" in rows[0]["error"]
    assert rows[1]["status"] == "completed" and rows[1]["updates"] == 4 and rows[1]["tuned"] is False
    assert json.loads((tmp_path / "smoke.json").read_text())["results"] == rows


def test_smoke_json_is_written_after_every_method(tmp_path, monkeypatch):
    """A pass cut during its second method (the lease's limit) keeps the first method's row."""
    real, calls = smoke_module.smoke_one, []

    def cut_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(smoke_module, "smoke_one", cut_on_second)
    with pytest.raises(KeyboardInterrupt):
        smoke(["sgd", "adam"], "cpu", 2, {}, tmp_path, task_name="small_autoencoder", sample=True)
    rows = json.loads((tmp_path / "smoke.json").read_text())["results"]
    assert [(r["method"], r["status"]) for r in rows] == [("sgd", "completed")]


def test_read_tuned_takes_the_task_table_or_a_flat_one(tmp_path):
    nested, flat = tmp_path / "nested.json", tmp_path / "flat.json"
    nested.write_text(json.dumps({"_provenance": {}, "autoencoder": TUNED}))
    flat.write_text(json.dumps(TUNED))
    assert read_tuned(str(nested), "autoencoder") == TUNED == read_tuned(str(flat), "autoencoder")
    assert read_tuned(None, "autoencoder") == {}


def test_smoke_main_exit_code_says_whether_a_method_failed(tmp_path):
    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"autoencoder": {"sgd": {"lr": 0.03, "init_scale": 0.9}}}))
    common = ["--updates", "2", "--device", "cpu", "--sample", "--hp-json", str(table)]
    assert smoke_main(["--methods", "no_such_method", "sgd", "--out", str(tmp_path / "bad"), *common]) == 1
    bad = json.loads((tmp_path / "bad" / "smoke.json").read_text())["results"]
    assert [r["status"] for r in bad] == ["error", "completed"]
    assert smoke_main(["--methods", "sgd", "--out", str(tmp_path / "good"), *common]) == 0
    header = read_records(tmp_path / "good" / "smoke-sgd.jsonl")[0]
    assert header["hyperparameters"]["lr"] == 0.03 and header["init_scale"] == 0.9 and header["n_train"] == 1000


# ----------------------------------------------------------------------------- 2. reading a GPU set
TASK = "small_autoencoder"


def tiny(method, hyperparameters, updates=40, seed=1, **kwargs):
    return RunConfig(task=TASK, method=method, hyperparameters=hyperparameters, sample=True, batch_size=100,
                     max_updates=updates, eval_every=10, eval_schedule="linear", train_eval_size=300,
                     seed=seed, device="cpu", progress=False, **kwargs)


HP = {"sgd": {"lr": 0.1}, "adam": {"lr": 1e-3}, "kfac": {"lr": 0.05}, "acp": {"lr": 0.05},
      "sgd_momentum": {"lr": 0.05}}

#: A smoke pass by hand: second-half time, a missing second half (its whole-pass time stands in), an error.
SMOKE = {"device": "cuda", "machine": {"gpu": "Test GPU"}, "results": [
    {"method": "sgd", "status": "completed", "ms_per_update": 3.0, "ms_per_update_second_half": 2.5},
    {"method": "adam", "status": "completed", "ms_per_update": 4.0, "ms_per_update_second_half": None},
    {"method": "kfac", "status": "error", "error": "RuntimeError: out of memory"},
    {"method": "acp", "status": "completed", "ms_per_update": 9.0, "ms_per_update_second_half": 7.0}]}
ALONE = {"sgd": 2.5, "adam": 4.0, "kfac": math.nan, "acp": 7.0, "sgd_momentum": math.nan}


@pytest.fixture(scope="module")
def fake_set(tmp_path_factory, one_torch_thread):
    """A GPU set folder (full/ with real tiny runs, smoke/smoke.json by hand) and a folder of CPU twins."""
    root = tmp_path_factory.mktemp("gpu_set")
    for method, hp in HP.items():
        init = {"init": "sparse", "init_scale": 1.0} if method == "sgd_momentum" else {}
        run(tiny(method, hp, **init), root / "full")
    (root / "smoke").mkdir()
    (root / "smoke" / "smoke.json").write_text(json.dumps(SMOKE))
    cpu = root / "cpu"
    run(tiny("sgd", HP["sgd"], updates=20), cpu)  # the twin: same seed and settings, shorter
    run(tiny("sgd", HP["sgd"], updates=20, seed=2), cpu)  # same method, another seed: not a twin
    run(tiny("adam", {"lr": 2e-3}), cpu)  # another learning rate: skipped
    run(tiny("kfac", HP["kfac"], init_scale=0.5), cpu)  # another init scale: skipped
    run(tiny("sgd_momentum", HP["sgd_momentum"], init="glorot", init_scale=1.0), cpu)  # another init
    return root


def test_load_gpu_set_reads_the_runs_and_the_smoke_pass(fake_set, tmp_path):
    gpu = load_gpu_set(fake_set, task=TASK)
    assert sorted(r.method for r in gpu.runs) == sorted(HP) and gpu.smoke == SMOKE
    assert all(r.path.parent == fake_set / "full" for r in gpu.runs)  # not the CPU twins
    assert gpu.device_label == gpu.runs[0].device_label
    for method, alone in ALONE.items():
        assert gpu.alone_ms(method) == pytest.approx(alone, nan_ok=True)
    assert load_gpu_set(fake_set, task="autoencoder") is None  # no run of that task
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "smoke.json").write_text(json.dumps(SMOKE))
    assert load_gpu_set(tmp_path, task=TASK) is None  # no full/ folder
    (tmp_path / "full").mkdir()
    assert load_gpu_set(tmp_path, task=TASK) is None  # an empty one
    only_runs = tmp_path / "only_runs"
    (only_runs / "full").mkdir(parents=True)
    for path in (fake_set / "full").glob("*sgd-seed1.jsonl"):
        (only_runs / "full" / path.name).write_bytes(path.read_bytes())
    without_smoke = load_gpu_set(only_runs, task=TASK)
    assert [r.method for r in without_smoke.runs] == ["sgd"] and math.isnan(without_smoke.alone_ms("sgd"))


@pytest.mark.parametrize("protocol_updates", [PROTOCOL_UPDATES, 1000])
def test_protocol_rows_arithmetic(fake_set, protocol_updates):
    gpu = load_gpu_set(fake_set, task=TASK)
    labels = {"sgd": "SGD", "kfac": "K-FAC"}
    rows = protocol_rows(gpu, labels, protocol_updates=protocol_updates)
    assert len(rows) == len(HP)
    for row, run_ in zip(rows, gpu.runs):
        last = evals_of(run_.path)[-1]  # the file itself, not the arrays protocol_rows reads
        method = run_.method
        assert row["method"] == labels.get(method, method)
        assert row["updates reached"] == last["update"] == 40
        assert row["share of the protocol"] == pytest.approx(40 / protocol_updates)
        assert row["training s"] == pytest.approx(last["time_s"]) and last["time_s"] > 0
        assert row["ms/update, all at once"] == pytest.approx(last["time_s"] / 40 * 1e3)
        assert run_.ms_per_update == pytest.approx(row["ms/update, all at once"])
        assert row["ms/update, alone"] == pytest.approx(ALONE[method], nan_ok=True)
        assert row["protocol alone, s (projected)"] == pytest.approx(ALONE[method] * protocol_updates / 1e3,
                                                                     nan_ok=True)
        assert row["thesis, s (Titan Black)"] == pytest.approx(THESIS_SECONDS.get(method, math.nan), nan_ok=True)
    sgd = next(r for r in rows if r["method"] == "SGD")
    assert sgd["protocol alone, s (projected)"] == pytest.approx(2.5 * protocol_updates / 1000)


def test_per_update_rows_only_at_points_the_run_reached(fake_set):
    gpu = load_gpu_set(fake_set, task=TASK)
    figure = {"SGD (thesis)": {10: 100.0, 25: 50.0, 40: 20.0, 1000: 1.0}, "kfac": {50: 3.0}}
    rows = per_update_rows(gpu.runs, figure, lambda m: {"sgd": "SGD (thesis)"}.get(m, m), {"sgd": "SGD"})
    sgd_evals = {e["update"]: e["train_loss"] for e in evals_of(fake_set / "full" / f"{TASK}-sgd-seed1.jsonl")}
    # 1000 is past the run's 40 updates; K-FAC's only point (50) too; the other methods have no curve
    assert [(r["method"], r["updates"]) for r in rows] == [("SGD", 10), ("SGD", 25), ("SGD", 40)]
    expected = {10: sgd_evals[10], 25: sgd_evals[20], 40: sgd_evals[40]}  # 25: the last evaluation before it
    for row in rows:
        assert row["ours"] == pytest.approx(expected[row["updates"]])
        assert row["ours / thesis"] == pytest.approx(row["ours"] / row["thesis"])
    assert [r["thesis"] for r in rows] == [100.0, 50.0, 20.0]


def test_same_seed_rows_pair_only_twins(fake_set):
    gpu_runs = load_runs(fake_set / "full", task=TASK)
    cpu_runs = load_runs(fake_set / "cpu", task=TASK)
    rows = same_seed_rows(gpu_runs, cpu_runs, [0, 10, 20, 30], {"sgd": "SGD"})
    # adam (another lr) and kfac (another init scale) are skipped, acp has no twin; sgd's twin stops at 20
    sgd_rows = [r for r in rows if r["method"] == "SGD"]
    assert [r["updates"] for r in sgd_rows] == [0, 10, 20]
    assert {r["method"] for r in rows} <= {"SGD", "sgd_momentum"}
    for row in sgd_rows:  # same seed, same settings, same device: the same numbers
        assert row["relative gap"] <= 1e-6 and row["GPU"] == pytest.approx(row["CPU"], rel=1e-6)
    # the threshold discriminates: the seed-2 run of the same method is far from the seed-1 run
    gpu_sgd = next(r for r in gpu_runs if r.method == "sgd")
    seed2 = next(r for r in cpu_runs if r.method == "sgd" and r.header["config"]["seed"] == 2)
    assert abs(gpu_sgd.train[1] - seed2.train[1]) / seed2.train[1] > 1e-3


def test_same_seed_rows_skip_a_twin_with_another_init(fake_set):
    gpu_runs = load_runs(fake_set / "full", task=TASK)
    cpu_runs = load_runs(fake_set / "cpu", task=TASK)
    rows = same_seed_rows(gpu_runs, cpu_runs, [0, 10, 20], {})
    assert not [r for r in rows if r["method"] == "sgd_momentum"]  # sparse on one side, glorot on the other


def test_on_alone_clock_rebuilds_the_time_axis_from_the_smoke_pass(fake_set):
    gpu = load_gpu_set(fake_set, task=TASK)
    shared_times = [run_.times.copy() for run_ in gpu.runs]
    for before, after in zip(gpu.runs, on_alone_clock(gpu)):
        alone = ALONE[before.method]
        assert after.method == before.method and list(after.updates) == list(before.updates)
        assert after.times == pytest.approx(before.updates * alone / 1e3, nan_ok=True)
        assert after.ms_per_update == pytest.approx(alone, nan_ok=True)
        assert list(after.train) == list(before.train)
    assert all((run_.times == times).all() for run_, times in zip(gpu.runs, shared_times))  # a copy


def test_best_loss_is_the_lowest_evaluation(fake_set):
    path = fake_set / "full" / f"{TASK}-adam-seed1.jsonl"
    gpu = load_gpu_set(fake_set, task=TASK)
    run_ = next(r for r in gpu.runs if r.path == path)
    for which in ("train", "test"):
        best = min(evals_of(path), key=lambda e: e[f"{which}_loss"])
        found = best_loss(run_, which)
        assert (found["loss"], found["updates"], found["seconds"]) == (best[f"{which}_loss"], best["update"],
                                                                       best["time_s"])
        assert found["near_end"] == (best["update"] >= 36)


def test_host_reads_reads_the_cuda_lines_of_device_check(fake_set, tmp_path):
    gpu = load_gpu_set(fake_set, task=TASK)
    assert host_reads(GpuSet(tmp_path, gpu.runs, SMOKE)) == {}  # no device_check.txt
    (tmp_path / "device_check.txt").write_text(
        "sgd          cuda     compile=False 30 updates: 0 host reads, 2.02 ms/update\n"
        "mean_only_batchnorm cuda:1   compile=False 30 updates: 2 host reads (first: RuntimeError: x), 2.3 ms/update\n"
        "kfac         cpu      compile=False 30 updates: 5 host reads, 6.47 ms/update\n")
    assert host_reads(GpuSet(tmp_path, gpu.runs, SMOKE)) == {"sgd": 0, "mean_only_batchnorm": 2}


# ----------------------------------------------------------------------------- 3. the committed H200 set
def test_the_committed_gpu_set_is_consistent():
    folder = RESULTS_DIR / "gpu"
    gpu = load_gpu_set(folder)
    assert gpu is not None and len(gpu.runs) == 11
    assert {r.device_label for r in gpu.runs} == {"GPU: NVIDIA H200"} == {gpu.device_label}
    assert all(r.header["device"].startswith("cuda") for r in gpu.runs)
    assert gpu.smoke["device"].startswith("cuda") and gpu.smoke["machine"]["gpu"] == "NVIDIA H200"
    smoke_rows = {r["method"]: r for r in json.loads((folder / "smoke" / "smoke.json").read_text())["results"]}
    protocol = {r.method for r in gpu.runs}
    assert len(protocol) == 11 and protocol <= set(smoke_rows)
    assert all(smoke_rows[m]["status"] == "completed" for m in protocol)
    for run_ in gpu.runs:  # the smoke pass and the protocol ran the same settings
        smoke_header = read_records(folder / "smoke" / f"smoke-{run_.method}.jsonl")[0]
        assert run_.header["hyperparameters"] == smoke_header["hyperparameters"]
        assert (run_.header["init"], run_.header["init_scale"]) == (smoke_header["init"], smoke_header["init_scale"])
        assert run_.header["config"]["seed"] == 1 and run_.header["n_train"] == 60_000
    assert host_reads(gpu) == {m: 0 for m in protocol}  # device_check.txt: every method, no host read
    rows = {r["method"]: r for r in protocol_rows(gpu, {})}
    sgd_alone = smoke_rows["sgd"]["ms_per_update_second_half"]
    assert rows["sgd"]["protocol alone, s (projected)"] == pytest.approx(sgd_alone * 300)
    last = evals_of(folder / "full" / "autoencoder-sgd-seed1.jsonl")[-1]
    assert rows["sgd"]["updates reached"] == last["update"] and rows["sgd"]["training s"] == last["time_s"]


# ----------------------------------------------------------------------------- 4. scripts/gpu_session.sh
def session(tmp_path, device, wait_for, **settings):
    """Run the session script with its output to a file, not a pipe: the background packer's ``sleep 30``
    outlives the script and keeps its ``tee`` (hence a pipe) open for up to 30 s more. Returns (rc, seconds,
    console text)."""
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"autoencoder": {"sgd": {"lr": 0.05, "init": "sparse", "init_scale": 1.1},
                                                 "kfac": {"lr": 0.1}}}))
    env = {k: v for k, v in os.environ.items() if k not in ("FSO_DEVICE", "EXTRA")}
    env.update(OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), DEVICE=device, FSO_FAST="1",
               PYTHON=sys.executable, METHODS="sgd kfac", TUNED=str(tuned))
    env.update(settings)
    console = tmp_path / "console.txt"
    started = time.monotonic()
    with open(console, "w") as handle:
        rc = subprocess.run([str(REPO / "scripts" / "gpu_session.sh")], env=env, stdout=handle,
                            stderr=subprocess.STDOUT, timeout=240).returncode
    seconds = time.monotonic() - started
    for _ in range(50):  # tee may still be writing the last lines
        text = console.read_text()
        if wait_for in text:
            break
        time.sleep(0.1)
    return rc, seconds, text


def members(tgz):
    with tarfile.open(tgz) as archive:
        names = [m.name for m in archive.getmembers()]
    return {n[2:] if n.startswith("./") else n for n in names}


def test_session_script_dry_run_on_cpu(tmp_path):
    rc, seconds, text = session(tmp_path, "cpu", "== done", SMOKE_UPDATES="6", UPDATES="30", FULL_CAP="60")
    assert rc == 0, text
    assert "smoke: 2 of 2 methods ran" in text and "== done" in text
    work, tgz = tmp_path / "work", tmp_path / "out" / "gpu_results.tgz"
    names = members(tgz)
    assert {"smoke/smoke.json", "device_check.txt", "full/autoencoder-sgd-seed1.jsonl",
            "full/autoencoder-kfac-seed1.jsonl", "console.log"} <= names
    assert (work / "full" / "checkpoints").is_dir()  # there were checkpoints to leave out
    assert not [n for n in names if "checkpoints" in n]
    smoke_rows = json.loads((work / "smoke" / "smoke.json").read_text())["results"]
    assert [(r["method"], r["status"], r["updates"]) for r in smoke_rows] == [("sgd", "completed", 6),
                                                                               ("kfac", "completed", 6)]
    check = (work / "device_check.txt").read_text().splitlines()
    assert len(check) == 2 and all("0 host reads" in line for line in check)
    for method in ("sgd", "kfac"):
        records = read_records(work / "full" / f"autoencoder-{method}-seed1.jsonl")
        header = records[0]
        assert header["device"] == "cpu" and header["n_train"] == 1000 and header["config"]["seed"] == 1
        assert "2 runs shared the device" in header["config"]["note"]
        assert records[-1]["type"] == "end" and records[-1]["update"] == 30
    sgd_header = read_records(work / "full" / "autoencoder-sgd-seed1.jsonl")[0]
    assert sgd_header["hyperparameters"]["lr"] == 0.05 and sgd_header["init_scale"] == 1.1  # TUNED reached it
    print(f"dry run: {seconds:.1f} s")


def test_session_script_stops_after_the_smoke_pass_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the failure path is not reachable")
    rc, seconds, text = session(tmp_path, "cuda", "stopping here", SMOKE_UPDATES="4", UPDATES="20")
    assert rc != 0
    assert "was requested but this PyTorch build sees no CUDA GPU" in text  # fso_lib.config.get_device
    assert "most methods failed the smoke pass: stopping here" in text
    assert "== 3." not in text and "== 4." not in text and not (tmp_path / "work" / "full").exists()
    assert seconds < 60
    assert "console.log" in members(tmp_path / "out" / "gpu_results.tgz")  # packed on the way out


def test_session_script_stops_when_most_methods_fail_the_smoke_pass(tmp_path):
    rc, seconds, text = session(tmp_path, "cpu", "stopping here", SMOKE_UPDATES="2", UPDATES="20",
                                METHODS="no_such_a no_such_b sgd")
    assert rc != 0
    assert "smoke: 1 of 3 methods ran; failed: ['no_such_a', 'no_such_b']" in text
    assert "most methods failed the smoke pass: stopping here" in text and "== 3." not in text
    rows = json.loads((tmp_path / "work" / "smoke" / "smoke.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["error", "error", "completed"]  # the pass went on after the errors
