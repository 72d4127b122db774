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
    "Choice",
    "Domain",
    "narrow",
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
    "start_trial_log",
    "append_trial",
    "read_trial_log",
    "SEARCHES",
]


# ----------------------------------------------------------------------------- the domain
@dataclass(frozen=True)
class Param:
    """One hyperparameter in ``[low, high]``; ``log=True`` samples it log-uniformly (learning rates, damping).

    ``none_fraction`` > 0 makes the hyperparameter optional: that share of the unit interval maps to
    ``None`` (e.g. K-FAC's ``kl_clip`` switched off), the rest to ``[low, high]`` as usual."""

    name: str
    low: float
    high: float
    log: bool = False
    none_fraction: float = 0.0

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"{self.name}: need low < high, got [{self.low}, {self.high}].")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: a log-uniform range must be positive, got [{self.low}, {self.high}].")
        if not 0.0 <= self.none_fraction < 1.0:
            raise ValueError(f"{self.name}: none_fraction must be in [0, 1), got {self.none_fraction}.")

    def from_unit(self, u: float) -> float | None:
        """Map u in [0, 1] to a value (uniformly, or uniformly in log space; None below ``none_fraction``)."""
        if self.none_fraction:
            if u < self.none_fraction:
                return None
            u = (u - self.none_fraction) / (1.0 - self.none_fraction)
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))

    def to_unit(self, value: float | None) -> float:
        """Inverse of :meth:`from_unit`: the coordinate the cost model measures distances in (``None``: the
        middle of its share)."""
        if value is None:
            if not self.none_fraction:
                raise ValueError(f"{self.name} is not optional: None has no coordinate.")
            return self.none_fraction / 2
        if self.log:
            u = (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        else:
            u = (value - self.low) / (self.high - self.low)
        return self.none_fraction + (1.0 - self.none_fraction) * u

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Choice:
    """A categorical hyperparameter (a flag, a mode): each of the ``k`` choices owns 1/k of the unit interval,
    and its coordinate for the cost model is the middle of its share."""

    name: str
    choices: tuple

    def __init__(self, name: str, choices: Iterable):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "choices", tuple(choices))
        if not self.choices or len(set(map(repr, self.choices))) != len(self.choices):
            raise ValueError(f"{name}: need distinct choices, got {self.choices}.")

    def from_unit(self, u: float):
        k = len(self.choices)
        return self.choices[min(int(u * k), k - 1)]

    def to_unit(self, value) -> float:
        return (self.choices.index(value) + 0.5) / len(self.choices)

    def to_json(self) -> dict:
        return {"kind": "choice", "name": self.name, "choices": list(self.choices)}


def param_from_json(record: dict) -> Param | Choice:
    """Inverse of ``to_json`` (records without ``kind`` are :class:`Param`, as written before choices existed)."""
    record = dict(record)
    if record.pop("kind", "param") == "choice":
        return Choice(record["name"], record["choices"])
    return Param(**record)


@dataclass(frozen=True)
class Domain:
    """The box of hyperparameters a search explores (thesis Algorithm 1, 𝒟)."""

    params: tuple[Param | Choice, ...]

    def __init__(self, params: Iterable[Param | Choice]):
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

    def contains(self, point: dict) -> bool:
        """Whether ``point`` (a value for every parameter) lies in the domain."""
        for p in self.params:
            value = point[p.name]
            if isinstance(p, Choice):
                if value not in p.choices:
                    return False
            elif value is None:
                if not p.none_fraction:
                    return False
            elif not p.low * (1 - 1e-12) <= value <= p.high * (1 + 1e-12):
                return False
        return True

    def to_json(self) -> list[dict]:
        return [p.to_json() for p in self.params]

    @classmethod
    def from_json(cls, records: list[dict]) -> "Domain":
        return cls(param_from_json(r) for r in records)


def narrow(domain: Domain, best: dict, width: float = 0.25) -> Domain:
    """The domain of a second, narrowed search round around ``best`` (a point of ``domain``).

    Each continuous parameter keeps a box of ``width`` times its unit (log, for ``log`` parameters) range,
    centred on the best value and shifted back inside the original range where it would stick out; a
    choice, and an optional parameter whose best value is ``None``, are held at the best value (a
    one-choice :class:`Choice`); an optional parameter whose best value is set loses its ``None`` share.
    The narrowed domain is therefore inside the original one and contains ``best``."""
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    params = []
    for p in domain.params:
        value = best[p.name]
        if isinstance(p, Choice) or value is None:
            params.append(Choice(p.name, [value]))
            continue
        plain = Param(p.name, p.low, p.high, p.log)
        centre = plain.to_unit(value)
        start = min(max(centre - width / 2, 0.0), 1.0 - width)
        low, high = plain.from_unit(start), plain.from_unit(start + width)
        params.append(Param(p.name, max(low, p.low), min(high, p.high), p.log))
    return Domain(params)


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
                handle.write(json.dumps(_trial_record(t)) + "\n")


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


