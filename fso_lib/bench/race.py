"""The race with an equal tuning budget (thesis §4.1, §6.6; issue 12): tune every method alike, then run
each with its best hyperparameters on several seeds.

Protocol (:class:`RaceConfig`, defaults in brackets):

1. **Tuning, equal for every method.** Round 1: biased random search (thesis Algorithm 1) of [16] trials over
   the method's declared domain (:mod:`.methods`); round 2: [8] trials of the same search in a domain
   narrowed around round 1's best (:func:`fso_lib.search.narrow`, width [0.25] of each unit range). Every
   trial trains [1,500] updates (minibatch [200], Martens' sparse initialization, whose scale is searched)
   on the same data order and initialization seed ([0]); its cost is the train squared error at the end
   (inf when it diverged). Trials run one after the other within a method, so that a search is
   deterministic and resumes exactly.
2. **Final runs.** The best trial of both rounds, run on seeds [1, 2, 3] (other data orders and
   initializations than the tuning's) for [600] s of training time and at least [10,000] updates.
3. **Conditions.** [2] runs at a time on [1] torch thread each (``workers``, ``threads``): recorded in
   ``race.json``, in every run's header note and, with the load average, in ``race_log.jsonl``.

Files under ``out``: ``race.json`` (configuration), ``race_log.jsonl`` (every invocation with its command
line, every job's start and end), ``tuningR/search-TASK-METHOD.jsonl`` (round R's trials, one line each,
appended as they finish) and the trial runs ``tuningR/TASK-METHOD-KEY.jsonl``, ``tuned.json`` (each method's
best), and the final runs ``TASK-METHOD-seedS.jsonl`` (checkpoints in ``checkpoints/``, git-ignored).
Running the same command again resumes: finished trials and runs are skipped, a killed final run continues
from its checkpoint, a killed trial from its last evaluation.

Command line: ``python -m fso_lib.bench race --help``; ``--plan`` prints the budget arithmetic.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..search import (Domain, SerialExecutor, Trial, append_trial, narrow, read_trial_log, run_search,
                      start_trial_log)
from .methods import RACE_METHODS, get_method
from .runner import read_records, run_paths

REPO = Path(__file__).resolve().parents[2]
SPEED_FILE = REPO / "data" / "results" / "speed" / "optimizer_speed.json"
OLD_RACE_DIR = REPO / "data" / "results" / "cpu"


@dataclass
class RaceConfig:
    """Everything that defines a race; see the module docstring."""

    out: str = "data/results/race_cpu"
    task: str = "autoencoder"
    methods: tuple = RACE_METHODS
    rounds: tuple = (12, 8)  # trials per round; round 2 and later search around the best so far
    narrow_width: float = 0.25
    horizon: int = 1000  # updates per tuning trial (the budget arithmetic: see data/results/README.md)
    tuning_seed: int = 0  # data order and initialization of every tuning trial
    search: str = "biased"
    final_seeds: tuple = (1, 2, 3)
    final_seconds: float = 600.0
    final_min_updates: int = 10_000
    workers: int = 2  # runs at once
    threads: int = 1  # torch threads per run
    batch_size: int = 200
    init: str = "sparse"
    trial_eval_every: int = 500
    final_eval_every: int = 1000
    train_eval_size: int = 10_000
    sample: bool | None = None  # True: the 1,000-image MNIST sample (smoke tests)
    # the final runs' clock (fso_lib.bench.runner.CLOCKS): "process" = CPU seconds of each run's own process, which
    # with one thread per run is its time on a core nothing else competes for, whatever else the machine does
    clock: str = "process"

    def __post_init__(self):
        self.methods, self.rounds, self.final_seeds = tuple(self.methods), tuple(self.rounds), tuple(self.final_seeds)
        for name in self.methods:
            get_method(name)
        if not self.rounds or min(self.rounds) < 1:
            raise ValueError("every round needs at least one trial")
        if self.clock == "process" and self.threads != 1:
            raise ValueError('clock="process" sums the CPU seconds of all threads: use threads=1 with it, '
                             'or clock="wall".')

    #: fields that may change between invocations of one race (they change no trial and no run's definition)
    RESUMABLE = ("workers", "threads", "methods", "final_seeds")

    @property
    def trials_per_method(self) -> int:
        return sum(self.rounds)

    def note(self) -> str:
        clock = "CPU seconds of each run's process" if self.clock == "process" else "wall-clock seconds"
        return (f"race: {self.workers} run(s) at a time, {self.threads} torch thread(s) each, "
                f"on a {os.cpu_count()}-core machine; clock: {clock}")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- tuning
def _round_folder(config: RaceConfig, round_index: int) -> Path:
    return Path(config.out) / f"tuning{round_index + 1}"


def search_file(config: RaceConfig, method: str, round_index: int) -> Path:
    return _round_folder(config, round_index) / f"search-{config.task}-{method}.jsonl"


def _objective(config: RaceConfig, method: str, round_index: int):
    from .tune import RunObjective

    return RunObjective(config.task, method, str(_round_folder(config, round_index)), max_updates=config.horizon,
                        fixed={"init": config.init}, seed=config.tuning_seed, sample=config.sample,
                        threads=config.threads, eval_every=config.trial_eval_every, resume=True,
                        keep_checkpoint=False, batch_size=config.batch_size,
                        train_eval_size=config.train_eval_size)


def round_domain(config: RaceConfig, method: str, round_index: int, earlier: list[Trial]) -> Domain:
    """Round 1 searches the method's declared domain; a later round narrows it around the best trial so far
    (the declared domain again if every earlier trial diverged)."""
    domain = get_method(method).domain
    finite = [t for t in earlier if t.finite]
    if round_index == 0 or not finite:
        return domain
    return narrow(domain, min(finite, key=lambda t: t.cost).params, config.narrow_width)


def tune_method(config: RaceConfig, method: str, stop_after: int | None = None) -> dict:
    """Both rounds of ``method``'s tuning, resuming from the trials files; returns the best trial overall.

    ``stop_after`` (tests): raise :class:`Interrupted` after that many new trials, as a kill would."""
    _set_threads(config.threads)
    new_trials = [0]
    all_trials: list[Trial] = []
    for round_index, n_trials in enumerate(config.rounds):
        domain = round_domain(config, method, round_index, all_trials)
        header = {"method": method, "task": config.task, "round": round_index + 1, "search": config.search,
                  "search_seed": round_index, "n_trials": n_trials, "domain": domain.to_json(),
                  "horizon_updates": config.horizon, "data_seed": config.tuning_seed, "init": config.init,
                  "batch_size": config.batch_size}
        path = search_file(config, method, round_index)
        history = start_trial_log(path, header)

        def record(trial, path=path):
            append_trial(path, trial)
            new_trials[0] += 1
            if stop_after is not None and new_trials[0] >= stop_after:
                raise Interrupted(f"stopped after {new_trials[0]} new trials")

        result = run_search(_objective(config, method, round_index), domain, n_trials, method=config.search,
                            seed=round_index, executor=SerialExecutor(), max_in_flight=1, on_trial=record,
                            history=history)
        all_trials += result.trials
    finite = [t for t in all_trials if t.finite]
    best = min(finite, key=lambda t: t.cost) if finite else None
    return {"method": method, "trials": len(all_trials), "diverged": len(all_trials) - len(finite),
            "best": None if best is None else {"params": {"init": config.init, **best.params}, "cost": best.cost,
                                               "round": _round_of(config, best, all_trials)}}


def _round_of(config: RaceConfig, best: Trial, trials: list[Trial]) -> int:
    position = next(k for k, t in enumerate(trials) if t is best)
    return int(np.searchsorted(np.cumsum(config.rounds), position, side="right")) + 1


class Interrupted(RuntimeError):
    """Raised by ``stop_after`` to simulate a kill in tests."""


def tuning_done(config: RaceConfig, method: str) -> bool:
    for round_index, n_trials in enumerate(config.rounds):
        path = search_file(config, method, round_index)
        if not path.exists() or len(read_trial_log(path)[1]) < n_trials:
            return False
    return True


# ----------------------------------------------------------------------------- final runs
def final_config(config: RaceConfig, method: str, seed: int, params: dict):
    from .runner import RunConfig

    hp = dict(params)
    init, init_scale = hp.pop("init", config.init), hp.pop("init_scale", None)
    return RunConfig(task=config.task, method=method, hyperparameters=hp, init=init, init_scale=init_scale,
                     batch_size=config.batch_size, max_seconds=config.final_seconds,
                     min_updates=config.final_min_updates, eval_every=config.final_eval_every, eval_schedule="log",
                     train_eval_size=config.train_eval_size, seed=seed, sample=config.sample, progress=False,
                     note=config.note(), clock=config.clock)


def final_finished(config: RaceConfig, method: str, seed: int) -> bool:
    """Whether the final run's file ends with an ``end`` record that closes its whole budget."""
    path, _ = run_paths(config.out, f"{config.task}-{method}-seed{seed}")
    if not path.exists():
        return False
    records = read_records(path)
    end = records[-1] if records and records[-1].get("type") == "end" else None
    if end is None or end["status"] == "error":
        return False
    return end["status"] == "diverged" or (end["time_s"] >= config.final_seconds
                                           and end["update"] >= config.final_min_updates)


