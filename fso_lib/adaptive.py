"""Momentum, RMSProp and Adam written from scratch as preconditioned gradient steps (thesis §2.4.3).

The thesis only names these "gradient smoothing" methods; notebook 02b derives them. Each rule keeps a
small state (running averages of past gradients) and turns a gradient ``g`` into a step ``Δθ``:

- heavy ball (Polyak): ``v ← μ v + g``, ``Δθ = −η v``: a running sum of gradients, so a gradient that
  keeps its direction gives steps growing to ``η g / (1 − μ)``;
- RMSProp (Tieleman & Hinton): ``s ← β₂ s + (1 − β₂) g²``, ``Δθ = −η g / (√s + ε)``: the diagonal
  preconditioner ``diag(√s + ε)⁻¹`` built from a running average of squared gradients;
- Adam (Kingma & Ba): both averages, each divided by ``1 − β^t`` (bias correction) because they start at 0.

The conventions are ``torch.optim``'s (``SGD(momentum=μ)``, ``RMSprop(alpha=β₂)``, ``Adam(betas=(β₁, β₂))``)
so that the paths here and PyTorch's agree to rounding (``tests/test_adaptive.py``). The rules work on
NumPy arrays or torch tensors of any shape.
"""
from __future__ import annotations

import math

import numpy as np

from .functions2d import Function2D, Quadratic, path

__all__ = ["HeavyBall", "RMSProp", "Adam", "GradientDescent", "narrow_valley", "rotation_matrix",
           "optimizer_path", "losses_along", "steps_to_tolerance",
           "best_steps_over_learning_rates"]


def _sqrt(x):
    return x.sqrt() if hasattr(x, "sqrt") else np.sqrt(x)


class GradientDescent:
    """Plain gradient descent ``Δθ = −η g`` (thesis §2.1.1), with the same interface as the rules below."""

    name = "gradient descent"

    def __init__(self, lr: float):
        self.lr = float(lr)

    def reset(self) -> None:
        """Forget the state (nothing to forget here)."""

    def step(self, gradient):
        """The update ``Δθ`` for this gradient."""
        return -self.lr * gradient


class HeavyBall:
    """Heavy-ball momentum (Polyak 1964; ``torch.optim.SGD(momentum=μ)``): ``v ← μ v + g``, ``Δθ = −η v``."""

    name = "heavy ball"

    def __init__(self, lr: float, momentum: float = 0.9):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.lr, self.momentum = float(lr), float(momentum)
        self.reset()

    def reset(self) -> None:
        """Start again from ``v = 0``."""
        self.velocity = None

    def step(self, gradient):
        """The update ``Δθ`` for this gradient (updates the running sum ``v``)."""
        self.velocity = gradient * 1.0 if self.velocity is None else self.momentum * self.velocity + gradient
        return -self.lr * self.velocity


class RMSProp:
    """RMSProp (Tieleman & Hinton 2012; ``torch.optim.RMSprop(alpha=β₂)``): ``s ← β₂ s + (1 − β₂) g²`` and
    ``Δθ = −η diag(√s + ε)⁻¹ g``, a diagonal preconditioner. No bias correction: ``s`` starts at 0."""

    name = "RMSProp"

    def __init__(self, lr: float, beta2: float = 0.99, eps: float = 1e-8):
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}.")
        self.lr, self.beta2, self.eps = float(lr), float(beta2), float(eps)
        self.reset()

    def reset(self) -> None:
        """Start again from ``s = 0``."""
        self.square_average = None

    def preconditioner(self):
        """The diagonal of ``diag(√s + ε)⁻¹`` used by the last step."""
        return 1.0 / (_sqrt(self.square_average) + self.eps)

    def step(self, gradient):
        """The update ``Δθ`` for this gradient (updates ``s``)."""
        previous = 0.0 * gradient if self.square_average is None else self.square_average
        self.square_average = self.beta2 * previous + (1 - self.beta2) * gradient * gradient
        return -self.lr * gradient * self.preconditioner()


