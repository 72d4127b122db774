"""Multilayer perceptrons and the MNIST deep autoencoder (thesis §1.4, §4.2).

Every network of the book is an ``nn.Sequential`` of ``nn.Linear`` layers and
element-wise activations, so that the curvature code (chapter 3) and the
layer-statistics hooks (chapter 6) can walk it layer by layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .initialization import linear_layers, variance_scaling_init_  # one-way: initialization imports no fso_lib module

#: Layer sizes of the deep autoencoder benchmark (Hinton & Salakhutdinov 2006; thesis §4.2).
AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.") from None


def mlp(
    sizes: Sequence[int],
    activation: str = "tanh",
    output_activation: str = "identity",
    linear_layers_without_activation: Sequence[int] = (),
) -> nn.Sequential:
    """An MLP ``Linear → activation → ... → Linear → output_activation``.

    ``sizes`` lists the widths from input to output. ``linear_layers_without_activation``
    holds indices of hidden layers whose activation is the identity (the autoencoder's
    30-unit code layer). Identity activations are not inserted as modules.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive integers, got {sizes}.")
    layers: list[nn.Module] = []
    n_layers = len(sizes) - 1
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        name = output_activation if index == n_layers - 1 else activation
        if index in linear_layers_without_activation:
            name = "identity"
        if name != "identity":
            layers.append(_activation(name))
    return nn.Sequential(*layers)


def glorot_uniform_init_(model: nn.Module, scale: float = 1.0, generator: torch.Generator | None = None) -> nn.Module:
    """Glorot/Xavier uniform weights (bound ``scale·sqrt(6 / (n_in + n_out))``), zero biases (thesis §2.4.2).

    ``scale`` is the factor the thesis tunes with its hyperparameter search; in the variance notation of
    :mod:`fso_lib.initialization` it is α = 2·scale².
    """
    return variance_scaling_init_(model, "glorot", alpha=2.0 * scale**2, generator=generator)


@torch.no_grad()
def sparse_init_(
    model: nn.Module, nonzero_per_unit: int = 15, scale: float = 1.0, generator: torch.Generator | None = None
) -> nn.Module:
    """Martens' (2010) sparse initialization: each unit gets ``nonzero_per_unit`` incoming
    weights drawn from N(0, scale²); all other weights and the biases are zero."""
    for layer in linear_layers(model):
        n_out, n_in = layer.weight.shape
        k = min(nonzero_per_unit, n_in)
        layer.weight.zero_()
        for unit in range(n_out):
            columns = torch.randperm(n_in, generator=generator)[:k]
            layer.weight[unit, columns] = scale * torch.randn(k, generator=generator, dtype=layer.weight.dtype)
        layer.bias.zero_()
    return model


def deep_autoencoder(
    sizes: Sequence[int] = AUTOENCODER_SIZES,
    init: str = "sparse",
    init_scale: float = 1.0,
    seed: int | None = None,
) -> nn.Sequential:
    """The MNIST deep autoencoder of thesis §4.2: sigmoid hidden units, a linear code
    layer in the middle, sigmoid outputs. ``init`` is ``"sparse"`` or ``"glorot"``."""
    sizes = list(sizes)
    code_layer = (len(sizes) - 1) // 2 - 1  # index of the Linear layer that outputs the code
    model = mlp(sizes, activation="sigmoid", output_activation="sigmoid", linear_layers_without_activation=(code_layer,))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if init == "sparse":
        sparse_init_(model, scale=init_scale, generator=generator)
    elif init == "glorot":
        glorot_uniform_init_(model, scale=init_scale, generator=generator)
    else:
        raise ValueError(f"Unknown init {init!r}: use 'sparse' (Martens 2010) or 'glorot'.")
    return model
