"""The optimizers of chapter 6 and their baselines, behind one registry (thesis §6.4–6.6).

How a harness runs any of them (``x_stats`` is a separate minibatch of inputs, as in Algorithm 3)::

    from fso_lib.optim import OPTIMIZERS, prepare_model, make_optimizer, needs_statistics
    model = prepare_model(name, model)          # batch-norm variants: a copy with BN; NNN: whitened in place
    opt = make_optimizer(name, model, lr=...)   # hyperparameters: OPTIMIZERS[name].hyperparameters
    for x, y in batches:
        if needs_statistics(opt):               # False for SGD/Adam/centered GD/BN; every N updates otherwise
            opt.update_statistics(x_stats)      # forward pass (K-FAC: + backward with sampled targets)
        opt.zero_grad()
        loss = loss_fn(model(x), y)             # any scalar loss averaged over the minibatch
        loss.backward()
        opt.step()                              # raises DivergenceError on a non-finite update (check_every=1)

No host synchronization per step: build with ``make_optimizer(name, model, check_every=None)`` and call
``check_divergence(opt)`` at evaluation time (or every K updates): it raises :class:`DivergenceError` if a
non-finite update was skipped since the last check (parameters kept from before it), and is a no-op for
torch's optimizers. ``opt.diverged`` is the flag itself, a 0-dim bool tensor on the device.

ACP, K-FAC and centered GD form their updates from the captured layer inputs and pre-activation
gradients: they switch ``requires_grad`` off on the weights, so ``loss.backward()`` skips autograd's weight
GEMMs and ``W.grad`` stays ``None``. Pass ``weight_grads=True`` to keep it, or call ``opt.materialize_grads()``
between ``backward()`` and ``step()`` to fill it from the captured statistics.

K-FAC samples targets from the model's output distribution: pass ``loss="squared_error"`` (the default,
``mean_i ‖f_i − y_i‖²``), ``"bernoulli"`` (outputs are probabilities in [0, 1]) or ``"softmax_cross_entropy"`` (outputs are logits),
matching the training loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..normalization import MeanOnlyBatchNorm1d, with_batch_norm
from .acp import ACP, BIAS_UPDATES, acp_product_order
from .base import DivergenceError, LayerwiseOptimizer, check_divergence, damped_inverse, needs_statistics
from .centered import CenteredSGD
from .inverse import INVERSE_FORMS, CovarianceInverse, inverse_form
from .kfac import KFAC, SAMPLED_LOSSES, kfac_product_order
from .natural import NaturalNeuralNetwork, WhitenedLinear, whiten_model
from .ekfac import EKFAC
from .shampoo import GRAFTINGS, SOAP, Shampoo

__all__ = [
    "ACP", "KFAC", "CenteredSGD", "NaturalNeuralNetwork", "WhitenedLinear", "whiten_model",
    "DivergenceError", "LayerwiseOptimizer", "damped_inverse", "needs_statistics", "check_divergence",
    "acp_product_order", "kfac_product_order", "CovarianceInverse", "INVERSE_FORMS", "inverse_form",
    "OptimizerSpec", "OPTIMIZERS", "make_optimizer", "prepare_model", "BIAS_UPDATES", "SAMPLED_LOSSES",
    "EKFAC", "Shampoo", "SOAP", "GRAFTINGS",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of :data:`OPTIMIZERS`.

    ``defaults`` were picked by a short grid search (150 updates of a 784-128-32-128-784 sigmoid autoencoder
    on the 1,000-image MNIST sample, minibatch 100): a starting point, not tuned for the full benchmark.
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    defaults: dict
    hyperparameters: dict = field(default_factory=dict)  # name → meaning
    thesis: str = ""
    model_variant: str | None = None  # None, "batchnorm", "mean_only_batchnorm" or "whitened"
    uses_statistics: bool = False


def _sgd(model, lr=0.1, momentum=0.0, check_every=None):
    # check_every is accepted for a uniform call (torch's optimizers have no divergence flag: nothing to check)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _adam(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, check_every=None):
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)


_LR = "learning rate"
OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("sgd", _sgd, dict(lr=0.1, momentum=0.0), {"lr": _LR, "momentum": "heavy ball"}, "§2.2"),
        OptimizerSpec("sgd_momentum", _sgd, dict(lr=0.05, momentum=0.9), {"lr": _LR, "momentum": "heavy ball"}, "§2.2"),
        OptimizerSpec("adam", _adam, dict(lr=1e-3), {"lr": _LR, "betas": "moment decay rates", "eps": "denominator floor"},
                      "Kingma & Ba 2014 (not run in the thesis)"),
        OptimizerSpec("centered_gd", CenteredSGD, dict(lr=0.1, momentum=0.0), {"lr": _LR, "momentum": "heavy ball"},
                      "§6.4.1, Algorithm 2"),
        OptimizerSpec("batchnorm", _sgd, dict(lr=0.1, momentum=0.0), {"lr": _LR, "momentum": "heavy ball"},
                      "§6.6 (Ioffe & Szegedy 2015)", model_variant="batchnorm"),
        OptimizerSpec("mean_only_batchnorm", _sgd, dict(lr=0.1, momentum=0.0), {"lr": _LR, "momentum": "heavy ball"},
                      "§6.6 (Salimans & Kingma 2016)", model_variant="mean_only_batchnorm"),
        OptimizerSpec(
            "acp", ACP, dict(lr=0.1, damping=1e-2, alpha=None, amortization_period=100, bias_update="derived"),
            {"lr": _LR, "damping": "Tikhonov ε (covariance damped by ε/α)", "alpha": "None: max squared gradient heuristic",
             "inverse_form": "'auto', 'dense' or 'woodbury' (fso_lib.optim.inverse)",
             "amortization_period": "N, updates between statistics/inverses", "bias_update": "'derived' (eq. 6.3.4) or 'printed'",
             "momentum": "heavy ball (0 in the thesis)"},
            "§6.4.2, Algorithm 3", uses_statistics=True),
        OptimizerSpec(
            "acp_fixed_alpha", ACP, dict(lr=0.3, damping=0.03, alpha=1.0, amortization_period=100, bias_update="derived"),
            {"lr": _LR, "damping": "Tikhonov ε (covariance damped by ε/α)", "alpha": "fixed α",
             "inverse_form": "'auto', 'dense' or 'woodbury'",
             "amortization_period": "N", "bias_update": "'derived' or 'printed'", "momentum": "heavy ball"},
            "§6.4.2, Algorithm 3 (fixed α)", uses_statistics=True),
        OptimizerSpec(
            "kfac", KFAC, dict(lr=0.03, damping=0.1, momentum=0.9, statistics_period=10, inverse_period=100),
            {"lr": _LR, "damping": "Tikhonov ε, factored as γ = √ε with the π correction", "momentum": "heavy ball",
             "loss": f"sampled loss: one of {sorted(SAMPLED_LOSSES)} or a callable", "statistics_period": "updates between factor estimates",
             "inverse_period": "updates between inversions", "running_average": "weight of the past factors",
             "kl_clip": "None or the bound on lr²·⟨Δ, ∇⟩ (with step_rule='quadratic_model': on δᵀFδ)",
             "step_rule": "'fixed' (lr, momentum) or 'quadratic_model' (α, μ from the exact-Fisher model, M&G §7)",
             "damping_adaptation": "Levenberg–Marquardt rule on ε from the reduction ratio ρ (M&G §6.5)",
             "damping_adaptation_period": "T₁, updates between measurements of ρ",
             "damping_bounds": "(lowest, highest) adapted ε", "damped_rho": "ρ from the damped model (default: undamped)",
             "quadratic_model_examples": "None or the number of minibatch examples the exact Fisher is estimated on"},
            "§6.5.1 (Martens & Grosse 2015)", uses_statistics=True),
        OptimizerSpec(
            "natural_nn", NaturalNeuralNetwork, dict(lr=0.1, damping=0.1, amortization_period=100, momentum=0.0),
            {"lr": _LR, "damping": "ε added to the covariance before U = C^(-1/2)", "amortization_period": "N, updates between re-whitenings",
             "momentum": "heavy ball"},
            "§6.5.2 (Desjardins et al. 2015)", model_variant="whitened", uses_statistics=True),
        OptimizerSpec(
            "natural_nn_implicit", lambda model, **hp: NaturalNeuralNetwork(model, whitened_layers=False, **hp),
            dict(lr=0.1, damping=0.1, amortization_period=100, momentum=0.0),
            {"lr": _LR, "damping": "ε added to the covariance before its inverse", "amortization_period": "N, updates between re-whitenings",
             "momentum": "heavy ball", "inverse_form": "'auto', 'dense' or 'woodbury' (fso_lib.optim.inverse)"},
            "§6.5.2 (Desjardins et al. 2015), whitening implicit: the updates of natural_nn on plain nn.Linear layers",
            uses_statistics=True),
        # after the thesis (issue 14): defaults picked by a short probe instead (100 updates of the deep autoencoder,
        # sparse init, on the 1,000-image sample, minibatch 100, one thread; a few values of lr and ε/eps each,
        # final training error compared; EKFAC: lr ∈ {0.01, 0.03, 0.1, 0.3} × ε ∈ {1e-4 ... 1}, best ε = 1; Shampoo
        # (60 updates): Adam grafting with lr 3e-3 beat lr 1e-3 and no grafting; SOAP: lr ∈ {1e-3, 3e-3, 1e-2}, the
        # best at the top of that range, so its default may be low)
        OptimizerSpec(
            "ekfac", EKFAC, dict(lr=0.03, damping=1.0, momentum=0.9, statistics_period=10, eigenbasis_period=100,
                                 scale_period=10),
            {"lr": _LR, "damping": "ε added to the eigenbasis second moments s", "momentum": "heavy ball",
             "loss": f"sampled loss: one of {sorted(SAMPLED_LOSSES)} or a callable",
             "statistics_period": "updates between statistics passes (A, G)",
             "eigenbasis_period": "updates between eigendecompositions of A and G",
             "scale_period": "updates between re-estimates of s", "running_average": "weight of the past A, G and s",
             "kl_clip": "None or the bound on lr²·⟨Δ, ∇⟩"},
            "George et al. 2018 (after the thesis; K-FAC of §6.5.1 in its eigenbasis)", uses_statistics=True),
        OptimizerSpec(
            "shampoo", Shampoo, dict(lr=3e-3, damping=1e-4, momentum=0.9, factor_decay=0.95, root_period=10,
                                     grafting="adam"),
            {"lr": _LR, "damping": "ε added to L and R before the −1/4 powers", "momentum": "heavy ball",
             "factor_decay": "β of the exponential averages of L, R (None: sums)", "root_period": "updates between roots",
             "grafting": f"one of {GRAFTINGS}: the layer-wise norm of that method's step"},
            "Gupta, Koren & Singer 2018 (after the thesis)"),
        OptimizerSpec(
            "soap", SOAP, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, factor_decay=0.95, eigenbasis_period=10),
            {"lr": _LR, "betas": "Adam's β₁, β₂ in the rotated coordinates", "eps": "Adam's ε",
             "factor_decay": "β of the exponential averages of L, R", "eigenbasis_period": "updates between eigenbases"},
            "Vyas et al. 2024 (after the thesis)"),
    ]
}


def prepare_model(name: str, model: nn.Module) -> nn.Module:
    """The model that optimizer ``name`` trains: a batch-norm copy, the model whitened in place, or ``model`` itself."""
    spec = _spec(name)
    if spec.model_variant == "batchnorm":
        return with_batch_norm(model, kind="full")
    if spec.model_variant == "mean_only_batchnorm":
        return with_batch_norm(model, kind="mean_only")
    if spec.model_variant == "whitened":
        return whiten_model(model)
    return model


def make_optimizer(name: str, model: nn.Module, **hyperparameters) -> torch.optim.Optimizer:
    """Build optimizer ``name`` of :data:`OPTIMIZERS` for ``model`` (already passed through :func:`prepare_model`).

    ``hyperparameters`` override ``OPTIMIZERS[name].defaults``; unknown names raise a ``TypeError``.
    ``check_every`` (see :class:`LayerwiseOptimizer`) is accepted by every entry, so that a runner can build
    any method with ``check_every=None`` and call :func:`check_divergence` itself (a no-op for SGD and Adam).
    """
    spec = _spec(name)
    if spec.model_variant in ("batchnorm", "mean_only_batchnorm"):
        kind = nn.BatchNorm1d if spec.model_variant == "batchnorm" else MeanOnlyBatchNorm1d
        if not any(isinstance(m, kind) for m in model.modules()):
            raise ValueError(f"{name!r} trains a batch-normalized model: call model = prepare_model({name!r}, model) first.")
    return spec.build(model, **{**spec.defaults, **hyperparameters})


def _spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.") from None
