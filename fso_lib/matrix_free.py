"""Curvature-vector products of one minibatch, prepared once (thesis §3.1.1, §3.1.4).

:mod:`fso_lib.curvature` already offers ``hessian_vector_product`` and ``gauss_newton_vector_product``;
each call checks its inputs again (one extra forward pass). A solver that applies the curvature many
times to the *same* minibatch — the conjugate gradient of Hessian-free optimization (Martens 2010) —
checks once and then only multiplies. :class:`CurvatureProducts` is that object, and what notebook 03c
times: its products cost exactly the differentiation they need, nothing else.

* ``gradient()``: ``∇_θ R``, one forward and one backward pass.
* ``hessian_vector_product(v)``: ``H v`` by forward-mode differentiation of the gradient
  (Pearlmutter 1994): the gradient computation carried along the direction ``v``.
* ``gauss_newton_vector_product(v)``: ``G_GN v = (1/n) Σ_i J_iᵀ (∂²l/∂f²)_i (J_i v)``: ``J v`` by one
  forward-mode pass, the output Hessian of the loss, then ``Jᵀ(·)`` by one backward pass (Schraudolph 2002).

Parameter order: that of :func:`fso_lib.curvature.parameter_layout`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from .curvature import flat_parameters, parameter_layout
from .losses import Loss

__all__ = ["CurvatureProducts"]


class CurvatureProducts:
    """Gradient, ``H v`` and ``G_GN v`` of ``R(θ) = (1/n) Σ_i l(f(x_i, θ), y_i)`` at the model's current ``θ``.

    The parameters are read once, at construction: later changes to the model are not seen.
    """

    def __init__(self, model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor):
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be a loss of fso_lib.losses (it knows its output Hessian); got {type(loss).__name__}.")
        self.layout = parameter_layout(model)
        self.theta = flat_parameters(model)
        self.loss, self.x, self.y = loss, x, y
        self.n_examples = x.shape[0]
        layout = self.layout

        def outputs(flat: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, layout.unflatten(flat), (x,))
            return out.unsqueeze(1) if out.dim() == 1 else out

        self._outputs = outputs
        self._risk = lambda flat: loss.value(outputs(flat), y)
        with torch.no_grad():
            value = self._risk(self.theta)
        if not bool(torch.isfinite(value)):
            raise ValueError(f"The risk at the current parameters is {float(value)}: check the minibatch and the model.")

    def _vector(self, vector: torch.Tensor) -> torch.Tensor:
        if vector.shape != self.theta.shape:
            raise ValueError(f"Expected a vector of {self.theta.numel()} entries (one per parameter), got shape {tuple(vector.shape)}.")
        return vector.to(dtype=self.theta.dtype, device=self.theta.device)

    def risk(self) -> torch.Tensor:
        """``R(θ)``, the minibatch loss."""
        with torch.no_grad():
            return self._risk(self.theta)

    def gradient(self) -> torch.Tensor:
        """``∇_θ R`` as a flat vector."""
        return grad(self._risk)(self.theta)

    def hessian_vector_product(self, vector: torch.Tensor) -> torch.Tensor:
        """``H v``: the directional derivative of the gradient along ``v`` (forward over reverse)."""
        return jvp(grad(self._risk), (self.theta,), (self._vector(vector),))[1]

    def gauss_newton_vector_product(self, vector: torch.Tensor) -> torch.Tensor:
        """``G_GN v = (1/n) Σ_i J_iᵀ (∂²l/∂f²)_i J_i v`` (``J v`` forward, then ``Jᵀ u`` backward)."""
        outputs, jv = jvp(self._outputs, (self.theta,), (self._vector(vector),))
        middle = self.loss.output_hessian_product(outputs.detach(), self.y, jv) / self.n_examples
        _, pullback = vjp(self._outputs, self.theta)
        return pullback(middle)[0]
