"""One function, several parametrizations: gradient descent notices, natural gradient does not
(thesis §3.2.2; Amari 1998; Martens 2014).

The model is a tiny regression network ``f(x) = w₂ᵀ tanh(W₁ x + b₁) + b₂`` with 2 inputs and
``hidden`` tanh units, trained on ``l = ½‖f − y‖²`` (a unit-variance Gaussian, so the Fisher is
``F = (1/n) Σ_i J_iᵀ J_i``). Its *standard* parameter vector is ``θ = [vec_rows(W₁), b₁, w₂, b₂]``.

A :class:`Parametrization` describes the same family of functions with other coordinates ``θ'``
through a map ``θ = φ(θ')``. Gradient descent in ``θ'`` is not gradient descent in ``θ`` (the
gradient transforms with ``φ'ᵀ``, the step should transform with ``φ'``); the natural gradient
``(F' + εI)⁻¹ ∇_{θ'} R`` transforms as a step does when ``ε → 0``, because ``F' = φ'ᵀ F φ'``:

* for a *linear* ``φ`` (input scaling, ``W₁' = W₁ S⁻¹`` on inputs ``S x``) undamped natural-gradient steps are
  the same steps, exactly;
* for a *nonlinear* ``φ`` (the first layer's weight vectors in polar coordinates) they agree to first
  order: after one step of size ``η`` the two functions differ by ``O(η²)``, against ``O(η)`` for
  gradient descent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, jacrev

__all__ = [
    "N_INPUTS",
    "parameter_count",
    "network_outputs",
    "Parametrization",
    "standard_parametrization",
    "scaled_input_parametrization",
    "polar_first_layer_parametrization",
    "RegressionProblem",
    "make_regression_problem",
    "fisher_matrix",
    "training_path",
    "function_distance",
    "one_step_distance",
    "fitted_slope",
]

#: Inputs of the tiny network (two, so that the first layer's weight vectors live in the plane).
N_INPUTS = 2


def parameter_count(hidden: int) -> int:
    """``2·hidden`` weights and ``hidden`` biases in the first layer, ``hidden + 1`` in the output layer."""
    return (N_INPUTS + 2) * hidden + 1


def _split(theta: torch.Tensor, hidden: int):
    w1 = theta[: N_INPUTS * hidden].reshape(hidden, N_INPUTS)
    b1 = theta[N_INPUTS * hidden: (N_INPUTS + 1) * hidden]
    w2 = theta[(N_INPUTS + 1) * hidden: (N_INPUTS + 2) * hidden]
    return w1, b1, w2, theta[-1]


def network_outputs(theta: torch.Tensor, x: torch.Tensor, hidden: int) -> torch.Tensor:
    """``f(x_i)`` for every row of ``x`` (shape ``(n,)``), standard parameters ``θ``."""
    w1, b1, w2, b2 = _split(theta, hidden)
    return torch.tanh(x @ w1.T + b1) @ w2 + b2


@dataclass(frozen=True)
class Parametrization:
    """Coordinates ``θ'`` of the same functions: ``to_standard(θ') = θ`` and its inverse ``from_standard``."""

    name: str
    to_standard: Callable[[torch.Tensor], torch.Tensor]
    from_standard: Callable[[torch.Tensor], torch.Tensor]
    linear: bool


def standard_parametrization() -> Parametrization:
    """``θ' = θ``."""
    return Parametrization("standard", lambda t: t, lambda t: t, linear=True)


def scaled_input_parametrization(scales, hidden: int) -> Parametrization:
    """The network reads ``S x`` with ``S = diag(scales)``; its first layer ``W₁' = W₁ S⁻¹`` keeps the function
    (``W₁' S x = W₁ x``). A linear change of coordinates: the inputs measured in other units."""
    scales = torch.as_tensor(scales, dtype=torch.float64)
    if scales.shape != (N_INPUTS,) or not bool((scales > 0).all()):
        raise ValueError(f"scales must be {N_INPUTS} positive numbers, got {scales.tolist()}.")
    column_scale = torch.cat([scales.repeat(hidden), torch.ones(2 * hidden + 1, dtype=torch.float64)])

    return Parametrization(f"inputs scaled by {tuple(round(float(s), 3) for s in scales)}",
                           lambda t: t * column_scale.to(t.dtype), lambda t: t / column_scale.to(t.dtype), linear=True)


def polar_first_layer_parametrization(hidden: int) -> Parametrization:
    """Each hidden unit's weight vector ``w = e^ρ (cos φ, sin φ)`` in log-radius and angle (a weight-norm-like
    split into length and direction). A nonlinear change of coordinates (defined where ``w ≠ 0``)."""
    n_w = N_INPUTS * hidden

    def to_standard(t: torch.Tensor) -> torch.Tensor:
        log_radius, angle = t[0:n_w:2], t[1:n_w:2]
        radius = torch.exp(log_radius)
        w1 = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).reshape(-1)
        return torch.cat([w1, t[n_w:]])

    def from_standard(t: torch.Tensor) -> torch.Tensor:
        w1 = t[:n_w].reshape(hidden, N_INPUTS)
        polar = torch.stack([torch.log(torch.linalg.vector_norm(w1, dim=1)), torch.atan2(w1[:, 1], w1[:, 0])], dim=1)
        return torch.cat([polar.reshape(-1), t[n_w:]])

    return Parametrization("first layer in polar coordinates", to_standard, from_standard, linear=False)


