"""Natural Neural Networks (Desjardins et al. 2015; thesis §6.5.2): whitened layers and their optimizer."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..layer_stats import UnsupportedLayerError
from .acp import centered_preconditioned_update
from .base import DivergenceError, LayerwiseOptimizer
from .inverse import INVERSE_FORMS, CovarianceInverse
from .quadratic_model import QuadraticModelSteps

__all__ = ["WhitenedLinear", "whiten_model", "NaturalNeuralNetwork"]


class WhitenedLinear(nn.Module):
    """``a = V U (h − μ) + d`` (Thesis §6.5.2).

    ``V`` (n_out × n_in) and ``d`` are the trained parameters; ``U`` (a symmetric inverse square root
    of the input covariance) and ``μ`` (the input mean) are buffers, re-estimated by
    :meth:`rewhiten`, which re-solves ``V`` and ``d`` so that the layer computes the same function.
    Built from an ``nn.Linear`` with ``U = I``, ``μ = 0``, ``V = W``, ``d = b``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.V = nn.Parameter(torch.empty(out_features, in_features))
        self.d = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("U", torch.eye(in_features))
        self.register_buffer("mu", torch.zeros(in_features))
        nn.init.xavier_uniform_(self.V)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "WhitenedLinear":
        layer = cls(linear.in_features, linear.out_features).to(linear.weight)
        layer.V.copy_(linear.weight)
        if linear.bias is not None:
            layer.d.copy_(linear.bias)
        return layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h - self.mu, self.U), self.V, self.d)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``W = V U`` of the equivalent ``a = W h + b``."""
        return self.V @ self.U

    @torch.no_grad()
    def effective_bias(self) -> torch.Tensor:
        """``b = d − V U μ``."""
        return self.d - self.V @ (self.U @ self.mu)

    @torch.no_grad()
    def rewhiten(self, h: torch.Tensor, damping: float) -> None:
        """Re-estimate ``μ`` and ``U = (C + damping·I)^(−1/2)`` from inputs ``h``; re-solve ``V``, ``d``.

        With ``W = V U`` and ``b = d − W μ`` the current function, the new parameters are
        ``V' = W U'⁻¹`` and ``d' = b + W μ'``, so that ``V' U' (h − μ') + d' = W h + b``.
        """
        weight, bias = self.effective_weight(), self.effective_bias()
        mean = h.mean(dim=0)
        centered = (h - mean).double()
        cov = centered.T @ centered / h.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp_min(0) + damping
        if not bool(torch.isfinite(eigenvalues).all()):
            raise DivergenceError("Natural neural network: the input covariance is not finite; try a smaller learning rate.")
        root = eigenvalues.sqrt()
        u = (eigenvectors / root) @ eigenvectors.T
        u_inverse = (eigenvectors * root) @ eigenvectors.T
        self.U.copy_(u)
        self.mu.copy_(mean)
        self.V.copy_(weight.double() @ u_inverse)
        self.d.copy_(bias + weight @ mean)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def whiten_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` by an equivalent :class:`WhitenedLinear`; return ``model``.

    Idempotent: a model that already holds whitened layers is returned unchanged.
    """
    if isinstance(model, nn.Linear):
        raise UnsupportedLayerError("whiten_model needs a container (e.g. nn.Sequential) holding the nn.Linear layers.")
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, WhitenedLinear.from_linear(child))
        elif isinstance(child, WhitenedLinear):
            continue
        else:
            if any(True for _ in child.parameters(recurse=False)):
                raise UnsupportedLayerError(
                    f"Layer {name!r} of type {type(child).__name__} has parameters; natural neural networks here "
                    "support only nn.Linear layers with parameter-free activations in between."
                )
            whiten_model(child)
    return model


