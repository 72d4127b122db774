"""Train a tiny network with six update rules and compare their loss curves (thesis §3.1–3.2, §6.4–6.5).

The problem is the one of notebook 03b: a 2-``width``-3 tanh student fitting a fixed 2-4-3 teacher on
``n_examples`` Gaussian inputs, with any loss of :mod:`fso_lib.losses` (regression targets for the squared
error, hard multi-label targets for the binary cross-entropies, class labels for the cross-entropies).
Every update uses the whole training set (no minibatch noise) and is ``θ ← θ − η · direction``:

=====================  ===================================================  ==========================
method                 direction                                            thesis
=====================  ===================================================  ==========================
``gd``                 ``∇R``                                               §3.1.2
``damped_newton``      ``(H + ε I)⁻¹ ∇R``, exact Hessian                    §3.1.3
``gauss_newton``       ``(G + ε I)⁻¹ ∇R``, exact Gauss-Newton matrix        §3.1.4
``natural_gradient``   ``(F + ε I)⁻¹ ∇R``, exact Fisher                     §3.2.2
``kfac``               per layer ``(Γ + (√ε/π) I)⁻¹ ∇[W b] (Ā + π√ε I)⁻¹``  §6.5.1 (:class:`~fso_lib.optim.KFAC`)
``acp``                per layer ``(1/α) ∇W (C + (ε/α) I)⁻¹`` (centered)    §6.4.2 (:class:`~fso_lib.optim.ACP`)
=====================  ===================================================  ==========================

The first four come from :func:`fso_lib.steps.second_order_step` (dense matrices from
:mod:`fso_lib.curvature`); K-FAC and ACP are the library's optimizers, with their statistics refreshed
at every update (K-FAC: no running average, ``kfac_samples`` targets drawn from the model per example
with a generator seeded by ``seed``; ACP: the covariance of the training inputs of each layer, ``α`` by the
max-squared-gradient heuristic) and no momentum. ``ε`` is the damping slider of every second-order method;
for K-FAC it is split between the two factors with the π correction, for ACP the ε damped by ``ε/α``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from . import curvature as _curvature
from . import steps as _steps
from .losses import get_loss
from .models import mlp
from .optim import ACP, KFAC, DivergenceError

__all__ = ["RACE_METHODS", "RACE_COLORS", "RACE_LOSSES", "RaceRun", "make_tiny_problem", "TEACHER_SEED", "race_run", "race_step", "DIVERGENCE_FACTOR"]

#: Method name → label used in legends.
RACE_METHODS = {
    "gd": "gradient descent",
    "damped_newton": "damped Newton",
    "gauss_newton": "Gauss-Newton",
    "natural_gradient": "natural gradient",
    "kfac": "K-FAC",
    "acp": "ACP",
}

#: Line colour of each method in the race's plots (K-FAC and ACP keep their book colours).
RACE_COLORS = {
    "gd": "#7f7f7f",
    "damped_newton": "#9467bd",
    "gauss_newton": "#e6a100",
    "natural_gradient": "#2ca02c",
    "kfac": "#1f77b4",
    "acp": "#d62728",
}

#: The losses offered (names of :func:`fso_lib.losses.get_loss`).
RACE_LOSSES = ("squared_error", "binary_cross_entropy", "cross_entropy",
               "binary_cross_entropy_with_logits", "cross_entropy_with_logits")

#: A run is stopped and called diverged when its loss exceeds this multiple of the initial loss.
DIVERGENCE_FACTOR = 1e2

_DTYPE = torch.float64
#: Seed of the teacher and of the inputs (never a student's seed: a 2-4-3 student would then be the teacher).
TEACHER_SEED = 1000


def make_tiny_problem(loss_name: str, width: int = 6, n_examples: int = 64, seed: int = 0):
    """``(model, loss, x, y)``: a fresh float64 student (initialized with ``seed``) and the teacher's data.

    The teacher (2-4-3, tanh) and the inputs are fixed (:data:`TEACHER_SEED`) whatever ``seed``; the targets are the
    teacher's outputs (squared error), their signs (binary cross-entropies) or their argmax (cross-entropies).
    A probability loss gets a final ``nn.Sigmoid`` / ``nn.Softmax`` in the model.
    """
    if loss_name not in RACE_LOSSES:
        raise ValueError(f"Unknown loss {loss_name!r}; choose one of {RACE_LOSSES}.")
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(_DTYPE)        # initialize in float64 whatever the caller's default (same numbers everywhere)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(TEACHER_SEED)
            teacher = mlp([2, 4, 3], "tanh")
            x = torch.randn(n_examples, 2, dtype=_DTYPE)
            with torch.no_grad():
                teacher_out = teacher(x)
            torch.manual_seed(seed)
            model = mlp([2, width, 3], "tanh")
    finally:
        torch.set_default_dtype(previous_dtype)
    if loss_name == "binary_cross_entropy":
        model.append(nn.Sigmoid())
    elif loss_name == "cross_entropy":
        model.append(nn.Softmax(dim=-1))
    if loss_name == "squared_error":
        y = teacher_out
    elif "binary" in loss_name:
        y = (teacher_out > 0).to(_DTYPE)
    else:
        y = teacher_out.argmax(1)
    return model, get_loss(loss_name), x, y


def _library_optimizer(method, model, loss, learning_rate, damping, kfac_samples, seed):
    """The K-FAC or ACP optimizer of :mod:`fso_lib.optim` as the race uses it (statistics every update)."""
    if method == "kfac":
        generator = torch.Generator().manual_seed(seed)

        def sampled_loss(output):
            return loss(output, loss.sample_target(output.detach(), generator))

        return KFAC(model, lr=learning_rate, damping=damping, momentum=0.0, loss=sampled_loss,
                    statistics_period=1, inverse_period=1, running_average=0.0)
    return ACP(model, lr=learning_rate, damping=damping, alpha=None, amortization_period=1,
               bias_update="derived", momentum=0.0)


def race_step(method: str, model: nn.Module, loss, x, y, learning_rate: float, damping: float,
              optimizer=None, kfac_samples: int = 4) -> None:
    """One full-batch update of ``model`` by ``method`` (a key of :data:`RACE_METHODS`), in place.

    K-FAC and ACP need the ``optimizer`` built for the run (:func:`race_run` builds it); K-FAC's statistics
    batch is ``x`` repeated ``kfac_samples`` times (that many sampled targets per example).
    """
    if method == "gd":
        _steps.apply_step(model, _steps.gradient_descent_step(_curvature.flat_gradient(model, loss, x, y), learning_rate))
    elif method in ("damped_newton", "gauss_newton", "natural_gradient"):
        kind = "newton" if method == "damped_newton" else method
        _steps.second_order_step(model, loss, x, y, kind, damping=damping, learning_rate=learning_rate)
    elif method in ("kfac", "acp"):
        if optimizer is None:
            raise ValueError(f"{method} needs the optimizer of its run (see race_run).")
        optimizer.update_statistics(x.repeat(kfac_samples, 1) if method == "kfac" else x)
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()
    else:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(RACE_METHODS)}.")


@dataclass(frozen=True)
class RaceRun:
    """The training loss before each update (``losses[0]`` at initialization), the parameter norms, the
    wall-clock time spent in the updates, and whether the run diverged."""

    method: str
    losses: tuple[float, ...]
    diverged: bool
    #: ``‖θ‖`` at the same points as ``losses``.
    parameter_norms: tuple[float, ...] = ()
    #: Seconds spent in the updates (``race_step``, loss evaluation excluded) before each point of ``losses``:
    #: ``seconds[0] = 0``. Measured once, when the run is computed (runs are cached).
    seconds: tuple[float, ...] = ()

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def race_run(method: str, loss_name: str, learning_rate: float, damping: float, n_steps: int,
             width: int = 6, n_examples: int = 64, seed: int = 0, kfac_samples: int = 4, cache: bool = True) -> RaceRun:
    """Train a fresh :func:`make_tiny_problem` student for ``n_steps`` updates of ``method``.

    Stops early, with ``diverged=True``, when the loss becomes non-finite or exceeds
    :data:`DIVERGENCE_FACTOR` times the initial loss, when a probability output saturates at exactly 0
    or 1 (the loss rejects it), or when the library optimizer raises a :class:`~fso_lib.optim.DivergenceError`.
    Results are cached (same arguments, same run); ``cache=False`` trains afresh (to time the updates again)
    and leaves the cache alone. Runs on one thread (the caller's setting is restored).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 39-parameter matrices: extra threads only contend (10× slower on a busy 2-core machine)
    try:
        run = _cached_run if cache else _cached_run.__wrapped__
        return run(method, loss_name, float(learning_rate), float(damping), int(n_steps), int(width),
                           int(n_examples), int(seed), int(kfac_samples))
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=4096)
def _cached_run(method, loss_name, learning_rate, damping, n_steps, width, n_examples, seed, kfac_samples):
    if method not in RACE_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(RACE_METHODS)}.")
    model, loss, x, y = make_tiny_problem(loss_name, width, n_examples, seed)
    optimizer = (_library_optimizer(method, model, loss, learning_rate, damping, kfac_samples, seed)
                 if method in ("kfac", "acp") else None)

    def current_loss():
        with torch.no_grad():
            return float(loss(model(x), y))

    losses, norms, seconds = [current_loss()], [float(_curvature.flat_parameters(model).norm())], [0.0]
    diverged = False
    for _ in range(n_steps):
        try:
            start = time.perf_counter()
            race_step(method, model, loss, x, y, learning_rate, damping, optimizer, kfac_samples)
            elapsed = time.perf_counter() - start
            value = current_loss()
        except (DivergenceError, torch.linalg.LinAlgError, ValueError):
            # ValueError: a probability loss saw outputs saturated at exactly 0 or 1 (an infinite loss)
            diverged = True
            break
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * losses[0]:
            diverged = True
            break
        losses.append(value)
        norms.append(float(_curvature.flat_parameters(model).norm()))
        seconds.append(seconds[-1] + elapsed)
    if optimizer is not None:
        optimizer.remove_hooks()
    return RaceRun(method, tuple(losses), diverged, tuple(norms), tuple(seconds))
