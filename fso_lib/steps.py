"""Second-order update directions for small problems (thesis §3.1.1–3.1.5, §3.2.2).

Every function takes a gradient ``g`` (a flat vector) and a curvature matrix, and returns the step
``Δθ`` to *add* to the parameters. :func:`second_order_step` does the whole thing on a model: curvature
from :mod:`fso_lib.curvature`, step, and (optionally) the update of the parameters.

================================  ===================================================  ===========
function                          step                                                 thesis
================================  ===================================================  ===========
:func:`gradient_descent_step`     ``−η g``                                             §3.1.2
:func:`newton_step`               ``−H⁻¹ g``                                           eq. 3.1.1
:func:`damped_newton_step`        ``−(H + ε I)⁻¹ g`` (Tikhonov)                        §3.1.3
:func:`gauss_newton_step`         ``−(G + ε I)⁻¹ g``                                   §3.1.4
:func:`natural_gradient_step`     ``−(κF + I/η)⁻¹ g`` (KL weight κ, learning rate η)   §3.2.2
:func:`block_diagonal_step`       each layer's block solved alone                      §3.1.5
================================  ===================================================  ===========

The thesis prints the natural-gradient solution of §3.2.2 without its minus sign, and writes λ for the
weight of the KL term and ε for the inverse learning rate. In the book's notation (κ the KL weight, η the
learning rate) the minimizer of ``Δθᵀ g + (1/(2η))‖Δθ‖² + (κ/2) Δθᵀ F Δθ`` is
``−(κF + I/η)⁻¹ g = −(1/κ)(F + ε I)⁻¹ g`` with the damping ``ε = 1/(ηκ)``.

:func:`linearized_problem_iterates` solves the problem of thesis §3.3.3 exactly: linearize the network,
keep the loss, add ``(ε/2)‖Δ‖²``; its first Newton iterate is the damped Gauss-Newton step.
"""
from __future__ import annotations

import torch
from torch import nn

from . import curvature as _curvature
from .curvature import ParameterLayout

__all__ = [
    "gradient_descent_step",
    "newton_step",
    "damped_newton_step",
    "gauss_newton_step",
    "natural_gradient_step",
    "block_diagonal_step",
    "linearized_problem_iterates",
    "lecun_learning_rate",
    "quadratic_model",
    "second_order_step",
    "apply_step",
    "STEP_METHODS",
]