@dataclass(frozen=True)
class RegressionProblem:
    """Inputs ``x`` (n, 2), targets ``y`` (n,), the starting parameters ``theta0`` (standard) and ``hidden``."""

    x: torch.Tensor
    y: torch.Tensor
    theta0: torch.Tensor
    hidden: int


def make_regression_problem(n_examples: int = 32, hidden: int = 3, seed: int = 0) -> RegressionProblem:
    """A teacher network of the same shape labels Gaussian inputs (plus a little noise); the student starts
    from other random weights. float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_examples, N_INPUTS, generator=generator, dtype=torch.float64)
    teacher = torch.randn(parameter_count(hidden), generator=generator, dtype=torch.float64)
    y = network_outputs(teacher, x, hidden) + 0.05 * torch.randn(n_examples, generator=generator, dtype=torch.float64)
    theta0 = 0.7 * torch.randn(parameter_count(hidden), generator=generator, dtype=torch.float64)
    return RegressionProblem(x, y, theta0, hidden)


def _risk(problem: RegressionProblem, parametrization: Parametrization):
    def risk(theta_prime: torch.Tensor) -> torch.Tensor:
        residual = network_outputs(parametrization.to_standard(theta_prime), problem.x, problem.hidden) - problem.y
        return 0.5 * (residual ** 2).mean()
    return risk


def fisher_matrix(problem: RegressionProblem, parametrization: Parametrization, theta_prime: torch.Tensor) -> torch.Tensor:
    """``F' = (1/n) Σ_i J_iᵀ J_i`` with ``J_i = ∂f(x_i)/∂θ'`` (Gaussian likelihood, unit variance; thesis §3.2.3)."""
    jac = jacrev(lambda t: network_outputs(parametrization.to_standard(t), problem.x, problem.hidden))(theta_prime)
    return jac.T @ jac / problem.x.shape[0]


def training_path(problem: RegressionProblem, parametrization: Parametrization, method: str, lr: float,
                  n_steps: int, damping: float = 0.0) -> torch.Tensor:
    """Run ``n_steps`` of ``method`` (``'gd'``: ``θ' ← θ' − η ∇R``; ``'natural_gradient'``:
    ``θ' ← θ' − η (F' + εI)⁻¹ ∇R``) in the coordinates of ``parametrization``, from the function of
    ``problem.theta0``. Returns the path in *standard* coordinates, shape ``(n_steps + 1, P)``, so that
    paths of different parametrizations can be compared as functions."""
    if method not in ("gd", "natural_gradient"):
        raise ValueError(f"method must be 'gd' or 'natural_gradient', got {method!r}.")
    risk = _risk(problem, parametrization)
    gradient = grad(risk)
    theta = parametrization.from_standard(problem.theta0)
    path = [parametrization.to_standard(theta)]
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    for _ in range(n_steps):
        g = gradient(theta)
        if method == "natural_gradient":
            g = torch.linalg.solve(fisher_matrix(problem, parametrization, theta) + damping * eye, g)
        theta = theta - lr * g
        standard = parametrization.to_standard(theta)
        path.append(standard)
        if not bool(torch.isfinite(standard).all()):
            break
    return torch.stack(path)


def function_distance(theta_a: torch.Tensor, theta_b: torch.Tensor, x: torch.Tensor, hidden: int) -> torch.Tensor:
    """Root-mean-square difference of the two networks' outputs over the rows of ``x`` (one value per row of
    ``theta_a``/``theta_b`` when they hold paths)."""
    f_a = torch.stack([network_outputs(t, x, hidden) for t in theta_a.reshape(-1, theta_a.shape[-1])])
    f_b = torch.stack([network_outputs(t, x, hidden) for t in theta_b.reshape(-1, theta_b.shape[-1])])
    distance = ((f_a - f_b) ** 2).mean(dim=1).sqrt()
    return distance.reshape(theta_a.shape[:-1])


def one_step_distance(problem: RegressionProblem, parametrization: Parametrization, method: str, lr: float,
                      damping: float = 0.0, probe: torch.Tensor | None = None) -> float:
    """How far apart the functions are after one step of ``method`` taken in the standard coordinates and one
    taken in ``parametrization``'s, from the same function (RMS over ``probe``, default the training inputs)."""
    probe = problem.x if probe is None else probe
    a = training_path(problem, standard_parametrization(), method, lr, 1, damping)[-1]
    b = training_path(problem, parametrization, method, lr, 1, damping)[-1]
    return float(function_distance(a, b, probe, problem.hidden))


def fitted_slope(step_sizes, distances) -> float:
    """Least-squares slope of ``log distance`` against ``log η``: 1 for ``O(η)``, 2 for ``O(η²)``."""
    xs = [math.log(s) for s in step_sizes]
    ys = [math.log(d) for d in distances]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