class NaturalNeuralNetwork(QuadraticModelSteps, LayerwiseOptimizer):
    """Projected natural gradient descent on whitened layers (Desjardins et al. 2015; Thesis §6.5.2).

    ``whitened_layers=True`` (default): the model's ``nn.Linear`` layers are replaced **in place** by
    :class:`WhitenedLinear` layers (:func:`whiten_model`); plain gradient descent (optionally with momentum)
    then trains ``V`` and ``d``. Every ``amortization_period`` updates, :meth:`update_statistics` runs a forward
    pass on a separate minibatch and re-whitens each layer (``U``, ``μ`` from that minibatch, ``V``, ``d``
    re-solved so that the network function does not change). Because the whitened input has zero mean and
    identity covariance, a gradient step on ``V`` is a step preconditioned by ``C⁻¹`` on the equivalent ``W``.

    ``whitened_layers=False``: the same training, with the whitening implicit. The model keeps its
    ``nn.Linear`` layers and the optimizer applies to ``W = V U`` and ``b = d − W μ`` the step that gradient
    descent on ``V``, ``d`` would make. With ``g = ∂L/∂a`` and ``U² = (C + εI)⁻¹``::

        ΔW = gᵀ (h − μ) (C + εI)⁻¹,    Δb = Σ_i g_i − ΔW μ

    (heavy-ball buffers map the same way, and are reset at every re-whitening as in the whitened form).
    The layers then cost what a plain layer costs in the forward and backward passes (the whitened layer
    adds a GEMM to each), autograd forms no weight gradient (``weight_grads``, as for ACP), and the
    inverse is applied in dense or Woodbury form (``inverse_form``, :mod:`fso_lib.optim.inverse`). This is
    ACP's update with α = 1, the statistics minibatch's mean μ in place of the training minibatch's, and
    ε added to the covariance.

    Hyperparameters: ``lr``; ``damping`` (ε added to the covariance before its inverse square root);
    ``amortization_period`` (N); ``momentum``. ``check_every``: see :class:`~fso_lib.optim.base.LayerwiseOptimizer`.

    With ``whitened_layers=False``, Martens & Grosse's options too
    (:class:`~fso_lib.optim.quadratic_model.QuadraticModelSteps`, off by default): ``step_rule="quadratic_model"``
    (the step scaled and combined with the previous one by the exact-Fisher model; ``lr``, ``momentum`` ignored),
    ``damping_adaptation`` (Levenberg–Marquardt on ε, which reaches the inverse at the next re-whitening), ``loss``.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-2, amortization_period: int = 100,
                 momentum: float = 0.0, check_finite: bool = True, check_every: int | None = 1,
                 whitened_layers: bool = True, weight_grads: bool = False, inverse_form: str = "auto",
                 loss="squared_error", step_rule: str = "fixed", damping_adaptation: bool = False,
                 damping_adaptation_period: int = 5, damping_bounds: tuple[float, float] = (1e-6, 1e4),
                 damped_rho: bool = False, quadratic_model_examples: int | None = None):
        if damping <= 0:
            raise ValueError("damping must be positive")
        if inverse_form not in INVERSE_FORMS:
            raise ValueError(f"inverse_form must be one of {INVERSE_FORMS}, got {inverse_form!r}")
        self.whitened_layers = bool(whitened_layers)
        if self.whitened_layers:
            whiten_model(model)
            # the update is the gradient of V, which autograd forms: nothing to capture
            self.capture_inputs = self.capture_grads = self.forms_weight_gradient = False
        elif any(isinstance(m, WhitenedLinear) for m in model.modules()):
            raise UnsupportedLayerError(
                "whitened_layers=False trains a model of plain nn.Linear layers, but this model holds WhitenedLinear "
                "layers: pass the model before whiten_model, or use whitened_layers=True.")
        else:
            self.capture_inputs = self.capture_grads = self.forms_weight_gradient = True
        self.inverse_form = inverse_form
        super().__init__(model, dict(lr=lr, damping=damping, momentum=momentum), check_finite=check_finite,
                         check_every=check_every, weight_grads=weight_grads)
        self.amortization_period = int(amortization_period)
        self._init_quadratic_model(loss, step_rule, damping_adaptation, damping_adaptation_period, damping_bounds,
                                   damped_rho, quadratic_model_examples)

    def _find_layers(self, model):
        if not self.whitened_layers:
            return super()._find_layers(model)
        layers = [m for m in model.modules() if isinstance(m, WhitenedLinear)]
        if not layers:
            raise UnsupportedLayerError("The model has no layer to whiten.")
        return layers

    def _layer_params(self, layer):
        return [layer.V, layer.d] if self.whitened_layers else [layer.weight, layer.bias]

    def needs_statistics(self) -> bool:
        return self.n_updates % self.amortization_period == 0

    @torch.no_grad()
    def _collect_statistics(self, x):
        if self.whitened_layers:
            self._rewhiten(x)
        else:
            self._store_whitening(x)
        # the momentum buffers live in the old coordinates: reset them
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop("momentum_buffer", None)

    def _rewhiten(self, x):
        inputs = {}
        handles = [
            layer.register_forward_hook(lambda m, args, out, k=k: inputs.__setitem__(k, args[0]))
            for k, layer in enumerate(self.layers)
        ]
        try:
            self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        # re-whitening preserves every layer's function, so one forward pass gives all the inputs
        for k, layer in enumerate(self.layers):
            layer.rewhiten(inputs[k], self.param_groups[k]["damping"])

    def _store_whitening(self, x):
        """μ and (C + εI)⁻¹ of every layer's input on the statistics minibatch ``x`` (implicit whitening)."""
        self.capture.clear()
        self.model(x)
        for k, (group, layer, h) in enumerate(zip(self.param_groups, self.layers, self.capture.inputs)):
            if not bool(torch.isfinite(h).all()):  # one host read per layer and re-whitening, not per step
                raise DivergenceError(
                    f"Natural neural network: the input of layer {k} on the statistics minibatch is not finite "
                    "(inf or NaN in the minibatch, or the parameters blew up); try a smaller learning rate.")
            state = self.state[layer.weight]
            mean = h.mean(dim=0)
            inverse = CovarianceInverse.from_centered(h - mean, group["damping"], form=self.inverse_form,
                                                      what=f"input covariance of layer {k}")
            state["mean"] = mean
            state.update(inverse.to_state())

    def _layer_update(self, k, group, h, g):
        if self.whitened_layers:
            v, d = group["params"]
            # the step is the gradient itself: no copy (a skipped, non-finite step zeroes these .grad in place)
            return v.grad, d.grad
        weight, bias = group["params"]
        state = self.state[weight]
        if "mean" not in state:  # no statistics yet: U = I and μ = 0, plain gradient descent
            return self._weight_gradient(group, h, g), bias.grad.clone()
        # gradient descent on V, d seen on W = VU, b = d − Wμ: ACP's update with α = 1 and the statistics mean μ
        return centered_preconditioned_update(state, h, g, state["mean"], bias.grad,
                                              weight.grad if self.weight_grads else None)
