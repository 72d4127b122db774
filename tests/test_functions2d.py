"""2-D test functions: closed-form derivatives against autograd, and the behaviour of the paths (§3.1)."""
import math

import numpy as np
import pytest
import torch

from fso_lib import functions2d as F2

FUNCTIONS = [F2.Quadratic(), F2.Quadratic(condition_number=100.0, angle=1.0, center=(0.5, -0.2)),
             F2.Rosenbrock(), F2.Rosenbrock(a=0.5, b=10.0), F2.DoubleWell(), F2.DoubleWell(stiffness=3.0, tilt=-0.5)]
POINTS = [(0.3, -0.7), (-1.2, 1.0), (1.5, 0.2), (0.0, 0.0)]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.name)
def test_gradient_and_hessian_match_autograd(fn):
    for point in POINTS:
        p = torch.tensor(point, dtype=torch.float64, requires_grad=True)
        value = fn.value(p[0], p[1])
        (grad,) = torch.autograd.grad(value, p)
        hess = torch.autograd.functional.hessian(lambda q: fn.value(q[0], q[1]), p.detach())
        np.testing.assert_allclose(fn.gradient(point), grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(fn.hessian(point), hess.numpy(), rtol=1e-12, atol=1e-12)
        assert math.isclose(fn(point), float(value.detach()), rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.name)
def test_minimizers_are_stationary_with_positive_definite_hessian(fn):
    for m in fn.minimizers:
        np.testing.assert_allclose(fn.gradient(m), 0.0, atol=1e-12)
        assert np.linalg.eigvalsh(fn.hessian(m)).min() > 0


def test_quadratic_condition_number_and_one_step_newton():
    fn = F2.Quadratic(condition_number=25.0, angle=0.4)
    np.testing.assert_allclose(np.linalg.eigvalsh(fn.hessian((3.0, -1.0))), [1.0, 25.0])
    path = F2.newton_path(fn, (-1.6, 1.2), 5)
    np.testing.assert_allclose(path[1], [0.0, 0.0], atol=1e-12)
    assert len(path) <= 3  # the iterate stops moving after the first step


def test_gradient_descent_stability_limit_on_the_quadratic():
    fn = F2.Quadratic(condition_number=10.0)
    converged = F2.gradient_descent_path(fn, fn.start, 1.9 / 10.0, 500)
    diverged = F2.gradient_descent_path(fn, fn.start, 2.1 / 10.0, 500)
    assert np.linalg.norm(converged[-1]) < 1e-6
    assert np.linalg.norm(diverged[-1]) > 1e3 and len(diverged) < 501  # stopped at the escape radius


def test_double_well_saddle_attracts_plain_newton_but_not_damped_newton():
    fn = F2.DoubleWell()
    assert np.linalg.eigvalsh(fn.hessian((0.0, 0.0))).min() < 0
    np.testing.assert_allclose(fn.gradient((0.0, 0.0)), 0.0)
    newton = F2.newton_path(fn, fn.start, 30)
    np.testing.assert_allclose(newton[-1], [0.0, 0.0], atol=1e-8)  # converges to the saddle
    damped = F2.damped_newton_path(fn, fn.start, 1.0, 60)
    assert min(np.linalg.norm(damped[-1] - np.array(m)) for m in fn.minimizers) < 1e-6
    assert fn(newton[-1]) > fn(damped[-1]) + 0.2
    # from a start on the valley floor y = tilt·x, plain Newton climbs to the saddle
    start = (0.3, fn.tilt * 0.3)
    uphill = F2.newton_path(fn, start, 30)
    np.testing.assert_allclose(uphill[-1], [0.0, 0.0], atol=1e-8)
    assert fn(uphill[-1]) > fn(start)
    # every damped step is a descent direction (H + εI stays positive definite along this path)
    assert all(fn.gradient(a) @ (b - a) < 0 for a, b in zip(damped[:-1], damped[1:]))


def test_rosenbrock_newton_beats_gradient_descent():
    fn = F2.Rosenbrock()
    newton = F2.newton_path(fn, fn.start, 20)
    gd = F2.gradient_descent_path(fn, fn.start, 1e-3, 200)
    assert np.linalg.norm(newton[-1] - np.array([1.0, 1.0])) < 1e-8
    assert np.linalg.norm(gd[-1] - np.array([1.0, 1.0])) > 0.1


def test_grid_values_and_get_function():
    X, Y, Z = F2.grid_values(F2.Rosenbrock(), n=7)
    assert X.shape == Y.shape == Z.shape == (7, 7)
    assert Z[0, 0] == F2.Rosenbrock()((X[0, 0], Y[0, 0]))
    assert isinstance(F2.get_function("double_well"), F2.DoubleWell)
    assert F2.get_function("quadratic", condition_number=4.0).condition_number == 4.0
    with pytest.raises(ValueError, match="Unknown function"):
        F2.get_function("himmelblau")
    with pytest.raises(ValueError):
        F2.Quadratic(condition_number=0.5)


def test_draw_paths_labels_exactly_the_diverging_paths():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fn = F2.Quadratic(condition_number=10.0)
    paths = {"stable": (F2.gradient_descent_path(fn, fn.start, 1.9 / 10.0, 100), "k"),
             "too large": (F2.gradient_descent_path(fn, fn.start, 2.1 / 10.0, 100), "r")}
    assert not F2.path_diverges(fn, paths["stable"][0]) and F2.path_diverges(fn, paths["too large"][0])
    fig, ax = plt.subplots()
    drawn = F2.draw_paths(ax, fn, paths, n_grid=20)
    assert list(drawn) == ["stable", "too large: DIVERGES"]
    assert [t.get_text() for t in ax.texts] == ["diverges"]
    assert ax.get_legend_handles_labels()[1] == ["stable (100 steps)",
                                                 f"too large: DIVERGES ({len(paths['too large'][0]) - 1} steps)"]
    plt.close(fig)