class Adam:
    """Adam (Kingma & Ba 2014; ``torch.optim.Adam``): momentum on ``m``, RMSProp's preconditioner on ``v``,
    both bias-corrected: ``Δθ = −η m̂ / (√v̂ + ε)`` with ``m̂ = m/(1 − β₁ᵗ)``, ``v̂ = v/(1 − β₂ᵗ)``.

    ``bias_correction=False`` drops the two divisions (to show what they are for)."""

    name = "Adam"

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 bias_correction: bool = True):
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{label} must be in [0, 1), got {beta}.")
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.bias_correction = bool(bias_correction)
        self.reset()

    def reset(self) -> None:
        """Start again from ``m = v = 0``, ``t = 0``."""
        self.first_moment = self.second_moment = None
        self.t = 0

    def step(self, gradient):
        """The update ``Δθ`` for this gradient (updates ``m``, ``v`` and ``t``)."""
        zero = 0.0 * gradient
        m = zero if self.first_moment is None else self.first_moment
        v = zero if self.second_moment is None else self.second_moment
        self.t += 1
        self.first_moment = self.beta1 * m + (1 - self.beta1) * gradient
        self.second_moment = self.beta2 * v + (1 - self.beta2) * gradient * gradient
        m_hat, v_hat = self.first_moment, self.second_moment
        if self.bias_correction:
            m_hat = m_hat / (1 - self.beta1 ** self.t)
            v_hat = v_hat / (1 - self.beta2 ** self.t)
        return -self.lr * m_hat / (_sqrt(v_hat) + self.eps)


def rotation_matrix(angle: float) -> np.ndarray:
    """The 2 × 2 rotation by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def narrow_valley(rotation: float = 0.0, condition_number: float = 10.0) -> Quadratic:
    """Chapter 2's valley ``½(θ₁² + c θ₂²)`` (steep across θ₂, flat along θ₁), turned by ``rotation`` radians.

    With ``rotation = 0`` its axes are the coordinate axes, the case a diagonal preconditioner can fix."""
    return Quadratic(condition_number=condition_number, angle=math.pi / 2 + rotation)


def optimizer_path(function: Function2D, rule, start, n_steps: int, **kwargs) -> np.ndarray:
    """The points visited by ``rule`` (one of the classes above, reset first) on ``function`` from ``start``.

    Uses :func:`fso_lib.functions2d.path`, so a run stops early if it escapes or stops moving."""
    rule.reset()
    return path(function, start, lambda f, p: rule.step(f.gradient(p)), n_steps, **kwargs)


def losses_along(function: Function2D, points) -> np.ndarray:
    """``function`` at each point of a path."""
    return np.array([function(p) for p in points])


def steps_to_tolerance(function: Function2D, rule, start, n_steps: int, tolerance: float = 1e-6) -> float:
    """How many updates ``rule`` needs until ``function`` stays below ``tolerance × function(start)`` for
    the rest of ``n_steps`` updates (an oscillating run counts from its last excursion); ``inf`` if never."""
    points = optimizer_path(function, rule, start, n_steps, escape_radius=1e6)
    relative = losses_along(function, points) / function(start)
    if len(points) < n_steps + 1 and not relative[-1] <= tolerance:   # escaped or stalled above the tolerance
        return math.inf
    above = np.nonzero(~(relative <= tolerance))[0]
    first_good = int(above[-1]) + 1 if len(above) else 0
    return float(first_good) if first_good < len(relative) else math.inf


def best_steps_over_learning_rates(function: Function2D, make_rule, start, learning_rates, n_steps: int,
                                   tolerance: float = 1e-6) -> tuple[float, float]:
    """``(fewest steps, its learning rate)`` of :func:`steps_to_tolerance` over a grid of learning rates;
    ``make_rule(lr)`` builds the rule. The tuning every method gets before a comparison (thesis §2.3)."""
    counts = [steps_to_tolerance(function, make_rule(lr), start, n_steps, tolerance) for lr in learning_rates]
    best = int(np.argmin(counts))
    return counts[best], float(learning_rates[best])
