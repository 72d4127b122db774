"""Hyperparameter search: grid, random and biased random search (thesis §2.3, §4.1, Algorithm 1).

A search proposes points of a :class:`Domain`, runs ``objective(params)`` for each of them through any
:class:`concurrent.futures.Executor` and keeps the history of :class:`Trial` results. The objective must be
a picklable (module-level) function returning a cost to minimise, or a dict holding ``"cost"``.

Because only ``executor.submit`` and :func:`concurrent.futures.wait` are used, the same search runs in the
current process (:class:`SerialExecutor`), on a local process pool (the default), or on a cluster, e.g.
``dask.distributed.Client(...).get_executor()``.

Biased random search (Algorithm 1) draws a point uniformly from the domain, estimates its cost with a
1-nearest-neighbour model of the history, and keeps it with probability

    p = (c_max - c_estimate) / (c_max - c_min),

else draws again. The corner cases, which the thesis does not spell out, are handled as follows:

* **first trials**: while the history holds fewer than ``n_initial`` (default 2) finished trials with a
  finite cost, points are accepted unconditionally (plain random search);
* **ties**: when ``c_max == c_min`` the model says nothing, so p = 1;
* **diverged trials** (NaN/inf cost, or an exception in the objective) stay in the history with the cost
  ``c_max`` of the worst finite trial: the neighbourhood of a divergence is rejected like the worst region.
  They never set ``c_max`` or ``c_min`` themselves, so one explosion does not flatten the scale;
* **trials still running** (parallel search) are not in the model yet: the next proposal uses only finished
  trials, so ``max_in_flight`` workers make the search a little less greedy than the sequential algorithm;
* **outliers**: with the thesis's rule, one very bad trial makes every merely mediocre region look good
  (p close to 1). ``c_max_quantile`` < 1 (our variant, not the thesis's) takes c_max as that quantile of
  the finite costs instead of their maximum; estimates above it are never accepted (p = 0 before the
  bound on rejections);
* **a bound on rejections**: after ``max_draws`` rejected draws the last draw is accepted, so the loop always
  ends, even if the region worth exploring has become tiny.
"""
from __future__ import annotations

import json
import math
import os
import traceback
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "Param",
    "Domain",
    "Trial",
    "SearchResult",
    "SerialExecutor",
    "nearest_neighbour_cost",
    "acceptance_probability",
    "grid_points",
    "grid_search",
    "random_search",
    "biased_random_search",
    "run_search",
    "SEARCHES",
]


# ----------------------------------------------------------------------------- the domain
@dataclass(frozen=True)
class Param:
    """One hyperparameter in ``[low, high]``; ``log=True`` samples it log-uniformly (learning rates, damping)."""

    name: str
    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"{self.name}: need low < high, got [{self.low}, {self.high}].")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: a log-uniform range must be positive, got [{self.low}, {self.high}].")

    def from_unit(self, u: float) -> float:
        """Map u in [0, 1] to a value (uniformly, or uniformly in log space)."""
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))

    def to_unit(self, value: float) -> float:
        """Inverse of :meth:`from_unit`: the coordinate the cost model measures distances in."""
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class Domain:
    """The box of hyperparameters a search explores (thesis Algorithm 1, 𝒟)."""

    params: tuple[Param, ...]

    def __init__(self, params: Iterable[Param]):
        object.__setattr__(self, "params", tuple(params))
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate hyperparameter names in {names}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def from_unit(self, u: Sequence[float]) -> dict[str, float]:
        return {p.name: p.from_unit(float(x)) for p, x in zip(self.params, u)}

    def to_unit(self, point: dict[str, float]) -> np.ndarray:
        return np.array([p.to_unit(point[p.name]) for p in self.params], dtype=float)

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        """One point drawn uniformly (log-uniformly for ``log`` parameters)."""
        return self.from_unit(rng.random(len(self.params)))

    def to_json(self) -> list[dict]:
        return [asdict(p) for p in self.params]


# ----------------------------------------------------------------------------- trials and results
@dataclass
class Trial:
    """One experiment: its hyperparameters, its cost (``inf`` when it diverged) and what came back."""

    index: int
    params: dict[str, float]
    cost: float
    status: str = "ok"  # "ok", "diverged" (non-finite cost) or "error" (the objective raised)
    info: dict = field(default_factory=dict)
    draws: int = 1  # how many points were drawn before this one was accepted (biased search)

    @property
    def finite(self) -> bool:
        return self.status == "ok"


