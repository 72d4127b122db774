"""Glorot and He initializations with the scale α treated as a hyperparameter (thesis §2.4.2).

Both draw each weight from a uniform distribution of variance

* Glorot: ``α / (n_in + n_out)`` (Glorot & Bengio's own choice is α = 2),
* He:     ``α / n_in``          (He et al.'s choice for ReLU is α = 2),

and set the biases to zero. The thesis tunes α with its hyperparameter search instead of fixing it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SCHEMES", "linear_layers", "weight_variance", "variance_scaling_init_"]

SCHEMES = ("glorot", "he")


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` in forward order (also exported by :mod:`fso_lib.models`)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def weight_variance(n_in: int, n_out: int, scheme: str = "glorot", alpha: float = 2.0) -> float:
    """The variance of each weight of an ``n_in → n_out`` layer under ``scheme`` (thesis §2.4.2)."""
    if scheme == "glorot":
        return alpha / (n_in + n_out)
    if scheme == "he":
        return alpha / n_in
    raise ValueError(f"Unknown scheme {scheme!r}; choose one of {SCHEMES}.")


@torch.no_grad()
def variance_scaling_init_(model: nn.Module, scheme: str = "glorot", alpha: float = 2.0,
                           generator: torch.Generator | None = None) -> nn.Module:
    """Uniform weights of variance :func:`weight_variance`, zero biases, for every ``nn.Linear``.

    A uniform law on ``[-r, r]`` has variance ``r² / 3``, so ``r = sqrt(3 · variance)``.
    """
    for layer in linear_layers(model):
        variance = weight_variance(layer.in_features, layer.out_features, scheme, alpha)
        bound = math.sqrt(3.0 * variance)
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    return model