def _solve(matrix: torch.Tensor, gradient: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    if matrix.shape != (gradient.shape[0], gradient.shape[0]):
        raise ValueError(f"Curvature {tuple(matrix.shape)} does not match gradient {tuple(gradient.shape)}.")
    if damping:
        matrix = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.solve(matrix, gradient)


def gradient_descent_step(gradient: torch.Tensor, learning_rate: float) -> torch.Tensor:
    """``−η g``: the minimizer of ``gᵀΔ + (1/(2η))‖Δ‖²`` (thesis §3.1.2, with ``λ = 1/η``)."""
    return -learning_rate * gradient


def newton_step(gradient: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``−H⁻¹ g``, the minimizer of the quadratic model when ``H`` is positive definite (thesis eq. 3.1.1).

    When ``H`` has negative eigenvalues this is the *stationary point* of the quadratic model, which can
    be a saddle or a maximum: plain Newton then moves uphill along those directions.
    """
    return -_solve(hessian, gradient)


def damped_newton_step(gradient: torch.Tensor, hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``−(H + ε I)⁻¹ g``: minimizer of ``gᵀΔ + ½ Δᵀ H Δ + (ε/2)‖Δ‖²`` (Tikhonov damping, thesis §3.1.3)."""
    return -_solve(hessian, gradient, damping)


def gauss_newton_step(gradient: torch.Tensor, gauss_newton: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """``−(G + ε I)⁻¹ g`` with the Gauss-Newton matrix ``G`` in place of ``H`` (thesis §3.1.4, §3.3.3)."""
    return -_solve(gauss_newton, gradient, damping)


def natural_gradient_step(gradient: torch.Tensor, fisher: torch.Tensor, kl_weight: float = 1.0,
                          inverse_lr: float = 0.0) -> torch.Tensor:
    """``−(κF + (1/η) I)⁻¹ g``: minimizer of ``Δᵀg + (1/(2η))‖Δ‖² + (κ/2) Δᵀ F Δ`` (thesis §3.2.2).

    ``kl_weight`` ``κ`` penalizes the change of the distribution (its KL, to second order), ``inverse_lr``
    ``1/η`` the change of the parameters; the step is ``−(1/κ)(F + ε I)⁻¹ g`` with damping ``ε = 1/(ηκ)``.
    ``κ = 0`` gives gradient descent with learning rate ``η``.
    """
    if kl_weight == 0:
        if inverse_lr <= 0:
            raise ValueError("kl_weight = 0 needs inverse_lr > 0 (gradient descent with learning rate 1/inverse_lr).")
        return -gradient / inverse_lr
    return -_solve(fisher, gradient, inverse_lr / kl_weight) / kl_weight


def block_diagonal_step(
    gradient: torch.Tensor, matrix: torch.Tensor, layout: ParameterLayout, damping: float = 0.0, by: str = "layer"
) -> torch.Tensor:
    """``−(B + ε I)⁻¹ g`` with ``B`` the per-layer block-diagonal part of ``matrix``: each block is solved
    on its own, never forming the full inverse (thesis §3.1.5)."""
    step = torch.empty_like(gradient)
    for sl in layout.block_slices(by):
        step[sl] = -_solve(matrix[sl, sl], gradient[sl], damping)
    return step


def linearized_problem_iterates(
    model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, damping: float, n_iterations: int = 10,
) -> list[torch.Tensor]:
    """Newton's method on ``R_lin(Δ) + (ε/2)‖Δ‖²``, the loss of the network linearized at ``θ`` (thesis §3.3.3).

    Returns ``[Δ_0 = 0, Δ_1, ..., Δ_n]``. The Hessian of ``R_lin`` at ``Δ`` is ``(1/n) Σ_i J_iᵀ (∂²l/∂f²)(f_i + J_i Δ) J_i``,
    so ``Δ_1`` is the damped Gauss-Newton step ``−(G + εI)⁻¹ ∇R``. For the squared error ``R_lin`` is quadratic and
    ``Δ_1`` is already its minimizer; for a convex loss of the outputs (the cross-entropies on logits) the
    iterates converge to the minimizer of the linearized problem, which then differs from the GN step.
    """
    zero = _curvature.flat_parameters(model) * 0

    def objective(delta):
        return _curvature.linearized_risk(model, loss, x, y, delta) + 0.5 * damping * delta @ delta

    iterates = [zero]
    for _ in range(n_iterations):
        delta = iterates[-1]
        gradient = torch.func.grad(objective)(delta)
        hessian = torch.func.hessian(objective)(delta)
        iterates.append(delta - torch.linalg.solve(hessian, gradient))
    return iterates


def lecun_learning_rate(hessian: torch.Tensor) -> float:
    """``1/λ_max(H)``: the learning rate of LeCun et al. (1993) discussed in thesis §3.1.2.

    Along the top eigenvector it lands on the minimum of the quadratic model in one step; any rate
    above ``2/λ_max`` makes gradient descent diverge on a quadratic.
    """
    return 1.0 / float(torch.linalg.eigvalsh(hessian).max())


def quadratic_model(value: float, gradient: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``f + gᵀΔ + ½ ΔᵀHΔ``: the second-order Taylor model of thesis §3.1.1."""
    return value + gradient @ step + 0.5 * step @ hessian @ step


#: ``method`` names of :func:`second_order_step` and the curvature each one uses.
STEP_METHODS = {
    "newton": "hessian",
    "gauss_newton": "gauss_newton",
    "natural_gradient": "fisher",
    "empirical_fisher": "empirical_fisher",
}


@torch.no_grad()
def apply_step(model: nn.Module, step: torch.Tensor) -> None:
    """``θ ← θ + Δθ`` for a flat step in the :func:`~fso_lib.curvature.parameter_layout` order."""
    _curvature.set_flat_parameters(model, _curvature.flat_parameters(model) + step.to(next(model.parameters()).dtype))


def second_order_step(
    model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, method: str = "newton", damping: float = 0.0,
    structure: str = "full", learning_rate: float = 1.0, update: bool = True,
) -> torch.Tensor:
    """One damped step ``−η (C + ε I)⁻¹ ∇R`` on a small model, ``C`` chosen by ``method`` (see
    :data:`STEP_METHODS`) and ``structure`` (``'full'`` or ``'block_diagonal'``). Returns the step;
    applies it to the parameters when ``update``."""
    try:
        kind = STEP_METHODS[method]
    except KeyError:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(STEP_METHODS)}.") from None
    gradient = _curvature.flat_gradient(model, loss, x, y)
    matrix = _curvature.curvature_matrix(model, loss, x, y, kind=kind)
    if structure == "full":
        step = -_solve(matrix, gradient, damping)
    elif structure == "block_diagonal":
        step = block_diagonal_step(gradient, matrix, _curvature.parameter_layout(model), damping)
    else:
        raise ValueError(f"structure must be 'full' or 'block_diagonal', got {structure!r}.")
    step = learning_rate * step
    if update:
        apply_step(model, step)
    return step
