"""Momentum, RMSProp and Adam from scratch (fso_lib.adaptive, thesis §2.4.3) against torch.optim in float64."""
import math

import numpy as np
import pytest
import torch

from fso_lib import adaptive as A
from fso_lib.functions2d import Quadratic, Rosenbrock

N_STEPS = 60


def torch_path(function, make_optimizer, start, n_steps):
    """The points visited by a torch.optim optimizer on a 2-D function (gradient from autograd, float64)."""
    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([theta])
    points = [theta.detach().clone().numpy()]
    for _ in range(n_steps):
        optimizer.zero_grad()
        function.value(theta[0], theta[1]).backward()
        optimizer.step()
        points.append(theta.detach().clone().numpy())
    return np.array(points)


PAIRS = [
    ("heavy ball", lambda: A.HeavyBall(0.001, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.9)),
    ("heavy ball μ=0.5", lambda: A.HeavyBall(0.002, momentum=0.5), lambda p: torch.optim.SGD(p, lr=0.002, momentum=0.5)),
    ("rmsprop", lambda: A.RMSProp(0.05, beta2=0.99, eps=1e-8),
     lambda p: torch.optim.RMSprop(p, lr=0.05, alpha=0.99, eps=1e-8)),
    ("rmsprop β₂=0.9", lambda: A.RMSProp(0.01, beta2=0.9, eps=1e-3),
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3)),
    ("adam", lambda: A.Adam(0.1), lambda p: torch.optim.Adam(p, lr=0.1)),
    ("adam β=(0.5, 0.9)", lambda: A.Adam(0.02, beta1=0.5, beta2=0.9, eps=1e-4),
     lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.5, 0.9), eps=1e-4)),
    ("gd", lambda: A.GradientDescent(0.002), lambda p: torch.optim.SGD(p, lr=0.002)),
]
FUNCTIONS = [A.narrow_valley(), A.narrow_valley(rotation=0.7, condition_number=50.0), Rosenbrock()]


