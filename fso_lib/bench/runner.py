"""One benchmark run: train a task with a method for a budget, evaluating and checkpointing as it goes.

Thesis §4.2 and §6.6: the metric is the loss reached after a given number of updates and after a given
wall-clock time. The clock counts training only: it stops during evaluations and checkpoints. On a CPU shared
with other work, ``RunConfig(clock="process")`` counts the CPU seconds of the run's own process instead
(``time.process_time``): with one torch thread per run this is the run's wall-clock time on a machine where
nothing else competes for its core, and other work on the machine does not stretch it (it can still slow the
run through shared caches and memory bandwidth).

Files of a run named ``NAME`` in ``out_dir``:

* ``NAME.jsonl``: one JSON record per line, written (and flushed) as produced: a ``header`` (configuration,
  versions, device, machine, dataset), one ``eval`` record per evaluation, ``resume`` records, and an
  ``end`` record (status ``completed``, ``diverged`` or ``error``);
* ``checkpoints/NAME.pt`` (git-ignored): model, optimizer, RNG states, position in the data order, clock,
  rewritten atomically at each evaluation, so that :func:`run` with ``resume=True`` continues a killed run.

The steady-state loop (:meth:`Run.train_steps`) keeps the whole step on the device: the update is
:func:`fso_lib.training.training_step`, the divergence test of each minibatch loss folds into a device
flag (:class:`DivergenceMonitor`), and the flags (the runner's and a chapter-6 optimizer's) are read at
each evaluation. ``RunConfig(compile=True)`` compiles the step (:func:`make_step`).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import get_device
from ..optim import DivergenceError, LayerwiseOptimizer, check_divergence, needs_statistics
from ..training import training_step
from .methods import get_method
from .tasks import make_task

#: Fields of the configuration that may change when a run is resumed (its budget and its display).
RESUMABLE_CHANGES = {"max_updates", "max_seconds", "min_updates", "progress", "note"}


#: The run's clocks (``RunConfig.clock``): wall-clock time, or the CPU seconds of this process (all its threads).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass
class RunConfig:
    """Everything that defines a run. ``hyperparameters`` go to the method; ``init``/``init_scale`` to the model."""

    task: str = "autoencoder"
    method: str = "sgd"
    hyperparameters: dict = field(default_factory=dict)
    init: str | None = None  # default: the task's ("glorot")
    init_scale: float | None = None
    batch_size: int = 200
    max_updates: int | None = None
    max_seconds: float | None = None  # training time (evaluations excluded)
    min_updates: int | None = None  # with max_seconds: go on past the time budget until this many updates
    eval_every: int = 1000  # updates between evaluations (an upper bound with eval_schedule="log")
    eval_schedule: str = "log"  # "log": also at updates 10, 13, 17, ... (×1.3) below eval_every; "linear"
    train_eval_size: int = 10_000  # size of the fixed training subset the train loss is measured on
    test_eval_size: int | None = None  # None: the whole test set; else its first test_eval_size images
    seed: int = 0
    device: str | None = None
    dataset: str | None = None  # classification: "cifar10", "mnist" or None (CIFAR-10 if available)
    sample: bool | None = None  # True: the 1,000-image MNIST sample; None: follow FSO_FAST
    divergence_factor: float = 10.0  # diverged when a loss exceeds this times the initial train loss
    name: str | None = None
    note: str = ""  # free text kept in the header (e.g. "4 runs shared this GPU")
    progress: bool = True
    compile: bool = False  # torch.compile the step (mode "reduce-overhead": CUDA graphs on a GPU); see make_step
    # CPU: flush denormal floats (magnitude below 1.2e-38) to zero during the run. A saturated sigmoid network makes
    # them by the million, and each costs a CPU many cycles: a stuck K-FAC run took 1.4 s per update with them and
    # 0.13 s without, with the same losses. Results change only in values that small; torch's default (off) is
    # restored when the run ends. No effect on a GPU.
    flush_denormal: bool = True
    clock: str = "wall"  # "wall": time.perf_counter; "process": CPU seconds of this process (see the module docstring)

    def __post_init__(self):
        if self.max_updates is None and self.max_seconds is None:
            raise ValueError("Give a budget: max_updates and/or max_seconds.")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, not {self.clock!r}.")
        if self.clock == "process" and self.device is not None and str(self.device).startswith("cuda"):
            raise ValueError('clock="process" counts CPU seconds, not the GPU\'s: use clock="wall" on a GPU.')
        if self.eval_schedule not in ("log", "linear"):
            raise ValueError("eval_schedule must be 'log' or 'linear'.")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.task}-{self.method}-seed{self.seed}"


def run_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(results file, checkpoint file) of the run ``name``."""
    out_dir = Path(out_dir)
    return out_dir / f"{name}.jsonl", out_dir / "checkpoints" / f"{name}.pt"