def _same_point(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0):
                return False
        elif x != y or type(x) is not type(y):
            return False
    return True


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
    history: Iterable[Trial] = (),
) -> SearchResult:
    """Run ``n_trials`` experiments proposed by ``method`` (``"grid"``, ``"random"`` or ``"biased"``).

    ``executor``: any :class:`concurrent.futures.Executor`; ``None`` makes a local process pool with one
    worker per CPU core (closed at the end). ``max_in_flight`` trials run at once (default: the pool's
    size for the default pool, else 1 for a serial executor and ``os.cpu_count()`` otherwise).
    ``c_max_quantile`` (biased search): 1.0 is the thesis's rule; see the module docstring for < 1.
    ``on_trial`` is called in this process with each finished :class:`Trial` (e.g. to log it).

    ``history``: finished trials of an earlier, interrupted run of the same search (e.g. read back with
    :func:`read_trial_log`). They are not run again: the proposer is replayed through them, so that with one
    trial in flight the resumed search proposes exactly the trials the uninterrupted one would have (a
    recorded point that differs from the replayed proposal raises ``ValueError``: another seed, domain or
    method). With several in flight the recorded points are kept as they are.
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
    recorded = {t.index: t for t in history}
    trials: list[Trial | None] = [None] * n_trials
    finished: list[Trial] = []
    pending: dict[Future, Trial] = {}
    next_index = 0
    try:
        while next_index < n_trials or pending:
            while next_index < n_trials and len(pending) < max_in_flight:
                params, draws = proposer(next_index, finished)
                if next_index in recorded:
                    old = recorded[next_index]
                    if max_in_flight == 1 and not _same_point(old.params, params):
                        raise ValueError(f"recorded trial {next_index} {old.params} is not the point this search "
                                         f"proposes ({params}): not the same search (seed, domain, method)")
                    trials[next_index] = old
                    finished.append(old)
                    next_index += 1
                    continue
                trial = Trial(index=next_index, params=params, cost=math.nan, draws=draws)
                pending[executor.submit(_call_objective, objective, params)] = trial
                next_index += 1
            if not pending:
                continue
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


# ----------------------------------------------------------------------------- a trials file, written as it goes
def _trial_record(trial: Trial) -> dict:
    record = {"type": "trial", **asdict(trial)}
    record["cost"] = trial.cost if math.isfinite(trial.cost) else None
    return record


def start_trial_log(path: str | Path, header: dict) -> list[Trial]:
    """Open the trials file of a search: create it with ``header`` (a ``search`` record) or, when it exists,
    check that its header equals ``header`` and return its finished trials (to pass as ``history``)."""
    path = Path(path)
    header = {"type": "search", **header}
    if path.exists() and path.stat().st_size:
        old_header, trials = read_trial_log(path)
        if json.loads(json.dumps(header)) != old_header:
            raise ValueError(f"{path} belongs to another search: {old_header} != {header}")
        tmp = path.with_suffix(".partial")  # rewritten without a half-written last line, if a kill left one
        with open(tmp, "w") as handle:
            handle.write(json.dumps(old_header) + "\n")
            handle.writelines(json.dumps(_trial_record(t)) + "\n" for t in trials)
        os.replace(tmp, path)
        return trials
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        handle.write(json.dumps(header) + "\n")
    return []


def append_trial(path: str | Path, trial: Trial) -> None:
    """Append one finished trial to a trials file and flush it to disk."""
    with open(path, "a") as handle:
        handle.write(json.dumps(_trial_record(trial)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_trial_log(path: str | Path) -> tuple[dict, list[Trial]]:
    """The header and the trials of a trials file (a half-written last line, from a kill, is ignored)."""
    header, trials = None, []
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record.get("type") == "search":
                header = record
            elif record.get("type") == "trial":
                cost = math.inf if record["cost"] is None else record["cost"]
                trials.append(Trial(record["index"], record["params"], cost, record["status"], record.get("info", {}),
                                    record.get("draws", 1)))
    return header, trials


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