@pytest.mark.parametrize("function", FUNCTIONS, ids=["valley", "rotated valley", "rosenbrock"])
@pytest.mark.parametrize("name,make_rule,make_torch", PAIRS, ids=[p[0] for p in PAIRS])
def test_rules_match_torch_optim_on_2d_functions(function, name, make_rule, make_torch):
    start = (-1.2, 1.0)
    mine = A.optimizer_path(function, make_rule(), start, N_STEPS, escape_radius=1e9)
    reference = torch_path(function, make_torch, start, N_STEPS)
    # a path that converges stops once it no longer moves: compare what it visited
    assert len(mine) > N_STEPS // 2, f"{name}: the path stopped after {len(mine) - 1} steps"
    np.testing.assert_allclose(mine, reference[:len(mine)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,make_rule,make_torch", PAIRS, ids=[p[0] for p in PAIRS])
def test_rules_match_torch_optim_on_a_tiny_network(name, make_rule, make_torch):
    """The rules are element-wise: the same code updates a weight matrix of any shape."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    weights = [torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)]

    def loss_of(w1, w2):
        return ((torch.tanh(x @ w1.T) @ w2.T - y) ** 2).sum(1).mean()

    reference = [w.clone().requires_grad_(True) for w in weights]
    optimizer = make_torch(reference)
    mine = [w.clone() for w in weights]
    rules = [make_rule(), make_rule()]
    for _ in range(30):
        optimizer.zero_grad()
        loss_of(*reference).backward()
        optimizer.step()
        ws = [w.clone().requires_grad_(True) for w in mine]
        grads = torch.autograd.grad(loss_of(*ws), ws)
        mine = [w + rule.step(g) for w, rule, g in zip(mine, rules, grads)]
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_heavy_ball_steps_grow_to_lr_over_one_minus_momentum_on_a_constant_gradient():
    rule = A.HeavyBall(0.1, momentum=0.9)
    steps = [rule.step(np.array([2.0, -1.0])) for _ in range(500)]
    np.testing.assert_allclose(steps[0], [-0.2, 0.1], rtol=1e-15)
    np.testing.assert_allclose(steps[-1], -0.1 * np.array([2.0, -1.0]) / (1 - 0.9), rtol=1e-12)


def test_heavy_ball_damps_an_alternating_gradient_by_one_plus_momentum():
    rule = A.HeavyBall(1.0, momentum=0.8)
    steps = [rule.step(np.array([(-1.0) ** k])) for k in range(400)]
    np.testing.assert_allclose(abs(steps[-1][0]), 1 / (1 + 0.8), rtol=1e-12)


def test_adam_bias_correction_makes_the_first_step_lr_times_sign():
    gradient = np.array([3.0, -1e-3, 40.0])
    first = A.Adam(0.01, eps=0.0).step(gradient)
    np.testing.assert_allclose(first, -0.01 * np.sign(gradient), rtol=1e-14)
    uncorrected = A.Adam(0.01, beta1=0.9, beta2=0.999, eps=0.0, bias_correction=False).step(gradient)
    np.testing.assert_allclose(uncorrected, -0.01 * np.sign(gradient) * 0.1 / math.sqrt(0.001), rtol=1e-12)


def test_rmsprop_and_adam_are_blind_to_the_scale_of_each_coordinate():
    """Axis-aligned valley: the path does not depend on how narrow it is (up to ε); turned: it does."""
    start = (-4.0, 1.5)
    for rule in (A.RMSProp(0.1, eps=0.0), A.Adam(0.1, eps=0.0)):
        aligned = [A.optimizer_path(A.narrow_valley(0.0, c), rule, start, 100) for c in (10.0, 1000.0)]
        np.testing.assert_allclose(aligned[0], aligned[1], rtol=1e-10, atol=1e-12)
        turned = [A.optimizer_path(A.narrow_valley(math.pi / 4, c), rule, start, 100) for c in (10.0, 1000.0)]
        assert np.abs(turned[0][:50] - turned[1][:50]).max() > 0.1


def test_gradient_descent_and_heavy_ball_do_not_see_a_rotation():
    start = np.array([-4.0, 1.5])
    for rule in (A.GradientDescent(0.05), A.HeavyBall(0.01, 0.9)):
        aligned = A.optimizer_path(A.narrow_valley(0.0), rule, start, 80)
        angle = 0.6
        turned = A.optimizer_path(A.narrow_valley(angle), rule, A.rotation_matrix(angle) @ start, 80)
        np.testing.assert_allclose(turned, aligned @ A.rotation_matrix(angle).T, atol=1e-12)


def test_narrow_valley_is_chapter_2s_valley():
    valley = A.narrow_valley()
    np.testing.assert_allclose(valley.hessian((0.0, 0.0)), np.diag([1.0, 10.0]), atol=1e-14)
    assert isinstance(valley, Quadratic)


def test_steps_to_tolerance_counts_and_reports_never():
    valley = A.narrow_valley()
    # gradient descent with η = 0.1: θ₂ is done at once (1 − 10η = 0), θ₁ shrinks by 0.9 per step, loss by 0.81
    steps = A.steps_to_tolerance(valley, A.GradientDescent(0.1), (-4.0, 0.0), 500, tolerance=1e-6)
    assert steps == math.ceil(math.log(1e-6) / math.log(0.81))
    assert A.steps_to_tolerance(valley, A.GradientDescent(0.21), (-4.0, 1.5), 500) == math.inf
    count, lr = A.best_steps_over_learning_rates(valley, A.GradientDescent, (-4.0, 0.0), [0.05, 0.1, 0.15], 500)
    assert (count, lr) == (A.steps_to_tolerance(valley, A.GradientDescent(0.15), (-4.0, 0.0), 500), 0.15)


def test_invalid_coefficients_are_refused():
    with pytest.raises(ValueError):
        A.HeavyBall(0.1, momentum=1.0)
    with pytest.raises(ValueError):
        A.Adam(0.1, beta2=1.0)
    with pytest.raises(ValueError):
        A.RMSProp(0.1, beta2=-0.1)