def final_run(config: RaceConfig, method: str, seed: int, params: dict) -> dict:
    from .runner import run

    _set_threads(config.threads)
    result = run(final_config(config, method, seed, params), config.out, resume=True)
    return {"method": method, "seed": seed, "status": result.status, "updates": result.updates,
            "seconds": result.seconds, "train_loss": result.train_loss}


# ----------------------------------------------------------------------------- the driver
def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _log(config: RaceConfig, record: dict) -> None:
    path = Path(config.out) / "race_log.jsonl"
    record = {**record, "wall_clock": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average": os.getloadavg()[0]}
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as handle:
        handle.write(("\n" if torn else "") + json.dumps(record) + "\n")  # a kill may have torn the last line


def _check_config(config: RaceConfig) -> None:
    """Write ``race.json``, or check that the race in ``out`` has the same definition."""
    path = Path(config.out) / "race.json"
    current = json.loads(json.dumps(config.to_json()))
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in current if k not in RaceConfig.RESUMABLE and saved.get(k) != current[k])
        if changed:
            raise SystemExit(f"{path} defines another race (changed: {changed}); use another --out.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1))


def tuned_table(config: RaceConfig) -> dict:
    path = Path(config.out) / "tuned.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_race(config: RaceConfig, stages=("tune", "final"), executor: Executor | None = None,
             command: list[str] | None = None, echo=print) -> dict:
    """Run (or resume) the race: tuning jobs (one per method), then each method's final runs as soon as its
    tuning is done. ``executor``: default a pool of ``config.workers`` spawned processes (``workers=0``: this
    process). Returns ``tuned.json``'s table."""
    from .tune import merge_tuned

    _check_config(config)
    _log(config, {"type": "invocation", "command": command or sys.argv, "stages": list(stages),
                  "config": config.to_json()})
    own = executor is None
    if own:
        executor = SerialExecutor() if config.workers == 0 else ProcessPoolExecutor(
            config.workers, mp_context=multiprocessing.get_context("spawn"))
    in_flight = max(1, config.workers)
    tuned_path = Path(config.out) / "tuned.json"
    speed = _ms_per_update_estimates()
    queue: list[tuple] = []
    if "tune" in stages:
        order = sorted(config.methods, key=lambda m: -speed.get(m, 0.0))  # the longest jobs first
        queue += [("tune", m) for m in order]
    elif "final" in stages:
        untuned = [m for m in config.methods if m not in tuned_table(config).get(config.task, {})]
        if untuned:
            echo(f"no tuned hyperparameters in {tuned_path} for {untuned}: their final runs are skipped")
        queue += _final_jobs(config, config.methods)
    pending = {}
    try:
        while queue or pending:
            while queue and len(pending) < in_flight:
                job = queue.pop(0)
                if job[0] == "tune":
                    if tuning_done(config, job[1]) and job[1] in tuned_table(config).get(config.task, {}):
                        echo(f"{job[1]}: tuning already done")
                        if "final" in stages:
                            queue += _final_jobs(config, [job[1]])
                        continue
                    future = executor.submit(tune_method, config, job[1])
                else:
                    future = executor.submit(final_run, config, *job[1:])
                _log(config, {"type": "start", "job": list(job[:3]), "in_flight": len(pending) + 1})
                echo(f"start {job[:3]}")
                pending[future] = job
            if not pending:
                continue
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - logged; the other jobs go on
                    _log(config, {"type": "error", "job": list(job[:3]), "error": f"{type(error).__name__}: {error}"})
                    echo(f"{job[:3]} failed: {type(error).__name__}: {error}")
                    continue
                _log(config, {"type": "end", "job": list(job[:3]), "outcome": outcome, "in_flight": len(pending) + 1})
                echo(f"done {job[:3]}: {outcome}")
                if job[0] == "tune":
                    best = outcome["best"]
                    if best is None:
                        echo(f"{job[1]}: every trial diverged; no final runs")
                        continue
                    merge_tuned(tuned_path, config.task, job[1], best["params"],
                                {"cost": best["cost"], "round": best["round"], "trials": outcome["trials"],
                                 "diverged_trials": outcome["diverged"], "rounds": list(config.rounds),
                                 "horizon_updates": config.horizon, "data_seed": config.tuning_seed})
                    if "final" in stages:
                        queue += _final_jobs(config, [job[1]])
    finally:
        if own:
            executor.shutdown(cancel_futures=True)
    return tuned_table(config)


