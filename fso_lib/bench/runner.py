"""One benchmark run: train a task with a method for a budget, evaluating and checkpointing as it goes.

Thesis §4.2 and §6.6: the metric is the loss reached after a given number of updates and after a given
wall-clock time. The clock counts training only: it stops during evaluations and checkpoints.

Files of a run named ``NAME`` in ``out_dir``:

* ``NAME.jsonl``: one JSON record per line, written (and flushed) as produced: a ``header`` (configuration,
  versions, device, machine, dataset), one ``eval`` record per evaluation, ``resume`` records, and an
  ``end`` record (status ``completed``, ``diverged`` or ``error``);
* ``checkpoints/NAME.pt`` (git-ignored): model, optimizer, RNG states, position in the data order, clock,
  rewritten atomically at each evaluation, so that :func:`run` with ``resume=True`` continues a killed run.
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

from ..config import get_device
from .methods import get_method
from .tasks import make_task

#: Fields of the configuration that may change when a run is resumed (its budget and its display).
RESUMABLE_CHANGES = {"max_updates", "max_seconds", "progress", "note"}


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

    def __post_init__(self):
        if self.max_updates is None and self.max_seconds is None:
            raise ValueError("Give a budget: max_updates and/or max_seconds.")
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


def versions() -> dict:
    from .. import __version__

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "fso_lib": __version__, "cuda": torch.version.cuda}


# ----------------------------------------------------------------------------- small helpers
class Progress:
    """A one-line progress bar on stderr (carriage return), redrawn at most twice a second."""

    def __init__(self, label: str, enabled: bool = True, stream=None):
        self.label, self.enabled, self.stream = label, enabled, stream or sys.stderr
        self._last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self._last >= 0.5):
            self.stream.write(f"\r{self.label} {text}".ljust(100)[:160])
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def needs_statistics(optimizer) -> bool:
    """True when a chapter-6 optimizer wants a statistics minibatch before its next update."""
    method = getattr(optimizer, "needs_statistics", None)
    return bool(method()) if callable(method) else False


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
    """Mean loss (and error rate for classification) over ``inputs``, in eval mode, by chunks."""
    was_training = model.training
    model.eval()
    total, wrong, n = 0.0, 0, inputs.shape[0]
    for start in range(0, n, chunk):
        x, y = inputs[start:start + chunk], targets[start:start + chunk]
        out = model(x)
        total += float(task.loss(out, y)) * x.shape[0]
        if task.classification:
            wrong += int((out.argmax(dim=1) != y).sum())
    model.train(was_training)
    result = {"loss": total / n}
    if task.classification:
        result["error"] = wrong / n
    return result


# ----------------------------------------------------------------------------- the run
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


def run(config: RunConfig, out_dir: str | Path, resume: bool = False, task=None) -> RunResult:
    """Train ``config.method`` on ``config.task`` until its budget is spent or it diverges.

    ``resume=True`` continues from ``checkpoints/NAME.pt`` when it exists (else starts afresh); the budget
    may be extended, nothing else may change. ``task`` (from :func:`make_task`) may be passed to share
    loaded data between runs in one process.
    """
    device = get_device(config.device)
    results_path, checkpoint_path = run_paths(out_dir, config.run_name)
    method = get_method(config.method)
    hp = method.hyperparameters(config.hyperparameters)
    if task is None:
        task = make_task(config.task, sample=config.sample, dataset=config.dataset)
    if "loss" in method.optional and "loss" not in hp:  # K-FAC samples targets from the task's own loss
        hp["loss"] = task.sampled_loss
    task.to(device)
    init = config.init or task.defaults["init"]
    init_scale = config.init_scale if config.init_scale is not None else task.defaults["init_scale"]

    eval_generator = torch.Generator().manual_seed(0)  # the same training subset for every run
    subset = torch.randperm(task.n_train, generator=eval_generator)[: min(config.train_eval_size, task.n_train)]
    subset = subset.to(device)
    train_eval_x, train_eval_y = task.train_inputs[subset], task.train_targets[subset]
    test_x, test_y = task.test_inputs[: config.test_eval_size], task.test_targets[: config.test_eval_size]

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    model = task.build_model(init=init, init_scale=init_scale, seed=config.seed).to(device)
    built = method.build(model, hp)
    model, optimizer = built.model.to(device), built.optimizer

    update, epoch, position, elapsed = 0, 0, 0, 0.0
    stats_epoch, stats_position = 0, 0  # a second, independent data stream for statistics minibatches
    checkpoint = None
    if resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        saved = {k: v for k, v in checkpoint["config"].items() if k not in RESUMABLE_CHANGES}
        current = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"Cannot resume {config.run_name}: the configuration changed ({changed}).")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())  # RNG states must be CPU byte tensors
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), device)
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        update, epoch, position, elapsed = (checkpoint[k] for k in ("update", "epoch", "position", "elapsed"))
        stats_epoch, stats_position = checkpoint["stats_epoch"], checkpoint["stats_position"]
        initial_train_loss = checkpoint["initial_train_loss"]
        previous = _truncate_to_checkpoint(results_path, update)
        writer = _Writer(results_path, "a")
        writer.write({"type": "resume", "update": update, "time_s": elapsed, "config": asdict(config),
                      "wall_clock": datetime.datetime.now().isoformat(timespec="seconds"),
                      "machine": machine_info(device)})
        records = previous
    else:
        writer = _Writer(results_path, "w")
        header = {"type": "header", "name": config.run_name, "config": asdict(config), "hyperparameters": hp,
                  "init": init, "init_scale": init_scale, "method_label": method.label,
                  "method_source": method.source, "task": task.name, "dataset": task.dataset,
                  "n_train": task.n_train, "n_test": task.test_inputs.shape[0],
                  "test_eval_size": int(test_x.shape[0]),
                  "train_eval_size": int(subset.numel()), "device": str(device), "machine": machine_info(device),
                  "versions": versions(), "wall_clock": datetime.datetime.now().isoformat(timespec="seconds")}
        writer.write(header)
        records = [header]
        initial_train_loss = None

    progress = Progress(f"{config.method}", enabled=config.progress)
    order = _epoch_order(task.n_train, config.seed, epoch).to(device)
    stats_seed = config.seed + 7919
    stats_order = _epoch_order(task.n_train, stats_seed, stats_epoch).to(device)
    last_eval_update, last_eval_time = update, elapsed
    status = "running"
    last_eval = None

    def evaluate_and_save() -> dict:
        nonlocal last_eval_update, last_eval_time, initial_train_loss, last_eval
        train = evaluate(model, task, train_eval_x, train_eval_y)
        test = evaluate(model, task, test_x, test_y)
        if initial_train_loss is None:
            initial_train_loss = train["loss"]
        interval = update - last_eval_update
        record = {"type": "eval", "update": update, "epoch": update * config.batch_size / task.n_train,
                  "time_s": elapsed, "train_loss": _json_float(train["loss"]), "test_loss": _json_float(test["loss"]),
                  "ms_per_update": (elapsed - last_eval_time) / interval * 1e3 if interval else None}
        if task.classification:
            record["train_error"], record["test_error"] = train["error"], test["error"]
        writer.write(record)
        records.append(record)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        _save_checkpoint(checkpoint_path, {
            "config": asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
            "update": update, "epoch": epoch, "position": position, "elapsed": elapsed,
            "stats_epoch": stats_epoch, "stats_position": stats_position,
            "initial_train_loss": initial_train_loss})
        last_eval_update, last_eval_time, last_eval = update, elapsed, record
        return record

    def budget_spent(seconds: float) -> bool:
        return (config.max_updates is not None and update >= config.max_updates) or (
            config.max_seconds is not None and seconds >= config.max_seconds)

    def diverged(loss: float) -> bool:
        return not math.isfinite(loss) or (initial_train_loss is not None
                                           and loss > config.divergence_factor * initial_train_loss)

    error = divergence_reason = None
    try:
        if checkpoint is None:
            evaluate_and_save()
        else:
            last_eval = next((r for r in reversed(records) if r.get("type") == "eval"), None)
        if last_eval is not None and diverged(last_eval["train_loss"] if last_eval["train_loss"] is not None else math.inf):
            status = "diverged"
        next_eval = _next_eval(update, config)
        model.train()
        started = time.perf_counter()
        while status == "running" and not budget_spent(elapsed):
            if position + config.batch_size > task.n_train:
                epoch, position = epoch + 1, 0
                order = _epoch_order(task.n_train, config.seed, epoch).to(device)
            index = order[position:position + config.batch_size]
            position += config.batch_size
            x, y = task.train_inputs[index], task.train_targets[index]
            if method.uses_statistics and needs_statistics(optimizer):
                if stats_position + config.batch_size > task.n_train:
                    stats_epoch, stats_position = stats_epoch + 1, 0
                    stats_order = _epoch_order(task.n_train, stats_seed, stats_epoch).to(device)
                stats_index = stats_order[stats_position:stats_position + config.batch_size]
                stats_position += config.batch_size
                optimizer.update_statistics(task.train_inputs[stats_index])
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(x), y)
            loss.backward()
            try:
                optimizer.step()
            except FloatingPointError as exc:  # fso_lib.optim.DivergenceError: a non-finite update
                status, divergence_reason = "diverged", f"{type(exc).__name__}: {exc}"
            update += 1
            now = time.perf_counter()
            seconds = elapsed + now - started
            if update % 20 == 0 or update == next_eval:
                value = float(loss.detach())
                if diverged(value):
                    status = "diverged"
                budget = (f"{update / config.max_updates:6.1%} of {config.max_updates} updates"
                          if config.max_updates else f"{seconds / config.max_seconds:6.1%} of {config.max_seconds:g} s")
                fraction = max(update / config.max_updates if config.max_updates else 0.0,
                               seconds / config.max_seconds if config.max_seconds else 0.0)
                progress.show(f"{_bar(fraction)} {budget} | update {update} | {seconds:7.1f} s | "
                              f"minibatch loss {value:.4g} | {seconds / max(update, 1) * 1e3:.1f} ms/update")
            if update >= next_eval or budget_spent(seconds) or status == "diverged":
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed += time.perf_counter() - started
                record = evaluate_and_save()
                if diverged(record["train_loss"] if record["train_loss"] is not None else math.inf):
                    status = "diverged"
                next_eval = _next_eval(update, config)
                started = time.perf_counter()
        if status == "running":
            status = "completed"
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised
        status, error = "error", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        progress.close()
        final = last_eval or {}
        end = {"type": "end", "status": status, "update": update, "time_s": elapsed,
               "train_loss": final.get("train_loss"), "test_loss": final.get("test_loss"),
               "ms_per_update": elapsed / update * 1e3 if update else None,
               "wall_clock": datetime.datetime.now().isoformat(timespec="seconds")}
        if error:
            end["error"] = error
        if divergence_reason:
            end["divergence"] = divergence_reason
        writer.write(end)
        writer.close()
        records.append(end)
    return RunResult(config.run_name, status, update, elapsed,
                     final.get("train_loss") if final.get("train_loss") is not None else math.inf,
                     final.get("test_loss") if final.get("test_loss") is not None else math.inf,
                     results_path, records)
