"""Reference computations shared by several test modules (imported as a plain module: pytest puts tests/ on the path)."""
from __future__ import annotations

import copy

import pytest
import torch

from fso_lib.models import linear_layers


def mean_squared_error(model, x, y):
    """‖f(x) − y‖² summed over outputs, averaged over examples: the loss the optimizers' checks train on."""
    return ((model(x) - y) ** 2).sum(dim=1).mean()


def layer_inputs_and_gradients(model, x, y):
    """Each linear layer's input h and per-example ∇_a l (= n · ∂L/∂a, L the averaged loss) for
    :func:`mean_squared_error` on (x, y), by hooks on a copy of ``model`` (the copy must not feed an optimizer's
    capture hooks, so its forward hooks are cleared)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for module in model.modules():
        module._forward_hooks.clear()
    hs, gs = [], []
    for layer in linear_layers(model):
        def hook(m, args, out):
            hs.append(args[0].detach())
            out.register_hook(lambda g: gs.append(g.detach() * x.shape[0]))
        layer.register_forward_hook(hook)
    mean_squared_error(model, x, y).backward()
    return hs, gs[::-1]


def assert_quadratic_model_step(delta, proposal, previous, gradient, curvature, alpha, mu):
    """The step ``delta`` is Martens & Grosse's ``α Δ + μ δ₀`` (Δ = ``proposal``, δ₀ = ``previous`` or None on the first
    step) with (α, μ) minimizing ½δᵀ(curvature)δ + gradientᵀδ: the line minimizer with μ = 0 on the first step, the
    2×2 normal equations afterwards."""
    if previous is None:
        assert mu == 0
        assert alpha == pytest.approx(float(-(gradient @ proposal) / (proposal @ curvature @ proposal)), rel=1e-9)
        assert torch.allclose(delta, alpha * proposal, rtol=1e-9, atol=1e-13)
    else:
        assert torch.allclose(delta, alpha * proposal + mu * previous, rtol=1e-9, atol=1e-13)
        directions = torch.stack([proposal, previous])
        coefficients = torch.tensor([alpha, mu], dtype=directions.dtype)
        assert torch.allclose((directions @ curvature @ directions.T) @ coefficients, -(directions @ gradient),
                              rtol=1e-8, atol=1e-13)