def _final_jobs(config: RaceConfig, methods) -> list[tuple]:
    table = tuned_table(config).get(config.task, {})
    jobs = []
    for method in methods:
        if method not in table:
            continue
        for seed in config.final_seeds:
            if not final_finished(config, method, seed):
                jobs.append(("final", method, seed, table[method]))
    return jobs


# ----------------------------------------------------------------------------- results
def final_summary(config: RaceConfig, at_updates=(2000, 10_000), at_seconds=(60, 300, 600)) -> dict:
    """Per method: median, min and max over the final seeds of the train loss at the given updates and
    training seconds (:func:`fso_lib.bench.verdict.loss_over_seeds`; a point that a run did not reach is left
    out for the method)."""
    from .report import load_run
    from .verdict import loss_over_seeds

    summary = {}
    for method in config.methods:
        runs = []
        for seed in config.final_seeds:
            path, _ = run_paths(config.out, f"{config.task}-{method}-seed{seed}")
            if path.exists():
                runs.append(load_run(path))
        if not runs:
            continue
        row = {}
        for x_axis, points in (("updates", at_updates), ("time", at_seconds)):
            for x in points:
                stats = loss_over_seeds(runs, x, x_axis)
                if stats is not None:
                    row[f"{x:g}{' updates' if x_axis == 'updates' else ' s'}"] = stats
        summary[method] = {"seeds": len(runs), **row}
    return summary