# ----------------------------------------------------------------------------- environment description
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "hostname": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _code_revision() -> str | None:
    """``git describe --always --dirty`` of the checkout this module was imported from (None outside a git
    checkout): read once, at import, so that a long-lived worker reports the code it runs, not a later HEAD."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


CODE_REVISION = _code_revision()


def versions() -> dict:
    from .. import __version__

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "fso_lib": __version__, "cuda": torch.version.cuda, "code": CODE_REVISION}


# ----------------------------------------------------------------------------- small helpers
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randperm(n, generator=generator)


def _next_eval(update: int, config: RunConfig) -> int:
    multiple = (update // config.eval_every + 1) * config.eval_every
    if config.eval_schedule == "linear":
        return multiple
    geometric = max(10, update + 1, int(math.ceil(update * 1.3)))
    return min(multiple, geometric)


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Writer:
    """Appends JSON lines and flushes each one to disk."""

    def __init__(self, path: Path, mode: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, mode)

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def read_records(path: str | Path) -> list[dict]:
    """The records of a results file; a half-written last line (a killed run) is skipped."""
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _truncate_to_checkpoint(path: Path, update: int) -> list[dict]:
    """Keep the records up to the evaluation at ``update`` (the checkpoint's); drop what came after."""
    kept, found = [], False
    for record in read_records(path):
        kept.append(record)
        if record.get("type") == "eval" and record["update"] == update:
            found = True
            break
    if not found:
        raise RuntimeError(f"{path} has no evaluation at update {update}, the checkpoint's: cannot resume.")
    tmp = path.with_suffix(".jsonl.partial")
    with open(tmp, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, task, inputs, targets, chunk: int = 2000) -> dict:
    """Mean loss (and error rate for classification) over ``inputs``, in eval mode, by chunks.

    The sums stay on the device; the result is read back once, at the end."""
    was_training = model.training
    model.eval()
    n = inputs.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    wrong = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for start in range(0, n, chunk):
        x, y = inputs[start:start + chunk], targets[start:start + chunk]
        out = model(x)
        total += task.loss(out, y).double() * x.shape[0]
        if task.classification:
            wrong += (out.argmax(dim=1) != y).sum()
    model.train(was_training)
    result = {"loss": float(total) / n}
    if task.classification:
        result["error"] = int(wrong) / n
    return result


# ----------------------------------------------------------------------------- the pieces of a run
class DataStream:
    """Minibatches of indices in a per-epoch random order that depends only on ``(seed, epoch)``.

    The position lives on the host, the order on the device: drawing a minibatch never reads the device.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device, epoch: int = 0, position: int = 0):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.epoch, self.position = epoch, position
        self.order = self._order()

    def _order(self) -> torch.Tensor:
        order = _epoch_order(self.n, self.seed, self.epoch)
        if self.device.type == "cuda":  # a pinned buffer copies without making the host wait
            self._pinned = order.pin_memory()
            return self._pinned.to(self.device, non_blocking=True)
        return order.to(self.device)

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._order()
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return index


class DivergenceMonitor:
    """Device-side divergence test of every minibatch loss, read on the host only at evaluation time.

    A loss diverged when it is not finite or exceeds ``factor`` × the initial train loss (the baseline,
    known after the first evaluation). Each step folds its verdict into a 0-dim bool tensor on the
    device: no host synchronization per step."""

    def __init__(self, factor: float, device: torch.device, baseline: float | None = None):
        self.factor, self.device = factor, device
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.threshold = torch.full((), math.inf, device=device)
        self.baseline = None
        if baseline is not None:
            self.set_baseline(baseline)

    def set_baseline(self, initial_train_loss: float) -> None:
        self.baseline = initial_train_loss
        self.threshold.fill_(self.factor * initial_train_loss)

    def observe(self, loss: torch.Tensor) -> None:
        self.flag.logical_or_(~torch.isfinite(loss) | (loss > self.threshold))

    def diverged(self, loss: float | None) -> bool:
        """Whether an evaluated loss (``None``: not finite) counts as divergence."""
        return loss is None or not math.isfinite(loss) or (
            self.baseline is not None and loss > self.factor * self.baseline)

    def read_and_clear(self) -> bool:
        """One host read: whether any minibatch loss diverged since the last call."""
        seen = bool(self.flag)
        self.flag.fill_(False)
        return seen


def _read_optimizer_divergence(optimizer) -> str | None:
    """Read (and clear) the device-side non-finite flag of a chapter-6 optimizer (built with
    ``check_every=None`` by :mod:`.methods`): the reason it diverged, or None. A no-op for torch's."""
    try:
        check_divergence(optimizer)
    except DivergenceError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def make_step(model, loss_fn, optimizer, device: torch.device, compile: bool = False):
    """The update the run repeats: :func:`fso_lib.training.training_step` on ``(x, y, statistics_inputs)``.

    ``compile=True`` compiles the model's forward/backward with ``torch.compile``, in mode
    ``"reduce-overhead"`` on a GPU (the steady-state step is replayed as CUDA graphs) and the default mode
    elsewhere (CPU: C++ kernels, which needs a C++ compiler). ``torch.optim`` steps (SGD, Adam) are
    compiled too. The chapter-6 optimizers (:class:`~fso_lib.optim.LayerwiseOptimizer`) compile the steady-state
    part of their step (:meth:`~fso_lib.optim.LayerwiseOptimizer.compile_step`: one graph, compiled once, the
    statistics and inverse refreshes eager; ``tests/test_optim_compile.py`` checks compiled = eager across
    refreshes with inductor on the CPU) and keep their forward/backward eager (the capture hooks)."""
    if not compile:
        return lambda x, y, statistics=None: training_step(model, loss_fn, optimizer, x, y, statistics)
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled_model = torch.compile(model, mode=mode)
    compiled_optimizer_step = None
    if isinstance(optimizer, LayerwiseOptimizer):
        # the steady-state part of the step (layer updates, non-finite flag, masked application) is compiled once;
        # the schedule (statistics, inverse refreshes) stays eager. The forward pass stays eager too: the hooks
        # that capture each layer's input and ∂L/∂a would split a compiled forward into one graph per layer.
        optimizer.compile_step(mode=mode)
        compiled_model = model
    elif type(optimizer).__module__.startswith("torch.optim"):
        @torch.compile(mode=mode, fullgraph=False)
        def compiled_optimizer_step():
            optimizer.step()

    def step(x, y, statistics=None):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return training_step(compiled_model, loss_fn, optimizer, x, y, statistics,
                             optimizer_step=compiled_optimizer_step).clone()

    return step


class ProgressBar:
    """A ``tqdm.auto`` bar over the run's budget (updates, or training seconds when only a time budget is
    set): a text bar in a terminal, a widget in JupyterLab. Host-side only; the latest evaluation's train
    loss is shown beside it."""

    def __init__(self, config: RunConfig, update: int, elapsed: float):
        self.by_updates = config.max_updates is not None
        if self.by_updates:
            self.bar = tqdm(total=config.max_updates, initial=update, unit="update", desc=config.method,
                            disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
        else:
            self.bar = tqdm(total=config.max_seconds, initial=round(elapsed, 1), desc=config.method,
                            disable=not config.progress, dynamic_ncols=True, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} s of training{postfix}")
        self.last_redraw = time.monotonic()

    def advance(self, seconds: float) -> None:
        if self.by_updates:
            self.bar.update(1)
        elif time.monotonic() - self.last_redraw >= 0.5:
            self.bar.n = round(min(seconds, self.bar.total), 1)
            self.bar.refresh()
            self.last_redraw = time.monotonic()

    def show_eval(self, record: dict) -> None:
        postfix = {"train loss": f"{record['train_loss']:.4g}" if record["train_loss"] is not None else "nan"}
        if record.get("ms_per_update"):
            postfix["ms/update"] = f"{record['ms_per_update']:.1f}"
        if not self.by_updates:
            self.bar.n = round(min(record["time_s"], self.bar.total), 1)
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunResult:
    name: str
    status: str
    updates: int
    seconds: float
    train_loss: float
    test_loss: float
    results_path: Path
    records: list = field(default_factory=list)


class Run:
    """The state of one run between its pieces: model, optimizer, data streams, clock, records.

    :func:`run` is ``Run(...)``, :meth:`start` (or :meth:`resume`), :meth:`train` and :meth:`finish`;
    the steady-state loop :meth:`train_steps` reads nothing from the device."""

    def __init__(self, config: RunConfig, out_dir: str | Path, task=None):
        self.config = config
        self.device = device = get_device(config.device)
        self.results_path, self.checkpoint_path = run_paths(out_dir, config.run_name)
        self.method = method = get_method(config.method)
        self.hp = method.hyperparameters(config.hyperparameters)
        self.task = task if task is not None else make_task(config.task, sample=config.sample, dataset=config.dataset)
        if "loss" in method.optional and "loss" not in self.hp:  # K-FAC samples targets from the task's own loss
            self.hp["loss"] = self.task.sampled_loss
        self.task.to(device)
        self.init = config.init or self.task.defaults["init"]
        self.init_scale = config.init_scale if config.init_scale is not None else self.task.defaults["init_scale"]
        self._evaluation_sets()
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        model = self.task.build_model(init=self.init, init_scale=self.init_scale, seed=config.seed).to(device)
        built = method.build(model, self.hp)
        self.model, self.optimizer = built.model.to(device), built.optimizer
        self.update, self.elapsed = 0, 0.0
        self.batches = DataStream(self.task.n_train, config.batch_size, config.seed, device)
        # a second, independent stream for the statistics minibatches of the chapter-6 optimizers
        self.statistics_batches = DataStream(self.task.n_train, config.batch_size, config.seed + 7919, device)
        self.monitor = DivergenceMonitor(config.divergence_factor, device)
        self.step = make_step(self.model, self.task.loss, self.optimizer, device, compile=config.compile)
        self.records, self.last_eval, self.last_eval_update, self.last_eval_time = [], None, 0, 0.0
        self.status, self.error, self.divergence_reason = "running", None, None
        self.writer = self.progress = None

    def _evaluation_sets(self) -> None:
        config, task = self.config, self.task
        subset = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(0))  # same subset for every run
        self.subset = subset[: min(config.train_eval_size, task.n_train)].to(self.device)
        self.train_eval = task.train_inputs[self.subset], task.train_targets[self.subset]
        self.test_eval = task.test_inputs[: config.test_eval_size], task.test_targets[: config.test_eval_size]

    # -- starting --------------------------------------------------------------------------------
    def header(self) -> dict:
        config, task = self.config, self.task
        return {"type": "header", "name": config.run_name, "config": asdict(config), "hyperparameters": self.hp,
                "init": self.init, "init_scale": self.init_scale, "method_label": self.method.label,
                "method_source": self.method.source, "task": task.name, "dataset": task.dataset,
                "n_train": task.n_train, "n_test": task.test_inputs.shape[0],
                "test_eval_size": int(self.test_eval[0].shape[0]), "train_eval_size": int(self.subset.numel()),
                "device": str(self.device), "machine": machine_info(self.device), "versions": versions(),
                "wall_clock": _now()}

    def start(self) -> None:
        """A fresh run: the header, then the evaluation at update 0 (which sets the divergence baseline)."""
        self.writer = _Writer(self.results_path, "w")
        self._write(self.header())
        self.evaluate_and_save()

    def resume(self) -> None:
        """Continue from the checkpoint: same configuration (except the budget), model, optimizer, RNG,
        data positions, clock and divergence baseline; the records after the checkpoint are dropped."""
        config, device = self.config, self.device
        checkpoint = torch.load(self.checkpoint_path, map_location=device, weights_only=False)
        _check_same_configuration(checkpoint["config"], config)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())  # RNG states must be CPU byte tensors
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), device)
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        self.update, self.elapsed = checkpoint["update"], checkpoint["elapsed"]
        self.batches = DataStream(self.task.n_train, config.batch_size, config.seed, device,
                                  checkpoint["epoch"], checkpoint["position"])
        self.statistics_batches = DataStream(self.task.n_train, config.batch_size, config.seed + 7919, device,
                                             checkpoint["stats_epoch"], checkpoint["stats_position"])
        self.monitor.set_baseline(checkpoint["initial_train_loss"])
        self.records = _truncate_to_checkpoint(self.results_path, self.update)
        self.writer = _Writer(self.results_path, "a")
        self._write({"type": "resume", "update": self.update, "time_s": self.elapsed, "config": asdict(config),
                     "divergence_baseline": self.monitor.baseline, "wall_clock": _now(),
                     "machine": machine_info(device)})
        self.last_eval = next((r for r in reversed(self.records) if r.get("type") == "eval"), None)
        self.last_eval_update, self.last_eval_time = self.update, self.elapsed
        if self.last_eval is not None and self.monitor.diverged(self.last_eval["train_loss"]):
            self.status = "diverged"

    # -- training --------------------------------------------------------------------------------
    def budget_spent(self, seconds: float) -> bool:
        config = self.config
        if config.max_updates is not None and self.update >= config.max_updates:
            return True
        return (config.max_seconds is not None and seconds >= config.max_seconds
                and (config.min_updates is None or self.update >= config.min_updates))

    def train_steps(self, until_update: int) -> None:
        """Updates until ``until_update`` or the budget, then stop the clock (after the device finished)."""
        clock = CLOCKS[self.config.clock]
        started = clock()
        self.steady_state_loop(until_update, started)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock stops when the device has finished
        self.elapsed += clock() - started

    def steady_state_loop(self, until_update: int, started: float) -> None:
        """The loop between evaluations. Nothing is read from the device (the loss's divergence test
        stays there); the clock is read on the host."""
        uses_statistics = self.method.uses_statistics
        task, monitor, clock = self.task, self.monitor, CLOCKS[self.config.clock]
        seconds = self.elapsed
        while self.update < until_update and not self.budget_spent(seconds):
            index = self.batches.next()
            statistics = None
            if uses_statistics and needs_statistics(self.optimizer):
                statistics = task.train_inputs[self.statistics_batches.next()]
            try:
                loss = self.step(task.train_inputs[index], task.train_targets[index], statistics)
            except FloatingPointError as exc:  # an optimizer that checks its own updates and raises
                self.status, self.divergence_reason = "diverged", f"{type(exc).__name__}: {exc}"
                self.update += 1
                break
            monitor.observe(loss)
            self.update += 1
            seconds = self.elapsed + clock() - started
            if self.progress is not None:
                self.progress.advance(seconds)

    def train(self) -> None:
        """Alternate :meth:`train_steps` and evaluations until the budget is spent or the run diverges."""
        self.model.train()
        while self.status == "running" and not self.budget_spent(self.elapsed):
            self.train_steps(_next_eval(self.update, self.config))
            record = self.evaluate_and_save()
            if self.monitor.read_and_clear() or self.monitor.diverged(record["train_loss"]):
                self.status = "diverged"
            reason = _read_optimizer_divergence(self.optimizer)
            if reason is not None:
                self.status, self.divergence_reason = "diverged", self.divergence_reason or reason
        if self.status == "running":
            self.status = "completed"

    # -- evaluating, checkpointing, finishing -------------------------------------------------------------
    def _write(self, record: dict) -> None:
        self.writer.write(record)
        self.records.append(record)

    def evaluate_and_save(self) -> dict:
        config, task = self.config, self.task
        train = evaluate(self.model, task, *self.train_eval)
        test = evaluate(self.model, task, *self.test_eval)
        if self.monitor.baseline is None:
            self.monitor.set_baseline(train["loss"])
        interval = self.update - self.last_eval_update
        record = {"type": "eval", "update": self.update, "epoch": self.update * config.batch_size / task.n_train,
                  "time_s": self.elapsed, "train_loss": _json_float(train["loss"]),
                  "test_loss": _json_float(test["loss"]),
                  "ms_per_update": (self.elapsed - self.last_eval_time) / interval * 1e3 if interval else None}
        if task.classification:
            record["train_error"], record["test_error"] = train["error"], test["error"]
        self._write(record)
        device = self.device
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        _save_checkpoint(self.checkpoint_path, {
            "config": asdict(config), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng, "update": self.update, "epoch": self.batches.epoch, "position": self.batches.position,
            "elapsed": self.elapsed, "stats_epoch": self.statistics_batches.epoch,
            "stats_position": self.statistics_batches.position, "initial_train_loss": self.monitor.baseline})
        self.last_eval_update, self.last_eval_time, self.last_eval = self.update, self.elapsed, record
        if self.progress is not None:
            self.progress.show_eval(record)
        return record

    def finish(self) -> RunResult:
        """The ``end`` record; closes the file and the progress bar."""
        if self.progress is not None:
            self.progress.close()
        final = self.last_eval or {}
        end = {"type": "end", "status": self.status, "update": self.update, "time_s": self.elapsed,
               "train_loss": final.get("train_loss"), "test_loss": final.get("test_loss"),
               "ms_per_update": self.elapsed / self.update * 1e3 if self.update else None,
               "divergence_baseline": self.monitor.baseline, "wall_clock": _now()}
        if self.error:
            end["error"] = self.error
        if self.divergence_reason:
            end["divergence"] = self.divergence_reason
        if self.writer is not None:
            self._write(end)
            self.writer.close()
        return RunResult(self.config.run_name, self.status, self.update, self.elapsed,
                         _or_inf(final.get("train_loss")), _or_inf(final.get("test_loss")), self.results_path,
                         self.records)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _or_inf(value: float | None) -> float:
    return value if value is not None else math.inf


