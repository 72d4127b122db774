"""The experiment of the thesis's Table 4.1: grid vs random vs biased random search (thesis §4.1).

The thesis ran 100 searches of 100 experiments each, tuning 2 hyperparameters of 100 SGD iterations, and
reported the mean and standard deviation of the best result found by each search.

Our cheap version, so that it runs on a 2-core CPU:

* one **trial** = 100 SGD updates (minibatch 200, full MNIST training set, seed 0) of the small autoencoder
  784-100-30-100-784 (sigmoid, linear code), Glorot-uniform initialization times ``init_scale``; its cost
  is the squared error on a fixed 2,000-image training subset afterwards;
* the two hyperparameters: the learning rate (log-uniform in [1e-3, 10]) and ``init_scale`` (log-uniform
  in [0.25, 8]);
* every trial is run **once** on a fine grid of ``n × n`` points (:func:`build_table`); the searches then
  read the cost of the nearest grid node (:class:`TableObjective`) instead of training again. That makes
  the 3 × 100 × 100 searches take seconds, at the price of a piecewise-constant landscape without
  seed-to-seed noise (the thesis's trials each had their own noise);
* besides the thesis's three searches, ``biased_median`` is our variant of biased random search with c_max
  taken as the median cost so far (see :mod:`fso_lib.search`), which ignores the worst outliers;
* grid search uses a 10 × 10 grid shifted by a random offset per search, so that repeating it means
  something (a fixed grid would find the same best point 100 times).

``--task thesis`` runs the same experiment on the thesis's own task (§4.2, issue 12): the deep autoencoder
784-1000-500-250-30-250-500-1000-784 (sigmoid, linear code), same trial (100 SGD updates, minibatch 200,
Glorot-uniform × ``init_scale``), same domain and searches. Its table is built resumably
(:func:`build_table_resumable`: one JSON line per finished grid node in ``thesis/trials.jsonl``; a restart
runs only the missing nodes) and its files live in ``data/results/table41/thesis/``. ``--task small`` (the
default) is the small network above, files in ``data/results/table41/``. ``--plan`` prints the machine time
of a build from the measured cost of an update (``data/results/speed``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import Executor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..search import Domain, Param, SerialExecutor, grid_points, run_search

DOMAIN = Domain([Param("lr", 1e-3, 10.0, log=True), Param("init_scale", 0.25, 8.0, log=True)])
SIZES = (784, 100, 30, 100, 784)
THESIS_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
#: The two versions of the experiment: network sizes and where their files live (under ``--out``).
TASKS41 = {"small": (SIZES, "."), "thesis": (THESIS_SIZES, "thesis")}
N_UPDATES, BATCH_SIZE, N_EVAL = 100, 200, 2000
RESULT_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "results" / "table41"


@lru_cache(maxsize=1)
def _data(sample: bool) -> torch.Tensor:
    from ..data import load_mnist

    return load_mnist(sample=sample).train_images


def sgd_trial(params: dict, n_updates: int = N_UPDATES, sample: bool = False, seed: int = 0,
              sizes: tuple = SIZES) -> float:
    """Train the autoencoder of ``sizes`` (default the small one) with SGD for ``n_updates`` and return its
    train squared error on the first 2,000 training images."""
    from ..models import deep_autoencoder

    torch.set_num_threads(1)
    # denormal floats (below 1.2e-38) slow a saturated sigmoid network several-fold on a CPU; flushing them to
    # zero gave bit-identical costs on the nodes checked (see data/results/table41/README.md)
    torch.set_flush_denormal(True)
    x = _data(sample)
    model = deep_autoencoder(sizes=tuple(sizes), init="glorot", init_scale=params["init_scale"], seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_updates):
        batch = x[torch.randint(0, x.shape[0], (BATCH_SIZE,), generator=generator)]
        loss = (model(batch) - batch).pow(2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        subset = x[:N_EVAL]
        return float((model(subset) - subset).pow(2).sum(dim=1).mean())


def build_table(n_per_dim: int, executor: Executor | None = None, out: Path | None = None, **trial_kwargs) -> dict:
    """Run :func:`sgd_trial` on an ``n × n`` grid of (lr, init_scale) node values (unit-space cell centres)."""
    from functools import partial

    started = time.perf_counter()
    objective = partial(sgd_trial, **trial_kwargs) if trial_kwargs else sgd_trial
    result = run_search(objective, DOMAIN, n_per_dim ** 2, method="grid", executor=executor)
    costs = result.costs().reshape(n_per_dim, n_per_dim)
    table = {
        "description": "cost of sgd_trial on a grid; axes are cell centres in unit (log) space",
        "domain": DOMAIN.to_json(), "n_per_dim": n_per_dim, "n_updates": trial_kwargs.get("n_updates", N_UPDATES),
        "sizes": SIZES, "batch_size": BATCH_SIZE, "n_eval": N_EVAL,
        "costs": [[c if math.isfinite(c) else None for c in row] for row in costs.tolist()],
        "seconds": time.perf_counter() - started, "torch": torch.__version__,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table))
    return table


class TableObjective:
    """Cost of the nearest grid node of a precomputed table (picklable, so it runs in any executor)."""

    def __init__(self, table: dict):
        self.n = table["n_per_dim"]
        self.domain = Domain([Param(**p) for p in table["domain"]])
        self.costs = np.array([[math.inf if c is None else c for c in row] for row in table["costs"]], dtype=float)

    def __call__(self, params: dict) -> float:
        u = self.domain.to_unit(params)
        i, j = (np.clip(np.floor(u * self.n), 0, self.n - 1)).astype(int)
        return float(self.costs[i, j])

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lr values, init_scale values, costs[i_lr, j_scale]) of the table's nodes."""
        centres = (np.arange(self.n) + 0.5) / self.n
        lrs = np.array([self.domain.params[0].from_unit(u) for u in centres])
        scales = np.array([self.domain.params[1].from_unit(u) for u in centres])
        return lrs, scales, self.costs