# ----------------------------------------------------------------------------- the budget arithmetic
def _speed_results(path: Path = SPEED_FILE) -> dict:
    return json.loads(Path(path).read_text())["results"] if Path(path).exists() else {}


def _old_race_ms(folder: Path = OLD_RACE_DIR) -> dict:
    """ms per update of each method in the 2026-11-27 race (1 thread, 2 runs side by side)."""
    result = {}
    for path in sorted(Path(folder).glob("autoencoder-*-seed0.jsonl")):
        records = read_records(path)
        end = next((r for r in reversed(records) if r.get("type") == "end"), None)
        if end and end.get("ms_per_update"):
            result[records[0]["config"]["method"]] = end["ms_per_update"]
    return result


#: rows of the speed file that time a race method or a K-FAC option (registry name or row name -> race use)
SPEED_ROWS = {"kfac_thesis": "kfac_thesis_protocol", "kfac:quadratic_model": "kfac_quadratic_model"}


def _ms_per_update_estimates(speed_path: Path = SPEED_FILE, old_race: Path = OLD_RACE_DIR) -> dict:
    """Amortized ms per update of every race method at 2 threads alone, from the speed benchmark; the methods
    it did not time (Adam, SGD + momentum, the batch-norm variants) scaled from SGD by their ratio to SGD in
    the old race; ``kfac_thesis`` from its own row, else K-FAC with its statistics pass every 100 updates
    instead of every 10. ``kfac:quadratic_model``: K-FAC with the quadratic-model step rule, when timed."""
    speed, old = _speed_results(speed_path), _old_race_ms(old_race)
    ms = {name: speed[name]["amortized_ms"] for name in RACE_METHODS if name in speed}
    if "sgd" in ms:
        for name in RACE_METHODS:
            if name not in ms and name in old and "sgd" in old:
                ms[name] = ms["sgd"] * old[name] / old["sgd"]
    for name, row in SPEED_ROWS.items():
        if row in speed:
            ms[name] = speed[row]["amortized_ms"]
    if "kfac_thesis" not in ms and "kfac" in speed:
        kfac = speed["kfac"]
        ms["kfac_thesis"] = kfac["amortized_ms"] - kfac["breakdown_ms"]["statistics"] * (1 - 10 / 100)
    return ms


def _n_evaluations(updates: int, eval_every: int, schedule: str) -> int:
    from .runner import RunConfig, _next_eval

    config = RunConfig(max_updates=updates, eval_every=eval_every, eval_schedule=schedule)
    count, update = 1, 0
    while update < updates:
        update = min(_next_eval(update, config), updates)
        count += 1
    return count


