"""The exact-Fisher quadratic model of the loss on one minibatch (Martens & Grosse 2015, §6.4–§7; thesis §3.2, §6.5.1).

K-FAC proposes a direction from its *approximate* Fisher; Martens & Grosse judge and scale it with the
*exact* Fisher ``F`` of the current minibatch, through the quadratic model of the change of the loss

    M(δ) − M(0) = ½ δᵀ (F + ε I) δ + ∇ᵀδ,      F = (1/n) Σ_i J_iᵀ D_i J_i,

where ``J_i = ∂f(x_i)/∂θ`` is the Jacobian of the network's output for example ``i``, ``D_i`` the Fisher of the
predictive distribution in output space (:mod:`fso_lib.losses`, thesis Table 3.II), ``∇`` the minibatch
gradient and ``ε`` the damping (``ε = 0``: the undamped model).

Only quadratic forms ``uᵀ F v = (1/n) Σ_i (J_i u)ᵀ D_i (J_i v)`` are needed, so every direction costs one
forward-mode Jacobian-vector product (``torch.func.jvp``) and no backward pass; the directions of one
update share one call (``vmap`` over the tangents). :meth:`MinibatchQuadraticModel.fisher_vector_product`
(a JVP then a VJP) gives the full product ``F v`` for checks.

On top of these Gram matrices: :func:`model_change` (``M`` at ``δ = Σ_j c_j v_j``), :func:`minimizing_coefficients`
(the ``c`` that minimizes it: Martens & Grosse's §7 choice of learning rate and momentum, on the device, no
host read), :func:`reduction_ratio` (``ρ``) and :func:`levenberg_marquardt_damping` (their §6.5 rule).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from ..losses import Loss

__all__ = [
    "OUTPUT_FISHER_PRODUCTS",
    "output_fisher_product",
    "MinibatchQuadraticModel",
    "model_change",
    "minimizing_coefficients",
    "reduction_ratio",
    "levenberg_marquardt_damping",
]


def _squared_error_fisher(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    # l = ‖f − y‖² is −log N(y; f, ½ I) + const: D = 2 I
    return 2.0 * vectors


def _bernoulli_fisher(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    # outputs are probabilities p: D = diag(1 / (p (1 − p))), p clamped as the K-FAC sampler does
    p = output.clamp(1e-7, 1 - 1e-7)
    return vectors / (p * (1 - p))


def _softmax_fisher(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    # outputs are logits z, p = softmax(z): D = diag(p) − p pᵀ
    p = torch.softmax(output, dim=-1)
    return p * vectors - p * (p * vectors).sum(dim=-1, keepdim=True)


#: Output-space Fisher products ``D_i v_i`` for the losses K-FAC samples (the names of ``SAMPLED_LOSSES``).
OUTPUT_FISHER_PRODUCTS = {
    "squared_error": _squared_error_fisher,
    "bernoulli": _bernoulli_fisher,
    "softmax_cross_entropy": _softmax_fisher,
}


def output_fisher_product(loss):
    """``(output, vectors) -> D v`` for ``loss``: a name of :data:`OUTPUT_FISHER_PRODUCTS` or a
    :class:`fso_lib.losses.Loss` (its ``fisher_output_product``). Anything else raises ``TypeError``."""
    if isinstance(loss, str):
        try:
            return OUTPUT_FISHER_PRODUCTS[loss]
        except KeyError:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {sorted(OUTPUT_FISHER_PRODUCTS)}.") from None
    if isinstance(loss, Loss):
        return loss.fisher_output_product
    raise TypeError("The exact-Fisher quadratic model needs the output Fisher D of the loss: pass a loss name "
                    f"({sorted(OUTPUT_FISHER_PRODUCTS)}) or a fso_lib.losses.Loss, not {type(loss).__name__}.")


@contextlib.contextmanager
def _forward_mode_quietly():
    """torch loads its forward-mode decompositions through ``torch.jit.script`` on the first JVP, which warns
    that ``torch.jit.script`` is deprecated: a message about torch's internals, not about this code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        yield


