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
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import Executor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..search import Domain, Param, SerialExecutor, grid_points, run_search

DOMAIN = Domain([Param("lr", 1e-3, 10.0, log=True), Param("init_scale", 0.25, 8.0, log=True)])
SIZES = (784, 100, 30, 100, 784)
N_UPDATES, BATCH_SIZE, N_EVAL = 100, 200, 2000
RESULT_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "results" / "table41"


@lru_cache(maxsize=1)
def _data(sample: bool) -> torch.Tensor:
    from ..data import load_mnist

    return load_mnist(sample=sample).train_images


def sgd_trial(params: dict, n_updates: int = N_UPDATES, sample: bool = False, seed: int = 0) -> float:
    """Train the small autoencoder with SGD for ``n_updates`` and return its train squared error."""
    from ..models import deep_autoencoder

    torch.set_num_threads(1)
    x = _data(sample)
    model = deep_autoencoder(sizes=SIZES, init="glorot", init_scale=params["init_scale"], seed=seed)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fso_lib.bench.table41", description=__doc__.split("\n\n")[0])
    p.add_argument("--build", type=int, metavar="N", help="first run the N×N table of real trials")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--searches", type=int, default=100)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULT_DIR)
    args = p.parse_args(argv)
    table_path = args.out / "trial_table.json"
    if args.build:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers) as pool:
            table = build_table(args.build, executor=pool, out=table_path)
        print(f"table of {args.build}×{args.build} trials in {table['seconds']:.0f} s -> {table_path}")
    table = load_table(table_path)
    started = time.perf_counter()
    best = repeated_searches(TableObjective(table), args.searches, args.trials, methods=tuple(SEARCH_VARIANTS))
    summary = summarize(best)
    result = {"searches": args.searches, "trials_per_search": args.trials, "table": table_path.name,
              "table_n_per_dim": table["n_per_dim"], "summary": summary, "best": best,
              "thesis": {m: {"mean": a, "std": b} for m, (a, b) in THESIS_TABLE_4_1.items()},
              "seconds": time.perf_counter() - started}
    (args.out / "table41.json").write_text(json.dumps(result, indent=1))
    for m, s in summary.items():
        thesis = f"(thesis {THESIS_TABLE_4_1[m][0]} ± {THESIS_TABLE_4_1[m][1]})" if m in THESIS_TABLE_4_1 else "(ours only)"
        print(f"{m:14s} {s['mean']:.3f} ± {s['std']:.3f}   {thesis}")


if __name__ == "__main__":
    main()