def load_table(path: Path | None = None) -> dict:
    return json.loads(Path(path or RESULT_DIR / "trial_table.json").read_text())


#: The searches compared: the thesis's three, and our variant of biased search whose c_max is the median cost.
SEARCH_VARIANTS = {"grid": ("grid", {}), "random": ("random", {}), "biased": ("biased", {}),
                   "biased_median": ("biased", {"c_max_quantile": 0.5})}


def repeated_searches(objective, n_searches: int = 100, n_trials: int = 100, methods=("grid", "random", "biased"),
                      seed: int = 0, executor: Executor | None = None, domain: Domain = DOMAIN) -> dict:
    """Best cost found by each of ``n_searches`` searches of ``n_trials`` trials, per method.

    Search ``k`` of every method uses the seed ``seed + k`` (the same random draws start each method)."""
    executor = executor or SerialExecutor()
    best = {}
    for method in methods:
        kind, options = SEARCH_VARIANTS[method]
        best[method] = [
            run_search(objective, domain, n_trials, method=kind, seed=seed + k, executor=executor,
                       shift_grid=True, **options).best_cost
            for k in range(n_searches)
        ]
    return best


def summarize(best: dict) -> dict:
    """Mean and standard deviation (ddof=0) of the best costs, per method."""
    return {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for m, v in best.items()}


THESIS_TABLE_4_1 = {"grid": (27.23, 0.42), "random": (27.02, 0.28), "biased": (26.61, 0.13)}


def _node_trial(node: tuple, params: dict, sizes: tuple, sample: bool) -> dict:
    started = time.perf_counter()
    cost = sgd_trial(params, sample=sample, sizes=sizes)
    return {"node": list(node), "params": params, "cost": cost if math.isfinite(cost) else None,
            "seconds": time.perf_counter() - started, "flush_denormal": True}