@dataclass
class SearchResult:
    """The history of a search, in the order the trials were proposed."""

    method: str
    domain: Domain
    trials: list[Trial]

    @property
    def best(self) -> Trial | None:
        finite = [t for t in self.trials if t.finite]
        return min(finite, key=lambda t: t.cost) if finite else None

    @property
    def best_cost(self) -> float:
        best = self.best
        return best.cost if best is not None else math.inf

    def costs(self) -> np.ndarray:
        return np.array([t.cost for t in self.trials], dtype=float)

    def points(self) -> np.ndarray:
        """Trial points as an array (n_trials, n_params) in the parameters' own units."""
        return np.array([[t.params[n] for n in self.domain.names] for t in self.trials], dtype=float)

    def write_jsonl(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            handle.write(json.dumps({"type": "search", "method": self.method, "domain": self.domain.to_json()}) + "\n")
            for t in self.trials:
                record = {"type": "trial", **asdict(t)}
                record["cost"] = t.cost if math.isfinite(t.cost) else None
                handle.write(json.dumps(record) + "\n")


class SerialExecutor(Executor):
    """Runs each submitted call at once, in this process (debugging, notebooks, cheap objectives)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future


# ----------------------------------------------------------------------------- the cost model (Algorithm 1, ℳ)
def nearest_neighbour_cost(history_points: np.ndarray, history_costs: np.ndarray, point: np.ndarray) -> float:
    """1-nearest-neighbour estimate of the cost at ``point`` (unit coordinates, Euclidean distance)."""
    distances = np.sum((history_points - point) ** 2, axis=1)
    return float(history_costs[int(np.argmin(distances))])


def acceptance_probability(c_estimate: float, c_min: float, c_max: float) -> float:
    """p = (c_max - c_estimate) / (c_max - c_min), clipped to [0, 1]; 1 when every cost is equal."""
    if not c_max > c_min:
        return 1.0
    return float(min(1.0, max(0.0, (c_max - c_estimate) / (c_max - c_min))))


# ----------------------------------------------------------------------------- proposals
def grid_points(domain: Domain, n_trials: int, rng: np.random.Generator | None = None) -> list[dict[str, float]]:
    """A grid of ``round(n_trials ** (1/d))`` values per parameter, cell centres in unit space.

    With ``rng``, the whole grid is shifted by one random offset (within one cell) per parameter, so that
    repeated grid searches differ (used to give grid search a spread in the Table 4.1 experiment).
    """
    d = len(domain.params)
    per_dim = max(1, int(round(n_trials ** (1.0 / d))))
    offsets = rng.random(d) if rng is not None else np.full(d, 0.5)
    axes = [(np.arange(per_dim) + offsets[k]) / per_dim for k in range(d)]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
    return [domain.from_unit(u) for u in mesh]


class _Proposer:
    """Proposes the next point from the finished history."""

    def __init__(self, method: str, domain: Domain, n_trials: int, rng: np.random.Generator,
                 n_initial: int, max_draws: int, shift_grid: bool, c_max_quantile: float = 1.0):
        self.method, self.domain, self.rng = method, domain, rng
        self.n_initial, self.max_draws, self.c_max_quantile = n_initial, max_draws, c_max_quantile
        if method == "grid":
            self.grid = grid_points(domain, n_trials, rng if shift_grid else None)

    def __call__(self, index: int, finished: list[Trial]) -> tuple[dict[str, float], int]:
        if self.method == "grid":
            return self.grid[index], 1
        if self.method == "random":
            return self.domain.sample(self.rng), 1
        return self._biased(finished)

    def _biased(self, finished: list[Trial]) -> tuple[dict[str, float], int]:
        finite = [t.cost for t in finished if t.finite]
        if len(finite) < self.n_initial:
            return self.domain.sample(self.rng), 1
        c_min, c_max = min(finite), float(np.quantile(finite, self.c_max_quantile))
        points = np.array([self.domain.to_unit(t.params) for t in finished])
        costs = np.array([t.cost if t.finite else max(finite) for t in finished])
        for draws in range(1, self.max_draws + 1):
            u = self.rng.random(len(self.domain.params))
            c_estimate = nearest_neighbour_cost(points, costs, u)
            if self.rng.random() < acceptance_probability(c_estimate, c_min, c_max) or draws == self.max_draws:
                return self.domain.from_unit(u), draws
        raise AssertionError("unreachable")


def _call_objective(objective: Callable, params: dict) -> dict:
    """Run one trial; never raises (errors and divergences become results)."""
    try:
        value = objective(params)
    except Exception as error:  # noqa: BLE001 - a failed trial is a result of the search
        return {"cost": math.inf, "status": "error", "info": {"error": f"{type(error).__name__}: {error}",
                                                             "traceback": traceback.format_exc(limit=3)}}
    info = dict(value) if isinstance(value, dict) else {}
    cost = float(info.pop("cost")) if isinstance(value, dict) else float(value)
    if not math.isfinite(cost):
        return {"cost": math.inf, "status": "diverged", "info": info}
    return {"cost": cost, "status": "ok", "info": info}


def run_search(
    objective: Callable[[dict], float | dict],
    domain: Domain,
    n_trials: int,
    method: str = "biased",
    seed: int | None = 0,
    executor: Executor | None = None,
    max_in_flight: int | None = None,
    n_initial: int = 2,
    max_draws: int = 10_000,
    shift_grid: bool = False,
    c_max_quantile: float = 1.0,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Run ``n_trials`` experiments proposed by ``method`` (``"grid"``, ``"random"`` or ``"biased"``).

    ``executor``: any :class:`concurrent.futures.Executor`; ``None`` makes a local process pool with one
    worker per CPU core (closed at the end). ``max_in_flight`` trials run at once (default: the pool's
    size for the default pool, else 1 for a serial executor and ``os.cpu_count()`` otherwise).
    ``c_max_quantile`` (biased search): 1.0 is the thesis's rule; see the module docstring for < 1.
    ``on_trial`` is called in this process with each finished :class:`Trial` (e.g. to log it).
    """
    if method not in ("grid", "random", "biased"):
        raise ValueError(f"Unknown search method {method!r}: use 'grid', 'random' or 'biased'.")
    rng = np.random.default_rng(seed)
    proposer = _Proposer(method, domain, n_trials, rng, n_initial, max_draws, shift_grid, c_max_quantile)
    if method == "grid":
        n_trials = len(proposer.grid)
    own_pool = executor is None
    if own_pool:
        workers = os.cpu_count() or 1
        executor = ProcessPoolExecutor(max_workers=workers)
        max_in_flight = max_in_flight or workers
    elif max_in_flight is None:
        max_in_flight = 1 if isinstance(executor, SerialExecutor) else (os.cpu_count() or 1)
    trials: list[Trial | None] = [None] * n_trials
    finished: list[Trial] = []
    pending: dict[Future, Trial] = {}
    next_index = 0
    try:
        while next_index < n_trials or pending:
            while next_index < n_trials and len(pending) < max_in_flight:
                params, draws = proposer(next_index, finished)
                trial = Trial(index=next_index, params=params, cost=math.nan, draws=draws)
                pending[executor.submit(_call_objective, objective, params)] = trial
                next_index += 1
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: pending[f].index):
                trial = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - the executor itself failed (lost worker...)
                    outcome = {"cost": math.inf, "status": "error", "info": {"error": repr(error)}}
                trial.cost, trial.status, trial.info = outcome["cost"], outcome["status"], outcome["info"]
                trials[trial.index] = trial
                finished.append(trial)
                if on_trial is not None:
                    on_trial(trial)
    finally:
        if own_pool:
            executor.shutdown(cancel_futures=True)
    return SearchResult(method=method, domain=domain, trials=[t for t in trials if t is not None])


def grid_search(objective, domain: Domain, n_trials: int, **kwargs) -> SearchResult:
    """Grid search (thesis §2.3): every combination of evenly spaced values (in log space for log params)."""
    return run_search(objective, domain, n_trials, method="grid", **kwargs)


def random_search(objective, domain: Domain, n_trials: int, **kwargs) -> SearchResult:
    """Random search (Bergstra & Bengio 2012; thesis §2.3): points drawn uniformly from the domain."""
    return run_search(objective, domain, n_trials, method="random", **kwargs)


def biased_random_search(objective, domain: Domain, n_trials: int, **kwargs) -> SearchResult:
    """Biased random search (thesis §4.1, Algorithm 1): random search thinned by a 1-NN cost model."""
    return run_search(objective, domain, n_trials, method="biased", **kwargs)


SEARCHES = {"grid": grid_search, "random": random_search, "biased": biased_random_search}