def plan(config: RaceConfig, speed_path: Path = SPEED_FILE, old_race: Path = OLD_RACE_DIR,
         quadratic_model_ratio: float | None = None) -> dict:
    """Machine time of the race from measured costs per update (see :func:`_ms_per_update_estimates`).

    The speed file was measured with 2 threads and one process; the old race ran 1 thread per run, two runs
    side by side, so its ratio to the speed file (median over the methods both timed) is the slowdown of
    that configuration. An evaluation costs a forward pass of SGD (the speed file's breakdown) over the
    train-evaluation subset and the test set. Process start-up and data loading are not counted.
    ``quadratic_model_ratio``: the cost of a K-FAC update with the quadratic-model step rule over the fixed
    rule's, for when the speed file has no row for it (an assumption the printout labels as such)."""
    ms2 = _ms_per_update_estimates(speed_path, old_race)
    speed, old = _speed_results(speed_path), _old_race_ms(old_race)
    shared = [m for m in ms2 if m in old and m in speed]
    if config.threads == 1:
        slowdown = float(np.median([old[m] / speed[m]["amortized_ms"] for m in shared]))
        slowdown_source = f"median over {len(shared)} methods of (old race ms, 1 thread, 2 runs at once) / (speed file ms, 2 threads)"
    else:
        slowdown, slowdown_source = 1.0, "the speed file's own condition (2 threads, one run)"
    forward_ms = speed["sgd"]["breakdown_ms"]["forward"] * slowdown if "sgd" in speed else math.nan
    n_test = 10_000 if not config.sample else 1_000
    eval_s = forward_ms * (config.train_eval_size + n_test) / config.batch_size / 1e3
    rows, core_s, notes = {}, 0.0, []
    trial_evals = _n_evaluations(config.horizon, config.trial_eval_every, "linear") * eval_s
    for method in config.methods:
        ms = ms2.get(method, math.nan) * slowdown
        ms_first_round = ms_later = ms
        step_rules = next((p.choices for p in get_method(method).domain.params if p.name == "step_rule"), ())
        if "quadratic_model" in step_rules:
            ratio = ms2["kfac:quadratic_model"] / ms2["kfac"] if "kfac:quadratic_model" in ms2 else quadratic_model_ratio
            if ratio is not None:  # round 1 draws either rule alike; later rounds and finals: the dearer
                ms_quadratic = ratio * ms
                ms_first_round, ms_later = (ms + ms_quadratic) / 2, max(ms, ms_quadratic)
                if "kfac:quadratic_model" not in ms2:
                    notes.append(f"{method}: quadratic-model step rule counted at {ratio:g}× the fixed rule "
                                 "(--quadratic-model-ratio, not from the speed file)")
            else:
                notes.append(f"{method}: the quadratic-model step rule is not in the speed file; counted at the "
                             "fixed rule's cost, an underestimate")
        trial_s = config.horizon * ms_first_round / 1e3 + trial_evals
        later_trial_s = config.horizon * ms_later / 1e3 + trial_evals
        final_updates = max(config.final_min_updates, config.final_seconds * 1e3 / ms_later)
        final_s = (max(config.final_seconds, config.final_min_updates * ms_later / 1e3)
                   + _n_evaluations(int(final_updates), config.final_eval_every, "log") * eval_s)
        tuning = config.rounds[0] * trial_s + sum(config.rounds[1:]) * later_trial_s
        finals = len(config.final_seeds) * final_s
        rows[method] = {"ms_per_update": ms_later, "trial_s": trial_s, "tuning_h": tuning / 3600, "final_s": final_s,
                        "finals_h": finals / 3600}
        core_s += tuning + finals
    workers = max(1, config.workers)
    return {"methods": rows, "notes": notes, "slowdown": slowdown, "slowdown_source": slowdown_source, "eval_s": eval_s,
            "run_hours": core_s / 3600, "machine_hours": core_s / 3600 / workers, "workers": workers,
            "threads": config.threads, "trials_per_method": config.trials_per_method, "horizon": config.horizon}


