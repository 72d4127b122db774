"""Batch normalization baselines as model variants (thesis §6.6; Ioffe & Szegedy 2015; Salimans & Kingma 2016).

:func:`with_batch_norm` copies an MLP from :mod:`fso_lib.models` and inserts a normalization layer
after every ``nn.Linear`` except the last one (the output layer stays as it is):

* ``kind="full"``: ``nn.BatchNorm1d`` (centre and scale by the minibatch statistics, learned γ, β);
* ``kind="mean_only"``: :class:`MeanOnlyBatchNorm1d` (subtract the minibatch mean only, learned bias),
  the *forward* counterpart of centered gradient descent (§6.4.1).

The linear layer before a normalization keeps its weights but loses its bias (the normalization's
own shift replaces it), so the network computes the same function as the original at
initialization up to the normalization itself. Train these variants with plain SGD (or any
first-order optimizer); the chapter-6 preconditioners refuse them (their layer statistics cover
``nn.Linear`` only).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .models import deep_autoencoder

__all__ = ["MeanOnlyBatchNorm1d", "with_batch_norm", "batch_norm_autoencoder", "NORMALIZATIONS"]

NORMALIZATIONS = ("full", "mean_only")


class MeanOnlyBatchNorm1d(nn.Module):
    """``y = x − mean_batch(x) + β``; in evaluation mode the running mean replaces the batch mean."""

    def __init__(self, num_features: int, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        else:
            mean = self.running_mean
        return x - mean + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


def _normalization(kind: str, n: int) -> nn.Module:
    if kind == "full":
        return nn.BatchNorm1d(n)
    if kind == "mean_only":
        return MeanOnlyBatchNorm1d(n)
    raise ValueError(f"Unknown normalization {kind!r}; choose one of {NORMALIZATIONS}.")


@torch.no_grad()
def with_batch_norm(model: nn.Sequential, kind: str = "full") -> nn.Sequential:
    """A copy of the MLP ``model`` with a normalization after each hidden ``nn.Linear`` (see module docstring)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError("with_batch_norm expects an nn.Sequential MLP such as fso_lib.models.mlp(...).")
    linear_positions = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    if not linear_positions:
        raise ValueError("The model has no nn.Linear layer.")
    last = linear_positions[-1]
    layers: list[nn.Module] = []
    for i, module in enumerate(model):
        if isinstance(module, nn.Linear) and i != last:
            linear = nn.Linear(module.in_features, module.out_features, bias=False).to(module.weight)
            linear.weight.copy_(module.weight)
            layers += [linear, _normalization(kind, module.out_features).to(module.weight)]
        elif isinstance(module, (nn.BatchNorm1d, MeanOnlyBatchNorm1d)):
            raise ValueError("The model already holds a batch normalization layer.")
        else:
            layers.append(copy.deepcopy(module))
    return nn.Sequential(*layers)


def batch_norm_autoencoder(kind: str = "full", **autoencoder_kwargs) -> nn.Sequential:
    """The deep autoencoder of §4.2 (``fso_lib.models.deep_autoencoder(**autoencoder_kwargs)``) with batch norm."""
    return with_batch_norm(deep_autoencoder(**autoencoder_kwargs), kind=kind)
