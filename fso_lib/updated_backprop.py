"""Updating the backpropagated gradient while the parameters change (thesis chapter 5).

Backpropagation meets the layers from the top down. The prototype of thesis §5.1 applies a layer's
gradient step *before* backpropagating through it, and corrects the signal sent to the layer below so
that it approximates the gradient the lower layers would see after the update (§5.2). For a layer
``a = W h + b``, ``h⁺ = f(a)``, with ``g = ∂l/∂h⁺`` and ``D = diag f'(a)``, to first order in
``(ΔW, Δb)`` and with ``Δa = ΔW h + Δb``::

    ∂l/∂h (W + ΔW, b + Δb) ≈ Wᵀ D g                       (plain backpropagation)
                           + ΔWᵀ D g                      (W appears explicitly)
                           + Wᵀ D (∂²l/∂h⁺²) D Δa         (the signal g itself moves)
                           [+ Wᵀ diag(f''(a) ∘ g) Δa]     (D moves: dropped by the thesis)

The thesis keeps the first three lines. ``keep_activation_curvature=True`` keeps the fourth as well,
which makes the correction exact to first order (the error then shrinks like the square of the step).

Rows are examples: ``h`` is ``(n, n_in)``, ``W`` is ``(n_out, n_in)``, so ``Wᵀ D g`` is ``(f'(a) * g) @ W``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "ACTIVATION_DERIVATIVES",
    "layer_structure",
    "forward_pass",
    "updated_input_gradient",
    "UpdatedBackprop",
    "layerwise_gradient_step",
]


def _sigmoid_derivatives(a):
    s = torch.sigmoid(a)
    d1 = s * (1 - s)
    return d1, d1 * (1 - 2 * s)


def _tanh_derivatives(a):
    t = torch.tanh(a)
    d1 = 1 - t * t
    return d1, -2 * t * d1


def _relu_derivatives(a):
    return (a > 0).to(a.dtype), torch.zeros_like(a)


def _identity_derivatives(a):
    return torch.ones_like(a), torch.zeros_like(a)


def _softplus_derivatives(a):
    s = torch.sigmoid(a)
    return s, s * (1 - s)


#: ``name -> (f, a ↦ (f'(a), f''(a)))`` for the activations the prototype understands.
ACTIVATION_DERIVATIVES = {
    "sigmoid": (torch.sigmoid, _sigmoid_derivatives),
    "tanh": (torch.tanh, _tanh_derivatives),
    "relu": (torch.relu, _relu_derivatives),
    "identity": (lambda a: a, _identity_derivatives),
    "softplus": (nn.functional.softplus, _softplus_derivatives),
}
_MODULE_NAMES = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu", nn.Identity: "identity"}


def layer_structure(model: nn.Sequential) -> list[tuple[nn.Linear, str]]:
    """``[(linear, activation name), ...]`` for a ``Sequential`` of ``Linear`` layers and activations."""
    layers: list[tuple[nn.Linear, str]] = []
    for module in model:
        if isinstance(module, nn.Linear):
            layers.append((module, "identity"))
            continue
        if isinstance(module, nn.Softplus) and module.beta == 1:
            name = "softplus"
        else:
            name = _MODULE_NAMES.get(type(module))
        if name is None or not layers or layers[-1][1] != "identity":
            raise ValueError(f"Updated backpropagation needs Linear → activation pairs; cannot handle {module}.")
        layers[-1] = (layers[-1][0], name)
    if not layers:
        raise ValueError("The model holds no nn.Linear layer.")
    return layers


@torch.no_grad()
def forward_pass(layers, inputs: torch.Tensor):
    """Inputs ``h_0 .. h_L`` and pre-activations ``a_0 .. a_{L-1}`` of every layer (thesis §2.1.2)."""
    hs, pre = [inputs], []
    for linear, name in layers:
        a = hs[-1] @ linear.weight.T + linear.bias
        pre.append(a)
        hs.append(ACTIVATION_DERIVATIVES[name][0](a))
    return hs, pre


def updated_input_gradient(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    preactivation: torch.Tensor,
    activation: str,
    grad_output: torch.Tensor,
    delta_weight: torch.Tensor,
    delta_bias: torch.Tensor,
    output_hvp: Callable[[torch.Tensor], torch.Tensor] | None,
    keep_activation_curvature: bool = False,
) -> torch.Tensor:
    """``∂l/∂h`` of one layer after its update ``(ΔW, Δb)``, to first order (thesis §5.2).

    ``weight`` is ``W`` *before* the update, ``grad_output`` is ``g = ∂l/∂h⁺`` and ``output_hvp(v)``
    multiplies by ``∂²l/∂h⁺²`` (``None``: leave that term out). Returns an ``(n, n_in)`` tensor.
    """
    d1, d2 = ACTIVATION_DERIVATIVES[activation][1](preactivation)
    grad_pre = d1 * grad_output
    signal = grad_pre @ weight + grad_pre @ delta_weight           # Wᵀ D g + ΔWᵀ D g
    delta_pre = inputs @ delta_weight.T + delta_bias               # Δa = ΔW h + Δb
    inner = torch.zeros_like(delta_pre)
    if output_hvp is not None:
        inner = inner + d1 * output_hvp(d1 * delta_pre)            # D (∂²l/∂h⁺²) D Δa
    if keep_activation_curvature:
        inner = inner + d2 * grad_output * delta_pre               # diag(f''(a) ∘ g) Δa
    return signal + inner @ weight


class UpdatedBackprop:
    """Gradient descent that updates each layer before backpropagating through it (thesis §5.1-§5.2).

    ``opt = UpdatedBackprop(model, loss_fn, lr)``, then ``loss = opt.step(x, y)`` does one forward pass
    and one top-down sweep: at each layer, take the gradient step, then send the corrected signal
    (:func:`updated_input_gradient`) to the layer below. ``∂²l/∂h⁺²`` is applied through the layers above
    with their current weights and the activations of the forward pass (a Hessian-vector product in the
    manner of Pearlmutter; without the ``f''`` terms, i.e. Gauss-Newton, unless
    ``keep_activation_curvature``). ``correction=False`` gives plain SGD through the same code.

    After each step, ``last_gradients`` holds the ``(∂l/∂W, ∂l/∂b)`` used by each layer and
    ``last_signal_ratios`` the ratio ``‖corrected signal‖ / ‖plain signal‖`` sent below each layer.
    """

    def __init__(self, model: nn.Sequential, loss_fn: Callable, lr: float,
                 keep_activation_curvature: bool = False, correction: bool = True):
        self.model = model
        self.layers = layer_structure(model)
        self.loss_fn = loss_fn
        self.lr = lr
        self.keep_activation_curvature = keep_activation_curvature
        self.correction = correction
        self.last_gradients: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_signal_ratios: list[float] = []

    def _curvature_product(self, first: int, v, hs, pre, signals, loss_hvp):
        """``∂²l/∂h_first² · v``: forward perturbation through layers ``first..L-1``, loss Hessian, back."""
        perturbations = []
        for k in range(first, len(self.layers)):
            linear, name = self.layers[k]
            r = v @ linear.weight.T
            perturbations.append(r)
            v = ACTIVATION_DERIVATIVES[name][1](pre[k])[0] * r
        w = loss_hvp(v)
        for k in reversed(range(first, len(self.layers))):
            linear, name = self.layers[k]
            d1, d2 = ACTIVATION_DERIVATIVES[name][1](pre[k])
            w_pre = d1 * w
            if self.keep_activation_curvature:
                w_pre = w_pre + d2 * signals[k + 1] * perturbations[k - first]
            w = w_pre @ linear.weight
        return w

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        hs, pre = forward_pass(self.layers, inputs)
        output = hs[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(output, targets)
            (grad_output,) = torch.autograd.grad(loss, output, create_graph=True)

        def loss_hvp(v):
            return torch.autograd.grad(grad_output, output, v, retain_graph=True)[0]

        n_layers = len(self.layers)
        signals: list[torch.Tensor | None] = [None] * (n_layers + 1)  # signals[k] = ∂l/∂h_k used
        signals[n_layers] = grad_output.detach()
        self.last_gradients = [None] * n_layers
        self.last_signal_ratios = [1.0] * n_layers
        with torch.no_grad():
            for k in reversed(range(n_layers)):
                linear, name = self.layers[k]
                g = signals[k + 1]
                grad_pre = ACTIVATION_DERIVATIVES[name][1](pre[k])[0] * g
                grad_weight, grad_bias = grad_pre.T @ hs[k], grad_pre.sum(0)
                self.last_gradients[k] = (grad_weight, grad_bias)
                delta_weight, delta_bias = -self.lr * grad_weight, -self.lr * grad_bias
                if k > 0:
                    plain = grad_pre @ linear.weight
                    if self.correction:
                        def hvp(v, first=k + 1):
                            return self._curvature_product(first, v, hs, pre, signals, loss_hvp)

                        signals[k] = updated_input_gradient(
                            linear.weight, hs[k], pre[k], name, g, delta_weight, delta_bias,
                            hvp, self.keep_activation_curvature)
                        self.last_signal_ratios[k] = float(signals[k].norm() / plain.norm().clamp_min(1e-30))
                    else:
                        signals[k] = plain
                linear.weight.add_(delta_weight)
                linear.bias.add_(delta_bias)
        return float(loss.detach())


def layerwise_gradient_step(model: nn.Sequential, loss_fn: Callable, inputs: torch.Tensor,
                            targets: torch.Tensor, lr: float):
    """The exact reference of §5.1: update the layers one at a time from the top, recomputing the
    whole forward and backward pass before each (``L`` passes). Returns the gradients used."""
    layers = layer_structure(model)
    used = [None] * len(layers)
    for k in reversed(range(len(layers))):
        linear = layers[k][0]
        loss = loss_fn(model(inputs), targets)
        grad_weight, grad_bias = torch.autograd.grad(loss, [linear.weight, linear.bias])
        used[k] = (grad_weight, grad_bias)
        with torch.no_grad():
            linear.weight.sub_(lr * grad_weight)
            linear.bias.sub_(lr * grad_bias)
    return used
