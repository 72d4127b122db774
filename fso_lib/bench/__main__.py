"""``python -m fso_lib.bench``: run one method on one benchmark task (thesis §4.2, §6.6).

Examples::

    python -m fso_lib.bench --method adam --hp lr=1e-3 --seconds 600 --out data/results/cpu
    python -m fso_lib.bench --method kfac --hp-json data/results/tuned.json --updates 300000 --device cuda
    python -m fso_lib.bench --method adam --seconds 600 --out data/results/cpu --resume   # after a kill
    python -m fso_lib.bench --list
    python -m fso_lib.bench race --plan        # the equal-budget race (fso_lib.bench.race): budget, then run
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .methods import METHODS
from .runner import RunConfig, run
from .tasks import TASKS


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def tuned_hyperparameters(path: str, method: str, task: str | None = None) -> dict:
    """Read a method's hyperparameters from a JSON file: ``{method: {...}}`` or ``{task: {method: {...}}}``.

    The keys ``init`` and ``init_scale`` set the model's initialization; the others go to the method.
    """
    with open(path) as handle:
        table = json.load(handle)
    if task is not None and task in table and isinstance(table[task], dict):
        table = table[task]
    if method not in table:
        raise SystemExit(f"{path} has no hyperparameters for {method!r} (it has {sorted(table)}).")
    return dict(table[method])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fso_lib.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list", action="store_true", help="list tasks and methods, then exit")
    p.add_argument("--task", default="autoencoder", choices=TASKS)
    p.add_argument("--dataset", choices=("cifar10", "mnist"), default=None,
                   help="classification only: default CIFAR-10 if available, else MNIST")
    p.add_argument("--method", default="sgd", help="a registered method (see --list)")
    p.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="a method hyperparameter")
    p.add_argument("--hp-json", metavar="FILE", help="tuned hyperparameters: {method: {...}} or {task: {method: {...}}}")
    p.add_argument("--init", choices=("glorot", "sparse"), default=None, help="default: the task's (glorot)")
    p.add_argument("--init-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--updates", type=int, default=None, help="budget in updates")
    p.add_argument("--seconds", type=float, default=None, help="budget in training seconds (evaluation excluded)")
    p.add_argument("--eval-every", type=int, default=1000, help="updates between evaluations (at most)")
    p.add_argument("--eval-schedule", choices=("log", "linear"), default="log",
                   help="log: also evaluate at updates 10, 13, 17, ... for log-scale plots")
    p.add_argument("--train-eval-size", type=int, default=10_000)
    p.add_argument("--test-eval-size", type=int, default=None, help="default: the whole test set")
    p.add_argument("--divergence-factor", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: fso_lib.config.get_device())")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--sample", action="store_true", help="use the 1,000-image MNIST sample (smoke tests)")
    p.add_argument("--out", default="data/results/runs", help="output folder")
    p.add_argument("--name", default=None, help="run name (default TASK-METHOD-seedSEED)")
    p.add_argument("--note", default="", help="free text stored in the header (e.g. how many runs shared the device)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint if there is one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--keep-denormals", action="store_true",
                   help="CPU: compute with denormal floats instead of flushing them to zero (slower; see RunConfig.flush_denormal)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step (mode reduce-overhead: CUDA graphs on a GPU; needs a C++ compiler on a CPU)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["race"]:
        from .race import main as race_main

        return race_main(argv[1:])
    args = parser().parse_args(argv)
    if args.list:
        print("tasks:", ", ".join(TASKS))
        for name, method in METHODS.items():
            print(f"  {name:22s} {method.label:26s} defaults {method.defaults}")
        return 0
    if args.updates is None and args.seconds is None:
        raise SystemExit("Give a budget: --updates N and/or --seconds S.")
    if args.threads:
        torch.set_num_threads(args.threads)
    hp = tuned_hyperparameters(args.hp_json, args.method, args.task) if args.hp_json else {}
    for item in args.hp:
        name, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--hp expects NAME=VALUE, got {item!r}.")
        hp[name] = _value(value)
    init, init_scale = hp.pop("init", None), hp.pop("init_scale", None)
    config = RunConfig(
        task=args.task, method=args.method, hyperparameters=hp, init=args.init or init,
        init_scale=args.init_scale if args.init_scale is not None else init_scale, batch_size=args.batch_size,
        max_updates=args.updates, max_seconds=args.seconds, eval_every=args.eval_every,
        eval_schedule=args.eval_schedule, train_eval_size=args.train_eval_size,
        test_eval_size=args.test_eval_size, seed=args.seed, device=args.device,
        dataset=args.dataset, sample=True if args.sample else None, divergence_factor=args.divergence_factor,
        name=args.name, note=args.note, progress=not args.quiet, compile=args.compile,
        flush_denormal=not args.keep_denormals)
    result = run(config, args.out, resume=args.resume)
    print(f"{result.name}: {result.status} after {result.updates} updates, {result.seconds:.1f} s; "
          f"train loss {result.train_loss:.4g}, test loss {result.test_loss:.4g} -> {result.results_path}")
    return 0 if result.status in ("completed", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
