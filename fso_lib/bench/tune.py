"""``python -m fso_lib.bench.tune``: biased random search of one method's hyperparameters (thesis §4.1, §6.6).

Each trial is a short benchmark run (a budget in updates or seconds); its cost is the final train loss
(inf when it diverged). The best hyperparameters are merged into a tuned-hyperparameters JSON file
``{task: {method: {...}}}`` that ``python -m fso_lib.bench --hp-json`` and the benchmark scripts read.
Trials run on a local process pool (``--workers``); in Python, pass any ``concurrent.futures.Executor``.

Example::

    python -m fso_lib.bench.tune --method adam --trials 30 --seconds 60 --workers 1 \\
        --tuned data/results/tuned_cpu.json --out data/results/tuning
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..search import SerialExecutor, run_search
from .methods import get_method
from .runner import RunConfig, run, run_paths


@dataclass
class RunObjective:
    """A picklable objective: one benchmark run with the trial's hyperparameters; cost = final train loss."""

    task: str
    method: str
    out_dir: str
    max_updates: int | None = None
    max_seconds: float | None = None
    fixed: dict = field(default_factory=dict)  # hyperparameters not searched
    seed: int = 0
    sample: bool | None = None
    threads: int | None = 1
    eval_every: int = 10**9  # evaluate only at the start and at the end: tuning needs the final loss
    ranges: dict = field(default_factory=dict)  # name -> (low, high): narrows the method's declared domain
    resume: bool = False  # continue a killed trial from its last evaluation's checkpoint
    keep_checkpoint: bool = True  # False: delete the trial's checkpoint once it has finished
    batch_size: int = 200
    train_eval_size: int = 10_000

    def __call__(self, params: dict) -> dict:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        params = {**self.fixed, **params}
        init_scale = params.pop("init_scale", None)
        init = params.pop("init", None)
        key = hashlib.sha1(json.dumps([params, init, init_scale], sort_keys=True).encode()).hexdigest()[:10]
        config = RunConfig(task=self.task, method=self.method, hyperparameters=params, init=init,
                           init_scale=init_scale, max_updates=self.max_updates, max_seconds=self.max_seconds,
                           eval_every=self.eval_every, eval_schedule="linear", seed=self.seed, sample=self.sample,
                           name=f"{self.task}-{self.method}-{key}", progress=False, batch_size=self.batch_size,
                           train_eval_size=self.train_eval_size)
        result = run(config, self.out_dir, resume=self.resume)
        if not self.keep_checkpoint:
            run_paths(self.out_dir, config.run_name)[1].unlink(missing_ok=True)
        cost = result.train_loss if result.status == "completed" else math.inf
        return {"cost": cost, "status": result.status, "updates": result.updates, "file": str(result.results_path)}


def tune(objective: RunObjective, n_trials: int, executor: Executor | None = None, seed: int = 0,
         method: str = "biased", max_in_flight: int | None = None, on_trial=None):
    """Search ``objective.method``'s domain (minus the ``fixed`` hyperparameters) with ``method``."""
    from ..search import Domain

    from dataclasses import replace

    domain = get_method(objective.method).domain
    unknown = set(objective.ranges) - set(domain.names)
    if unknown:
        raise ValueError(f"--range names {sorted(unknown)} are not searched for {objective.method}: {domain.names}")
    choices = [p.name for p in domain.params if p.name in objective.ranges and not hasattr(p, "low")]
    if choices:
        raise ValueError(f"--range cannot narrow the choices {choices}; hold them with --fix instead")
    domain = Domain([replace(p, low=objective.ranges[p.name][0], high=objective.ranges[p.name][1])
                     if p.name in objective.ranges else p
                     for p in domain.params if p.name not in objective.fixed])
    return run_search(objective, domain, n_trials, method=method, seed=seed, executor=executor,
                      max_in_flight=max_in_flight, on_trial=on_trial)


def merge_tuned(path: Path, task: str, method: str, params: dict, info: dict) -> dict:
    """Write ``params`` as ``{task: {method: params}}`` into ``path``, keeping the other entries."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(task, {})[method] = params
    table.setdefault("_provenance", {}).setdefault(task, {})[method] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fso_lib.bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="autoencoder")
    p.add_argument("--method", required=True)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--updates", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--search", choices=("biased", "random", "grid"), default="biased")
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE", help="hold a hyperparameter fixed")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="search NAME in [LOW, HIGH] instead of the method's declared range (same scale)")
    p.add_argument("--workers", type=int, default=1, help="local processes (0: run trials in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", action="store_true")
    p.add_argument("--out", default="data/results/tuning")
    p.add_argument("--tuned", default="data/results/tuned.json", help="tuned-hyperparameters JSON to update")
    args = p.parse_args(argv)
    if args.updates is None and args.seconds is None:
        raise SystemExit("Give each trial a budget: --updates N and/or --seconds S.")
    from .__main__ import _value

    fixed = {k: _value(v) for k, _, v in (item.partition("=") for item in args.fix)}
    ranges = {}
    for item in args.range:
        name, _, bounds = item.partition("=")
        low, _, high = bounds.partition(":")
        ranges[name] = (float(low), float(high))
    objective = RunObjective(args.task, args.method, args.out, args.updates, args.seconds, fixed, args.seed,
                             True if args.sample else None, args.threads, ranges=ranges)

    def report(trial):
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        print(f"trial {trial.index:3d} [{trial.status}] {shown} -> {trial.cost:.4g}", file=sys.stderr, flush=True)

    executor = SerialExecutor() if args.workers == 0 else ProcessPoolExecutor(args.workers)
    with executor:
        result = tune(objective, args.trials, executor, args.seed, args.search, max(1, args.workers), report)
    result.write_jsonl(Path(args.out) / f"search-{args.task}-{args.method}.jsonl")
    best = result.best
    if best is None:
        print("every trial diverged: nothing written", file=sys.stderr)
        return 1
    merge_tuned(Path(args.tuned), args.task, args.method, {**fixed, **best.params},
                {"cost": best.cost, "trials": args.trials, "search": args.search, "ranges": ranges,
                 "budget": {"updates": args.updates, "seconds": args.seconds}})
    print(f"best {args.method}: {best.params} (train loss {best.cost:.4g}) -> {args.tuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