def build_table_resumable(n_per_dim: int, folder: Path, sizes: tuple = THESIS_SIZES, workers: int = 1,
                          sample: bool = False, executor: Executor | None = None, echo=print) -> dict:
    """:func:`build_table` that survives a kill: each finished node is appended (and flushed) to
    ``folder/trials.jsonl`` as it finishes; a restart skips the nodes found there. Writes
    ``folder/trial_table.json`` (the format :func:`load_table` reads) once every node is done."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "trials.jsonl"
    header = {"type": "table", "n_per_dim": n_per_dim, "sizes": list(sizes), "domain": DOMAIN.to_json(),
              "n_updates": N_UPDATES, "batch_size": BATCH_SIZE, "n_eval": N_EVAL, "sample": sample,
              "torch": torch.__version__}
    done: dict[tuple, dict] = {}
    if log.exists():
        lines = log.read_text().splitlines()
        old = json.loads(lines[0])
        if {k: old.get(k) for k in header if k != "torch"} != {k: header[k] for k in header if k != "torch"}:
            raise SystemExit(f"{log} holds another table ({old}); use another --out.")
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a half-written last line (a kill): dropped below
            done[tuple(record["node"])] = record
            kept.append(line)
        if len(kept) < len(lines) or not log.read_text().endswith("\n"):
            tmp = log.with_suffix(".partial")
            tmp.write_text("\n".join(kept) + "\n")
            os.replace(tmp, log)
    else:
        log.write_text(json.dumps(header) + "\n")
    centres = (np.arange(n_per_dim) + 0.5) / n_per_dim
    todo = [((i, j), DOMAIN.from_unit([centres[i], centres[j]])) for i in range(n_per_dim) for j in range(n_per_dim)
            if (i, j) not in done]
    echo(f"{len(done)} of {n_per_dim ** 2} nodes done, {len(todo)} to run")
    own = executor is None
    if own:
        executor = SerialExecutor() if workers == 0 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
    in_flight = max(1, workers)
    pending = {}
    try:
        with open(log, "a") as handle:
            while todo or pending:
                while todo and len(pending) < in_flight:
                    node, params = todo.pop(0)
                    pending[executor.submit(_node_trial, node, params, tuple(sizes), sample)] = node
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    pending.pop(future)
                    record = future.result()
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    done[tuple(record["node"])] = record
    finally:
        if own:
            executor.shutdown(cancel_futures=True)
    costs = [[done[(i, j)]["cost"] for j in range(n_per_dim)] for i in range(n_per_dim)]
    table = {"description": "cost of sgd_trial on a grid; axes are cell centres in unit (log) space",
             "domain": DOMAIN.to_json(), "n_per_dim": n_per_dim, "n_updates": N_UPDATES, "sizes": list(sizes),
             "batch_size": BATCH_SIZE, "n_eval": N_EVAL, "costs": costs,
             "seconds": sum(r["seconds"] for r in done.values()), "seconds_are": "sum over trials (CPU time of one worker each)",
             "torch": torch.__version__}
    (folder / "trial_table.json").write_text(json.dumps(table))
    return table


def plan(n_per_dim: int, workers: int, sizes: tuple = THESIS_SIZES) -> str:
    """Machine time of building the ``n × n`` table of the thesis's task, from the measured SGD update of
    the deep autoencoder (the race's estimate: speed file × the slowdown of 1 thread with 2 runs at once)."""
    from .race import RaceConfig, plan as race_plan

    if tuple(sizes) != THESIS_SIZES:
        return "no measured update cost for the small network: --plan covers --task thesis only"
    p = race_plan(RaceConfig(methods=("sgd",), threads=1, workers=max(1, workers)))
    ms = p["methods"]["sgd"]["ms_per_update"]
    eval_s = p["eval_s"] * N_EVAL / (10_000 + 10_000)  # the race evaluates 20,000 images, a trial 2,000
    trial_s = N_UPDATES * ms / 1e3 + eval_s
    total = n_per_dim ** 2 * trial_s
    return (f"Table 4.1 on the deep autoencoder: {n_per_dim}×{n_per_dim} = {n_per_dim ** 2} trials of {N_UPDATES} SGD "
            f"updates at ≈{ms:.1f} ms/update (1 thread, {p['slowdown']:.2f}× the speed file's 2-thread SGD) + an "
            f"evaluation on {N_EVAL} images ≈ {trial_s:.1f} s per trial: {total / 3600:.2f} h of trials, "
            f"≈{total / 3600 / max(1, workers):.2f} h with {max(1, workers)} worker(s). The {len(SEARCH_VARIANTS)} × 100 "
            f"searches of 100 lookups then take seconds. Model building and data loading are not counted.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fso_lib.bench.table41", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=tuple(TASKS41), default="small",
                   help="small: 784-100-30-100-784; thesis: the deep autoencoder of thesis §4.2 (files in OUT/thesis)")
    p.add_argument("--build", type=int, metavar="N", help="first run the N×N table of real trials (resumable for thesis)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--searches", type=int, default=100)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULT_DIR)
    p.add_argument("--plan", action="store_true", help="print the machine time of --build N and exit")
    p.add_argument("--sample", action="store_true", help="the 1,000-image MNIST sample (smoke runs)")
    args = p.parse_args(argv)
    sizes, sub = TASKS41[args.task]
    folder = (args.out / sub).resolve() if sub != "." else args.out
    if args.plan:
        print(plan(args.build or 33, args.workers, sizes))
        return
    table_path = folder / "trial_table.json"
    if args.build:
        if args.task == "thesis":
            table = build_table_resumable(args.build, folder, sizes, args.workers, sample=args.sample)
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.workers) as pool:
                table = build_table(args.build, executor=pool, out=table_path)
        print(f"table of {args.build}×{args.build} trials ({table['seconds']:.0f} s of trials) -> {table_path}")
    table = load_table(table_path)
    started = time.perf_counter()
    best = repeated_searches(TableObjective(table), args.searches, args.trials, methods=tuple(SEARCH_VARIANTS))
    summary = summarize(best)
    result = {"task": args.task, "sizes": list(sizes), "searches": args.searches, "trials_per_search": args.trials,
              "table": table_path.name, "table_n_per_dim": table["n_per_dim"], "summary": summary, "best": best,
              "thesis": {m: {"mean": a, "std": b} for m, (a, b) in THESIS_TABLE_4_1.items()},
              "seconds": time.perf_counter() - started}
    (folder / "table41.json").write_text(json.dumps(result, indent=1))
    for m, s in summary.items():
        thesis = f"(thesis {THESIS_TABLE_4_1[m][0]} ± {THESIS_TABLE_4_1[m][1]})" if m in THESIS_TABLE_4_1 else "(ours only)"
        print(f"{m:14s} {s['mean']:.3f} ± {s['std']:.3f}   {thesis}")


if __name__ == "__main__":
    main()
