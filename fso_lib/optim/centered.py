"""Centered gradient descent (thesis §6.4.1, Algorithm 2)."""
from __future__ import annotations

import torch
from torch import nn

from .base import LayerwiseOptimizer
from .low_rank import LowRankDirection

__all__ = ["CenteredSGD"]


class CenteredSGD(LayerwiseOptimizer):
    """Gradient descent with the weight gradient taken on centered inputs (Thesis §6.4.1, Algorithm 2).

    ``ΔW = (1/n) Σ_i ∇_{a_i} l (h_i − h̄)ᵀ`` and ``Δb = (1/n) Σ_i ∇_{a_i} l``, with ``h̄`` the minibatch
    mean of the layer input: the weight update of ACP (eq. 6.3.3) without the inverse covariance.
    By default (``weight_grads=False``) autograd does not form ``W.grad``: the update is ``gᵀ (h − h̄)``
    from the captured ``h`` and ``∂L/∂a`` (the same GEMM autograd would do, on centered inputs). With
    ``weight_grads=True``, ``Σ_i g_i (h_i − h̄)ᵀ = ∇_W − ∇_b h̄ᵀ`` is one rank-one correction of
    autograd's gradient. ``materialize_grads()``, ``check_every``: see
    :class:`~fso_lib.optim.base.LayerwiseOptimizer`.

    Hyperparameters: ``lr`` (η; the thesis writes λ), ``momentum`` (heavy ball, 0 in the thesis).
    """

    forms_weight_gradient = True

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.0, check_finite: bool = True,
                 weight_grads: bool = False, check_every: int | None = 1):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(model, dict(lr=lr, momentum=momentum), check_finite=check_finite,
                         weight_grads=weight_grads, check_every=check_every)

    def _layer_update(self, k, group, h, g):
        weight, bias = group["params"]
        mean = h.mean(dim=0)
        if self.weight_grads:
            return torch.addr(weight.grad, bias.grad, mean, alpha=-1.0), bias.grad.clone()
        return LowRankDirection(g, h - mean), bias.grad.clone()  # gᵀ(h − h̄), added to W without being formed
