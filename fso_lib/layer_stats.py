"""Per-layer statistics of an MLP: the inputs h and the pre-activation gradients (thesis §6.1, §6.3).

Every method of chapter 6 looks at one ``nn.Linear`` layer ``a = W h + b`` at a time and needs two
quantities per example of a minibatch:

* the layer's input ``h`` (caught by a forward hook), and
* the gradient ``g = ∂L/∂a`` of the minibatch loss ``L`` with respect to the pre-activation ``a``
  (caught by a hook on the tensor ``a`` during the backward pass).

Scaling: for a loss averaged over the minibatch, ``L = (1/n) Σ_i l_i``, the captured row ``g_i`` is
``(1/n) ∇_{a_i} l_i``; the per-example gradient of the thesis is ``n · g_i``. With that, the gradient
of ``W`` computed by autograd is ``gᵀ h`` and the gradient of ``b`` is ``Σ_i g_i``.

:class:`LayerCapture` works on any network built from ``nn.Linear`` layers and parameter-free
modules (activations, ``Flatten``, ``Dropout``, nested ``nn.Sequential``); that covers
``fso_lib.models.mlp`` and ``fso_lib.models.deep_autoencoder``. A module that owns parameters and is
not an ``nn.Linear`` (a convolution, a batch norm...) makes it raise :class:`UnsupportedLayerError`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import UnsupportedLayerError

__all__ = [
    "UnsupportedLayerError",
    "LayerCapture",
    "supported_linear_layers",
    "input_mean",
    "input_covariance",
    "augmented_second_moment",
    "gradient_second_moment",
]


def supported_linear_layers(model: nn.Module, require_bias: bool = True, extra_supported: Sequence[type] = ()) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` in forward order, after checking that nothing else has parameters.

    Raises :class:`UnsupportedLayerError` naming the first module that owns parameters but is not an
    ``nn.Linear`` (or one of ``extra_supported``), or a linear layer without bias when ``require_bias``.
    """
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if require_bias and module.bias is None:
                raise UnsupportedLayerError(
                    f"Layer {name!r} is an nn.Linear without bias; the chapter-6 updates treat [W, b] together. "
                    "Build the layer with bias=True."
                )
            layers.append(module)
        elif isinstance(module, tuple(extra_supported)):
            continue
        elif any(True for _ in module.parameters(recurse=False)):
            raise UnsupportedLayerError(
                f"Layer {name or '<model>'!r} of type {type(module).__name__} has parameters, but only nn.Linear "
                "layers (with parameter-free activations in between) are supported by the layer statistics. "
                "Use an MLP from fso_lib.models, or a first-order optimizer (SGD, Adam) for this model."
            )
    if not layers:
        raise UnsupportedLayerError(f"The model {type(model).__name__} has no nn.Linear layer to precondition.")
    return layers


class LayerCapture:
    """Hooks that record, for each ``nn.Linear`` of ``model``, its input ``h`` and the gradient ``∂L/∂a``.

    After a forward pass, ``inputs[k]`` holds the (n, n_in) input of layer ``k``; after the backward
    pass, ``grads[k]`` holds the (n, n_out) gradient of the loss w.r.t. its pre-activation (see the
    module docstring for the 1/n scaling). Tensors are detached references, never copies, so the
    capture costs no arithmetic. Set ``enabled = False`` to skip capture (e.g. during evaluation),
    and call :meth:`remove` (or use ``with LayerCapture(model) as cap:``) to take the hooks off.
    """

    def __init__(self, model: nn.Module, inputs: bool = True, grads: bool = True, layers: Sequence[nn.Module] | None = None):
        self.layers = list(layers) if layers is not None else supported_linear_layers(model)
        self.capture_inputs = inputs
        self.capture_grads = grads
        self.enabled = True
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.grads: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [layer.register_forward_hook(self._forward_hook(k)) for k, layer in enumerate(self.layers)]

    def _forward_hook(self, k: int):
        def hook(module, args, output):
            if not self.enabled:
                return
            if self.capture_inputs:
                self.inputs[k] = args[0].detach()
            if self.capture_grads and output.requires_grad:
                def store(grad, k=k):
                    self.grads[k] = grad.detach()
                output.register_hook(store)
        return hook

    def clear(self) -> None:
        self.inputs = [None] * len(self.layers)
        self.grads = [None] * len(self.layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def missing(self, what: str = "inputs") -> list[int]:
        """Indices of layers whose ``inputs`` or ``grads`` were not captured yet."""
        values = self.inputs if what == "inputs" else self.grads
        return [k for k, v in enumerate(values) if v is None]


# ---------------------------------------------------------------------------------------------
# Statistics of one layer (thesis §6.1.1 and §6.3.2)
# ---------------------------------------------------------------------------------------------

def input_mean(h: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_i h_i``."""
    return h.mean(dim=0)


def input_covariance(h: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """``C = (1/n) Σ_i (h_i − h̄)(h_i − h̄)ᵀ (+ damping · I)``, the covariance of the layer input (eq. of §6.1.1).

    Note the 1/n (not 1/(n−1)) normalization, as in the thesis.
    """
    centered = h - h.mean(dim=0)
    cov = centered.T @ centered / h.shape[0]
    if damping:
        cov.diagonal().add_(damping)
    return cov


def augmented_second_moment(h: torch.Tensor) -> torch.Tensor:
    """``A = (1/n) Σ_i [h_i; 1][h_i; 1]ᵀ`` of shape (n_in+1, n_in+1), the forward factor of eq. 6.3.2."""
    ones = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
    augmented = torch.cat([h, ones], dim=1)
    return augmented.T @ augmented / h.shape[0]


def gradient_second_moment(per_example_grads: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_i g_i g_iᵀ`` for per-example gradients ``g_i`` w.r.t. the pre-activations (K-FAC's backward factor)."""
    return per_example_grads.T @ per_example_grads / per_example_grads.shape[0]
