"""A small minibatch training loop shared by the notebooks (thesis §2.1-§2.2).

:func:`train` runs ``n_steps`` minibatch updates of any PyTorch optimizer and records the training
loss of each minibatch, the wall-clock time spent in updates, and (optionally) the loss on fixed evaluation sets.
It is the plain SGD loop of thesis §2.2: sample a minibatch, compute the gradient, take a step.

:func:`training_step` is the one update that both this loop and the benchmark runner
(:mod:`fso_lib.bench.runner`) perform: the statistics minibatch of the chapter-6 optimizers (§6.4),
``zero_grad``, loss, backward, step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .optim.base import needs_statistics

__all__ = ["History", "train", "training_step", "sum_squared_error", "minibatches", "evaluate"]


def sum_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the outputs and averaged over the examples (thesis §1.2.1, §4.2)."""
    return ((output - target) ** 2).sum(dim=1).mean()


@dataclass
class History:
    """What :func:`train` records: one entry per update (``loss``, ``seconds``) and per evaluation."""

    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: dict[str, list[float]] = field(default_factory=dict)
    diverged: bool = False

    @property
    def final_loss(self) -> float:
        """Mean minibatch loss over the last tenth of the run (``inf`` if the run diverged)."""
        if self.diverged or not self.loss:
            return math.inf
        tail = self.loss[-max(1, len(self.loss) // 10):]
        return sum(tail) / len(tail)


def minibatches(n_examples: int, batch_size: int, generator: torch.Generator):
    """An endless stream of index minibatches: each epoch visits a new random permutation."""
    while True:
        order = torch.randperm(n_examples, generator=generator)
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def training_step(
    model: Callable,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    statistics_inputs: torch.Tensor | None = None,
    optimizer_step: Callable[[], object] | None = None,
) -> torch.Tensor:
    """One minibatch update; returns the minibatch loss as a detached 0-dim tensor (no host read).

    ``statistics_inputs``: a separate minibatch for the layer statistics of a chapter-6 optimizer
    (``optimizer.update_statistics``, thesis §6.4), given when ``needs_statistics(optimizer)``.
    ``model`` may be a compiled module and ``optimizer_step`` a compiled ``optimizer.step`` (the
    benchmark's ``compile`` option); by default ``optimizer.step()`` is called.
    An optimizer whose ``wants_minibatch_loss`` is true (K-FAC with ``damping_adaptation``, which measures
    the loss after its update) gets ``step(minibatch_loss=..., loss=...)``: a forward-only evaluation of this
    minibatch's loss and the loss just computed; every other optimizer gets a plain ``step()``.
    """
    if statistics_inputs is not None:
        optimizer.update_statistics(statistics_inputs)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    step = optimizer.step if optimizer_step is None else optimizer_step
    if getattr(optimizer, "wants_minibatch_loss", False):
        step(minibatch_loss=lambda: loss_fn(model(x), y), loss=loss.detach())
    else:
        step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor,
             batch_size: int = 2000) -> float:
    """The empirical risk of ``model`` on a whole data set, computed in chunks."""
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        total += float(loss_fn(model(x), y)) * len(x)
    return total / len(inputs)


def train(
    model: nn.Module,
    loss_fn: Callable,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 0.1,
    n_steps: int = 100,
    batch_size: int = 100,
    seed: int = 0,
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    eval_every: int = 0,
    step_fn: Callable | None = None,
) -> History:
    """Minibatch training (thesis §2.2): ``n_steps`` updates on minibatches of ``batch_size`` examples.

    ``optimizer`` defaults to ``torch.optim.SGD(model.parameters(), lr)``; a chapter-6 optimizer gets its
    statistics minibatches from a second, independent stream. ``step_fn(x, y) -> loss``
    replaces the whole update for optimizers that are not ``torch.optim`` objects (e.g. chapter 5's
    updated backpropagation). A non-finite loss stops the run and sets ``history.diverged``.
    ``eval_sets`` maps names to ``(inputs, targets)`` evaluated every ``eval_every`` steps and at the end.
    """
    if optimizer is None and step_fn is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = minibatches(len(inputs), min(batch_size, len(inputs)), generator)
    statistics_batches = minibatches(len(inputs), min(batch_size, len(inputs)), torch.Generator().manual_seed(seed + 7919))
    history = History(eval_loss={name: [] for name in (eval_sets or {})})

    def record_eval(step: int) -> None:
        history.eval_steps.append(step)
        for name, (x, y) in (eval_sets or {}).items():
            history.eval_loss[name].append(evaluate(model, loss_fn, x, y))

    elapsed = 0.0  # time spent in updates only (evaluations are not counted)
    for step in range(n_steps):
        if eval_sets and eval_every and step % eval_every == 0:
            record_eval(step)
        start = time.perf_counter()
        index = next(batches)
        x, y = inputs[index], targets[index]
        if step_fn is not None:
            loss = float(step_fn(x, y))
        else:
            statistics = inputs[next(statistics_batches)] if needs_statistics(optimizer) else None
            loss = float(training_step(model, loss_fn, optimizer, x, y, statistics))
        elapsed += time.perf_counter() - start
        history.loss.append(loss)
        history.seconds.append(elapsed)
        if not math.isfinite(loss):
            history.diverged = True
            break
    if eval_sets and not history.diverged:
        record_eval(len(history.loss))
    return history