def _check_same_configuration(saved: dict, config: RunConfig) -> None:
    """Refuse to resume when anything but the budget and display changed (fields added since the
    checkpoint was written count as their default)."""
    defaults = asdict(RunConfig(max_updates=1))
    current = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in current if saved.get(k, defaults[k]) != current[k])
    if changed:
        raise ValueError(f"Cannot resume {config.run_name}: the configuration changed ({changed}).")


def run(config: RunConfig, out_dir: str | Path, resume: bool = False, task=None) -> RunResult:
    """Train ``config.method`` on ``config.task`` until its budget is spent or it diverges.

    ``resume=True`` continues from ``checkpoints/NAME.pt`` when it exists (else starts afresh); the budget
    may be extended, nothing else may change. ``task`` (from :func:`make_task`) may be passed to share
    loaded data between runs in one process.
    """
    torch.set_flush_denormal(config.flush_denormal)
    try:
        return _run(config, out_dir, resume, task)
    finally:
        torch.set_flush_denormal(False)


def _run(config: RunConfig, out_dir: str | Path, resume: bool, task) -> RunResult:
    state = Run(config, out_dir, task)
    try:
        if resume and state.checkpoint_path.exists():
            state.resume()
        else:
            state.start()
        state.progress = ProgressBar(config, state.update, state.elapsed)
        state.train()
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised
        state.status, state.error = "error", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result = state.finish()
    return result