def format_plan(p: dict, config: RaceConfig) -> str:
    lines = [f"Budget of the race in {config.out}: {len(config.methods)} methods × {p['trials_per_method']} trials "
             f"({' + '.join(map(str, config.rounds))}) of {p['horizon']} updates, then "
             f"{len(config.final_seeds)} seeds × max({config.final_seconds:g} s, {config.final_min_updates} updates).",
             f"ms/update = speed file (2 threads, alone) × {p['slowdown']:.2f} [{p['slowdown_source']}]; "
             f"one evaluation ≈ {p['eval_s']:.1f} s.",
             "", f"{'method':22s} {'ms/update':>9s} {'trial s':>8s} {'tuning h':>9s} {'final s':>8s} {'finals h':>9s}"]
    for method, row in p["methods"].items():
        lines.append(f"{method:22s} {row['ms_per_update']:9.1f} {row['trial_s']:8.0f} {row['tuning_h']:9.2f} "
                     f"{row['final_s']:8.0f} {row['finals_h']:9.2f}")
    lines += [f"note: {note}" for note in p["notes"]]
    lines += ["", f"run time in all: {p['run_hours']:.1f} h; with {p['workers']} run(s) at a time "
                  f"({p['threads']} thread(s) each): ≈ {p['machine_hours']:.1f} h of machine time "
                  "(ideal packing; start-up and data loading not counted)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    d = RaceConfig()
    p = argparse.ArgumentParser(prog="python -m fso_lib.bench race", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out)
    p.add_argument("--task", default=d.task)
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated")
    p.add_argument("--rounds", default=",".join(map(str, d.rounds)), help="trials per round, comma-separated")
    p.add_argument("--narrow-width", type=float, default=d.narrow_width)
    p.add_argument("--horizon", type=int, default=d.horizon, help="updates per tuning trial")
    p.add_argument("--tuning-seed", type=int, default=d.tuning_seed)
    p.add_argument("--search", choices=("biased", "random"), default=d.search)
    p.add_argument("--final-seeds", default=",".join(map(str, d.final_seeds)))
    p.add_argument("--final-seconds", type=float, default=d.final_seconds)
    p.add_argument("--final-min-updates", type=int, default=d.final_min_updates)
    p.add_argument("--workers", type=int, default=d.workers, help="runs at once (0: in this process)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per run")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--trial-eval-every", type=int, default=d.trial_eval_every)
    p.add_argument("--final-eval-every", type=int, default=d.final_eval_every)
    p.add_argument("--train-eval-size", type=int, default=d.train_eval_size)
    p.add_argument("--sample", action="store_true", help="the 1,000-image MNIST sample (smoke runs)")
    p.add_argument("--clock", choices=("process", "wall"), default=d.clock,
                   help="the final runs' clock: CPU seconds of each run's process (with --threads 1) or wall clock")
    p.add_argument("--stage", choices=("all", "tune", "final"), default="all")
    p.add_argument("--plan", action="store_true", help="print the budget arithmetic and exit")
    p.add_argument("--quadratic-model-ratio", type=float, default=None,
                   help="--plan: cost of K-FAC's quadratic-model rule over the fixed rule when the speed file lacks it")
    p.add_argument("--summary", action="store_true", help="print the final runs' median (min–max) and exit")
    p.add_argument("--at-updates", default="2000,10000", help="--summary: updates to read the train loss at")
    p.add_argument("--at-seconds", default="60,300,600", help="--summary: training seconds to read it at")
    return p


def config_from_args(args) -> RaceConfig:
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    return RaceConfig(out=args.out, task=args.task, methods=tuple(m for m in args.methods.split(",") if m),
                      rounds=ints(args.rounds), narrow_width=args.narrow_width, horizon=args.horizon,
                      tuning_seed=args.tuning_seed, search=args.search, final_seeds=ints(args.final_seeds),
                      final_seconds=args.final_seconds, final_min_updates=args.final_min_updates,
                      workers=args.workers, threads=args.threads, batch_size=args.batch_size,
                      trial_eval_every=args.trial_eval_every, final_eval_every=args.final_eval_every,
                      train_eval_size=args.train_eval_size, sample=True if args.sample else None,
                      clock=args.clock)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    config = config_from_args(args)
    if args.plan:
        print(format_plan(plan(config, quadratic_model_ratio=args.quadratic_model_ratio), config))
        return 0
    if args.summary:
        numbers = lambda text: tuple(float(x) for x in text.split(",") if x)  # noqa: E731
        for method, row in final_summary(config, numbers(args.at_updates), numbers(args.at_seconds)).items():
            cells = [f"{k}: {v['median']:.3g} ({v['min']:.3g}–{v['max']:.3g})" for k, v in row.items() if k != "seeds"]
            print(f"{method:20s} {row['seeds']} seeds  " + "; ".join(cells))
        return 0
    stages = ("tune", "final") if args.stage == "all" else (args.stage,)
    command = ["python", "-m", "fso_lib.bench", "race", *argv]
    run_race(config, stages, command=[shlex.join(command)])
    return 0
