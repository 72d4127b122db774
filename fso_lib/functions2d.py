"""Two-dimensional test functions and optimizer paths on them (thesis §3.1.1–3.1.3).

Each function has ``value(x, y)`` (written with plain arithmetic, so it accepts floats, NumPy arrays for
contour plots, and torch tensors for autograd checks), ``gradient(p)`` and ``hessian(p)`` in closed form
for a point ``p = (x, y)``, a ``start`` point and a plotting window ``bounds``.

The path helpers iterate one update rule from a start point and return the visited points as an
``(m, 2)`` array, stopping early if the iterate leaves ``escape_radius`` (divergence) or stops moving.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

__all__ = [
    "Function2D",
    "Quadratic",
    "Rosenbrock",
    "DoubleWell",
    "FUNCTIONS",
    "get_function",
    "gradient_descent_path",
    "newton_path",
    "damped_newton_path",
    "path",
    "grid_values",
    "path_diverges",
    "draw_paths",
]


class Function2D(ABC):
    """Base class of the 2-D test functions."""

    name = "function"
    #: Default start point and plotting window ``(xmin, xmax, ymin, ymax)``.
    start = (1.0, 1.0)
    bounds = (-2.0, 2.0, -2.0, 2.0)
    #: Known minimizers (for plots and tests).
    minimizers: tuple[tuple[float, float], ...] = ()

    @abstractmethod
    def value(self, x, y):
        """Implemented by each function."""

    @abstractmethod
    def gradient(self, p) -> np.ndarray:
        """Implemented by each function."""

    @abstractmethod
    def hessian(self, p) -> np.ndarray:
        """Implemented by each function."""

    def __call__(self, p) -> float:
        return float(self.value(float(p[0]), float(p[1])))


class Quadratic(Function2D):
    """``½ (p − c)ᵀ A (p − c)`` with eigenvalues ``1`` and ``condition_number`` along axes turned by ``angle``.

    The Hessian is ``A`` everywhere, so one Newton step lands on ``c`` from anywhere (thesis §3.1.1), and
    gradient descent is stable only for learning rates below ``2/condition_number`` (§3.1.2).
    """

    name = "quadratic"
    start = (-1.6, 1.2)

    def __init__(self, condition_number: float = 10.0, angle: float = math.pi / 6, center=(0.0, 0.0)):
        if condition_number < 1:
            raise ValueError(f"condition_number must be >= 1, got {condition_number}.")
        self.condition_number = float(condition_number)
        self.angle = float(angle)
        c, s = math.cos(angle), math.sin(angle)
        rotation = np.array([[c, -s], [s, c]])
        self.matrix = rotation @ np.diag([self.condition_number, 1.0]) @ rotation.T
        self.center = np.asarray(center, dtype=float)
        self.minimizers = (tuple(self.center),)

    def value(self, x, y):
        (a, b), (_, d) = self.matrix
        dx, dy = x - self.center[0], y - self.center[1]
        return 0.5 * (a * dx * dx + 2 * b * dx * dy + d * dy * dy)

    def gradient(self, p):
        return self.matrix @ (np.asarray(p, dtype=float) - self.center)

    def hessian(self, p):
        return self.matrix.copy()


class Rosenbrock(Function2D):
    """``(a − x)² + b (y − x²)²``: a curved, badly conditioned valley with its minimum at ``(a, a²)``."""

    name = "rosenbrock"
    start = (-1.2, 1.0)
    bounds = (-2.0, 2.0, -1.0, 3.0)

    def __init__(self, a: float = 1.0, b: float = 100.0):
        self.a, self.b = float(a), float(b)
        self.minimizers = ((self.a, self.a ** 2),)

    def value(self, x, y):
        return (self.a - x) ** 2 + self.b * (y - x * x) ** 2

    def gradient(self, p):
        x, y = (float(v) for v in p)
        return np.array([-2 * (self.a - x) - 4 * self.b * x * (y - x * x), 2 * self.b * (y - x * x)])

    def hessian(self, p):
        x, y = (float(v) for v in p)
        return np.array([[2 - 4 * self.b * (y - 3 * x * x), -4 * self.b * x], [-4 * self.b * x, 2 * self.b]])


class DoubleWell(Function2D):
    """``(x² − 1)²/4 + (y − tilt·x)²/2 ·stiffness``: two minima at ``x = ±1`` and a saddle at the origin.

    The Hessian has a negative eigenvalue where ``|x| < 1/√3`` (near the saddle). Plain Newton is attracted
    by the saddle from a smaller region: on the valley floor its iteration is ``x ← 2x³/(3x² − 1)``, which
    goes to the saddle for ``|x₀| < 1/√5`` (notebook 03a computes this). Tikhonov damping larger than the
    negative curvature makes every step a descent direction (thesis §3.1.3).
    """

    name = "double well (saddle)"
    start = (0.3, 1.2)
    bounds = (-1.8, 1.8, -1.8, 1.8)

    def __init__(self, stiffness: float = 1.0, tilt: float = 0.3):
        self.stiffness, self.tilt = float(stiffness), float(tilt)
        self.minimizers = ((-1.0, -self.tilt), (1.0, self.tilt))

    def value(self, x, y):
        r = y - self.tilt * x
        return 0.25 * (x * x - 1) ** 2 + 0.5 * self.stiffness * r * r

    def gradient(self, p):
        x, y = (float(v) for v in p)
        r = y - self.tilt * x
        return np.array([x ** 3 - x - self.stiffness * self.tilt * r, self.stiffness * r])

    def hessian(self, p):
        x, _ = (float(v) for v in p)
        k, t = self.stiffness, self.tilt
        return np.array([[3 * x * x - 1 + k * t * t, -k * t], [-k * t, k]])


#: The functions offered in the notebook's dropdown, by name.
FUNCTIONS = {
    "quadratic": Quadratic,
    "rosenbrock": Rosenbrock,
    "double_well": DoubleWell,
}


def get_function(name: str, **kwargs) -> Function2D:
    """A test function by short name (a key of :data:`FUNCTIONS`)."""
    if name not in FUNCTIONS:
        raise ValueError(f"Unknown function {name!r}; choose one of {sorted(FUNCTIONS)}.")
    return FUNCTIONS[name](**kwargs)


def grid_values(function: Function2D, n: int = 200, bounds=None):
    """``(X, Y, Z)`` on an ``n × n`` grid over ``bounds`` (default: the function's window), for contours."""
    xmin, xmax, ymin, ymax = bounds or function.bounds
    X, Y = np.meshgrid(np.linspace(xmin, xmax, n), np.linspace(ymin, ymax, n))
    return X, Y, function.value(X, Y)


def path(function: Function2D, start, update, n_steps: int, escape_radius: float = 1e3) -> np.ndarray:
    """Iterate ``p ← p + update(function, p)`` ``n_steps`` times from ``start``; returns the points visited.

    Stops early when the point leaves the disc of radius ``escape_radius``, becomes non-finite, or moves
    less than ``1e-12``.
    """
    points = [np.asarray(start, dtype=float)]
    for _ in range(int(n_steps)):
        p = points[-1]
        with np.errstate(all="ignore"):
            new = p + update(function, p)
        if not np.all(np.isfinite(new)):
            break
        points.append(new)
        if np.linalg.norm(new) > escape_radius or np.linalg.norm(new - p) < 1e-12:
            break
    return np.array(points)


def gradient_descent_path(function: Function2D, start, learning_rate: float, n_steps: int, **kwargs) -> np.ndarray:
    """Gradient descent ``p ← p − η ∇f(p)``."""
    return path(function, start, lambda f, p: -learning_rate * f.gradient(p), n_steps, **kwargs)


def _solve_or_nan(matrix, vector):
    try:
        return np.linalg.solve(matrix, vector)
    except np.linalg.LinAlgError:
        return np.full_like(vector, np.nan)


def newton_path(function: Function2D, start, n_steps: int, learning_rate: float = 1.0, **kwargs) -> np.ndarray:
    """Newton ``p ← p − η H⁻¹ ∇f`` (thesis eq. 3.1.1; ``η = 1`` is the pure Newton step)."""
    return path(function, start, lambda f, p: -learning_rate * _solve_or_nan(f.hessian(p), f.gradient(p)),
                n_steps, **kwargs)


def damped_newton_path(function: Function2D, start, damping: float, n_steps: int, learning_rate: float = 1.0,
                       **kwargs) -> np.ndarray:
    """Tikhonov-damped Newton ``p ← p − η (H + ε I)⁻¹ ∇f`` (thesis §3.1.3)."""
    return path(function, start,
                lambda f, p: -learning_rate * _solve_or_nan(f.hessian(p) + damping * np.eye(2), f.gradient(p)),
                n_steps, **kwargs)


def path_diverges(function: Function2D, points) -> bool:
    """True when a path ends outside ``function``'s plotting window (or at a non-finite point) higher than it
    started: what the figures label as diverging."""
    xmin, xmax, ymin, ymax = function.bounds
    x, y = points[-1]
    if not np.all(np.isfinite(points[-1])):
        return True
    outside = not (xmin <= x <= xmax and ymin <= y <= ymax)
    return bool(outside and function(points[-1]) > function(points[0]))


def draw_paths(ax, function: Function2D, paths: dict, levels: int = 30, n_grid: int = 200, bounds=None) -> dict:
    """Contours of ``function`` (log-spaced levels) with one labelled path per ``{name: (points, colour)}``.

    A diverging path (``path_diverges``) is labelled ``"name: DIVERGES"`` and an arrow marks where it leaves
    the window. Returns the drawn ``{label: (points, colour)}``.
    """
    X, Y, Z = grid_values(function, n_grid, bounds)
    shifted = Z - Z.min() + 1e-3
    ax.contour(X, Y, shifted, levels=np.geomspace(shifted.min() + 1e-3, shifted.max(), levels),
               colors="0.75", linewidths=0.6)
    for m in function.minimizers:
        ax.plot(*m, marker="*", color="k", markersize=10, linestyle="none")
    xmin, xmax, ymin, ymax = bounds or function.bounds
    drawn = {}
    for name, (points, color) in paths.items():
        diverging = path_diverges(function, points)
        label = f"{name}: DIVERGES" if diverging else name
        drawn[label] = (points, color)
        ax.plot(points[:, 0], points[:, 1], "o-", color=color, markersize=2.5, linewidth=1.2,
                label=f"{label} ({len(points) - 1} steps)")
        if diverging:
            inside = [xmin <= x <= xmax and ymin <= y <= ymax for x, y in points]
            last_inside = max(i for i, ok in enumerate(inside) if ok) if any(inside) else 0
            ax.annotate("diverges", xy=points[last_inside], xytext=(0.5, 0.92), textcoords="axes fraction",
                        ha="center", color=color, fontweight="bold", arrowprops=dict(arrowstyle="->", color=color))
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(function.name)
    return drawn