class MinibatchQuadraticModel:
    """``M(δ) − M(0) = ½ δᵀ(F + εI)δ + ∇ᵀδ`` of ``model`` on the minibatch ``inputs`` (Martens & Grosse §6.4).

    ``gradient`` and every direction are dicts ``parameter name → tensor`` over the same names (a subset
    of ``model.named_parameters()``; the other parameters are held fixed). ``parameters`` gives the point
    ``θ`` (default: the model's current values). ``loss`` names the output Fisher ``D``
    (:func:`output_fisher_product`). Forward hooks of ``model`` fire during the JVPs: switch off any that
    must not see these passes.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, gradient: Mapping[str, torch.Tensor], loss="squared_error",
                 parameters: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self.inputs = inputs
        self.gradient = dict(gradient)
        self.names = list(self.gradient)
        if parameters is None:
            named = dict(model.named_parameters())
            parameters = {name: named[name].detach() for name in self.names}
        self.parameters = {name: parameters[name] for name in self.names}
        self.fisher_product = output_fisher_product(loss)

    def _forward(self, parameters):
        out = functional_call(self.model, parameters, (self.inputs,))
        return out.unsqueeze(1) if out.dim() == 1 else out

    def _stack(self, directions):
        return {name: torch.stack([d[name] for d in directions]) for name in self.names}

    def output_jvps(self, directions: Sequence[Mapping[str, torch.Tensor]], stacked=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, Jv)``: the outputs ``(n, k)`` at ``θ`` and ``J v_j`` for each direction, ``(m, n, k)``."""
        stacked = self._stack(directions) if stacked is None else stacked
        with torch.no_grad(), _forward_mode_quietly():
            output, products = vmap(lambda tangent: jvp(self._forward, (self.parameters,), (tangent,)),
                                    out_dims=(None, 0))(stacked)
        return output, products

    def fisher_gram(self, directions: Sequence[Mapping[str, torch.Tensor]], stacked=None) -> torch.Tensor:
        """``[v_aᵀ F v_b]``, ``(m, m)``, from one JVP per direction."""
        output, products = self.output_jvps(directions, stacked)
        weighted = torch.stack([self.fisher_product(output, p) for p in products])
        return torch.einsum("ank,bnk->ab", products, weighted) / output.shape[0]

    def euclidean_gram(self, directions: Sequence[Mapping[str, torch.Tensor]],
                       weights: Mapping[str, float] | None = None, stacked=None) -> torch.Tensor:
        """``[Σ_p w_p ⟨v_a[p], v_b[p]⟩]``, ``(m, m)``: the damping's part of the Gram matrix (``w_p = 1`` by default)."""
        stacked = self._stack(directions) if stacked is None else stacked
        total = 0
        for name in self.names:
            flat = stacked[name].reshape(len(directions), -1)
            total = total + (weights or {}).get(name, 1.0) * (flat @ flat.T)
        return total

    def gradient_dots(self, directions: Sequence[Mapping[str, torch.Tensor]], stacked=None) -> torch.Tensor:
        """``[∇ᵀ v_j]``, ``(m,)``."""
        stacked = self._stack(directions) if stacked is None else stacked
        return sum(stacked[name].reshape(len(directions), -1) @ self.gradient[name].reshape(-1) for name in self.names)

    def gram_matrices(self, directions: Sequence[Mapping[str, torch.Tensor]],
                      weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(G_F, G_I, b)``: :meth:`fisher_gram`, :meth:`euclidean_gram` and :meth:`gradient_dots` of the same
        directions, stacked once."""
        stacked = self._stack(directions)
        return (self.fisher_gram(directions, stacked), self.euclidean_gram(directions, weights, stacked),
                self.gradient_dots(directions, stacked))

    def change(self, delta: Mapping[str, torch.Tensor], damping: float = 0.0) -> torch.Tensor:
        """``M(δ) − M(0) = ½ δᵀ(F + εI)δ + ∇ᵀδ`` (0-dim tensor)."""
        gram = self.fisher_gram([delta]) + damping * self.euclidean_gram([delta])
        return 0.5 * gram[0, 0] + self.gradient_dots([delta])[0]

    def fisher_vector_product(self, vector: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``F v = (1/n) Σ_i J_iᵀ D_i J_i v`` as a dict (a JVP, then a VJP)."""
        with _forward_mode_quietly():
            output, forward_product = jvp(self._forward, (self.parameters,), ({n: vector[n] for n in self.names},))
        _, pullback = vjp(self._forward, self.parameters)
        return pullback(self.fisher_product(output.detach(), forward_product) / output.shape[0])[0]


def model_change(coefficients: torch.Tensor, fisher_gram: torch.Tensor, euclidean_gram: torch.Tensor,
                 gradient_dots: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """``M(δ) − M(0)`` at ``δ = Σ_j c_j v_j`` from the Gram matrices of the ``v_j``: ``½ cᵀ(G_F + ε G_I)c + bᵀc``."""
    gram = fisher_gram + damping * euclidean_gram
    return 0.5 * coefficients @ gram @ coefficients + gradient_dots @ coefficients


def minimizing_coefficients(fisher_gram: torch.Tensor, euclidean_gram: torch.Tensor, gradient_dots: torch.Tensor,
                            damping: float) -> torch.Tensor:
    """The ``c`` minimizing ``M(Σ_j c_j v_j)`` for one or two directions: ``(G_F + ε G_I) c = −b``.

    With two directions ``(Δ, δ₀)`` this is Martens & Grosse's §7 choice ``δ = α Δ + μ δ₀`` (learning rate α,
    momentum μ). Solved in closed form on the device (no host read); when the two directions are parallel to
    working precision (``det ≤ 10⁻¹⁰ · Q₀₀ Q₁₁``) the second coefficient is 0 and the first is the line minimizer
    ``−b₀ / Q₀₀``; a zero first direction gives 0.
    """
    gram = fisher_gram + damping * euclidean_gram
    q00 = gram[0, 0]
    safe_q00 = torch.where(q00 > 0, q00, torch.ones_like(q00))
    alpha_line = torch.where(q00 > 0, -gradient_dots[0] / safe_q00, torch.zeros_like(q00))
    if gram.shape[0] == 1:
        return alpha_line.reshape(1)
    q01, q11 = gram[0, 1], gram[1, 1]
    det = q00 * q11 - q01 * q01
    solvable = det > 1e-10 * q00 * q11
    safe_det = torch.where(solvable, det, torch.ones_like(det))
    b0, b1 = gradient_dots[0], gradient_dots[1]
    alpha = torch.where(solvable, (-b0 * q11 + b1 * q01) / safe_det, alpha_line)
    mu = torch.where(solvable, (-b1 * q00 + b0 * q01) / safe_det, torch.zeros_like(det))
    return torch.stack([alpha, mu])


def reduction_ratio(loss_before, loss_after, predicted_change) -> torch.Tensor:
    """``ρ = (L(θ + δ) − L(θ)) / (M(δ) − M(0))``: how much of the predicted decrease the step delivered."""
    return (torch.as_tensor(loss_after) - torch.as_tensor(loss_before)) / torch.as_tensor(predicted_change)


def levenberg_marquardt_damping(damping: float, rho: float, period: int, bounds: tuple[float, float],
                                predicted_decrease: bool = True) -> float:
    """Martens & Grosse's §6.5 rule, applied every ``period`` (T₁) updates with ``ω₁ = (19/20)^T₁``:
    ``ρ > 3/4`` ⇒ ``ε ← ω₁ ε``; ``ρ < 1/4`` ⇒ ``ε ← ε / ω₁``; otherwise unchanged; then clamped to ``bounds``.

    A model that predicted no decrease (``predicted_decrease=False``) or a non-finite ``ρ`` counts as ``ρ < 1/4``.
    """
    omega = (19.0 / 20.0) ** period
    if not predicted_decrease or not math.isfinite(rho):
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    elif rho < 0.25:
        damping = damping / omega
    low, high = bounds
    return min(max(damping, low), high)
