"""The output-space view of Gauss-Newton (thesis §3.3.3) and the race's timings, in float64.

References are built from ``torch.autograd.functional`` (Jacobians of the network, Hessians of the loss in
its outputs), independently of the layout and loss derivatives of :mod:`fso_lib.curvature`.
"""
import pytest
import torch

from fso_lib import curvature as C
from fso_lib import steps as S
from fso_lib.losses import BinaryCrossEntropyWithLogits, CrossEntropyWithLogits, SquaredError
from fso_lib.models import mlp
from fso_lib.second_order_race import race_run

DT = torch.float64
LOSSES = [SquaredError(), BinaryCrossEntropyWithLogits(), CrossEntropyWithLogits()]


def _problem(loss, seed=0, n=5, sizes=(3, 4, 3)):
    torch.manual_seed(seed)
    model = mlp(list(sizes), "tanh").to(DT)
    x = torch.randn(n, sizes[0], dtype=DT)
    with torch.no_grad():
        y = loss.sample_target(model(x), torch.Generator().manual_seed(seed))
    return model, x, y


def _reference_jacobian(model, x):
    """``(n, k, P)`` with autograd: the outputs as a function of a tuple of parameter tensors."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    jac = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)), params)
    return torch.cat([j.reshape(x.shape[0], -1, p.numel()) for j, p in zip(jac, params)], dim=2)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: type(l).__name__)
def test_linearized_outputs_are_f_plus_j_delta(loss):
    model, x, y = _problem(loss)
    jac = _reference_jacobian(model, x)
    delta = torch.randn(jac.shape[2], dtype=DT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = model(x)
    torch.testing.assert_close(C.linearized_outputs(model, x, delta), f + jac @ delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(C.linearized_outputs(model, x, 0 * delta), f, rtol=0, atol=0)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: type(l).__name__)
def test_gauss_newton_is_the_hessian_of_the_linearized_risk_and_jt_d_j(loss):
    model, x, y = _problem(loss)
    jac = _reference_jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    # the output Hessian of each example's loss, by autograd
    d = torch.stack([torch.autograd.functional.hessian(lambda row: loss.per_example(row.unsqueeze(0), y[i:i + 1])[0], f[i])
                     for i in range(x.shape[0])])
    reference = torch.einsum("nkp,nkl,nlq->pq", jac, d, jac) / x.shape[0]
    P = jac.shape[2]
    linearized_hessian = torch.autograd.functional.hessian(lambda v: C.linearized_risk(model, loss, x, y, v), torch.zeros(P, dtype=DT))
    torch.testing.assert_close(C.gauss_newton(model, loss, x, y), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linearized_hessian, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: type(l).__name__)
def test_output_space_model_is_the_gauss_newton_quadratic_model(loss):
    model, x, y = _problem(loss, seed=2)
    g, G = C.flat_gradient(model, loss, x, y), C.gauss_newton(model, loss, x, y)
    with torch.no_grad():
        risk = float(loss(model(x), y))
    for seed in range(3):
        delta = torch.randn(g.shape[0], dtype=DT, generator=torch.Generator().manual_seed(seed))
        expected = S.quadratic_model(risk, g, G, delta)
        assert abs(float(C.output_space_model(model, loss, x, y, delta) - expected)) < 1e-10 * max(1.0, abs(float(expected)))
    # the linearized risk agrees with it to second order only: the gap shrinks like t³
    delta = torch.randn(g.shape[0], dtype=DT, generator=torch.Generator().manual_seed(5))
    gaps = [abs(float(C.linearized_risk(model, loss, x, y, t * delta) - C.output_space_model(model, loss, x, y, t * delta)))
            for t in (1e-1, 1e-2)]
    if isinstance(loss, SquaredError):
        assert max(gaps) < 1e-12                       # the squared error is quadratic in the outputs
    else:
        assert 1e2 < gaps[0] / gaps[1] < 1e4           # ≈ 10³


def test_the_damped_gauss_newton_step_solves_the_output_space_problem():
    for loss in LOSSES:
        model, x, y = _problem(loss, seed=3)
        damping = 0.05
        step = S.gauss_newton_step(C.flat_gradient(model, loss, x, y), C.gauss_newton(model, loss, x, y), damping)
        delta = step.clone().requires_grad_(True)
        objective = C.output_space_model(model, loss, x, y, delta) + 0.5 * damping * delta @ delta
        assert float(torch.autograd.grad(objective, delta)[0].abs().max()) < 1e-10


def test_linearized_problem_iterates_start_with_the_gauss_newton_step_and_converge():
    damping = 0.05
    for loss in LOSSES:
        model, x, y = _problem(loss, seed=4)
        gn = S.gauss_newton_step(C.flat_gradient(model, loss, x, y), C.gauss_newton(model, loss, x, y), damping)
        iterates = S.linearized_problem_iterates(model, loss, x, y, damping, n_iterations=12)
        assert len(iterates) == 13 and float(iterates[0].abs().max()) == 0.0
        torch.testing.assert_close(iterates[1], gn, rtol=1e-10, atol=1e-12)
        last = iterates[-1].clone().requires_grad_(True)
        objective = C.linearized_risk(model, loss, x, y, last) + 0.5 * damping * last @ last
        assert float(torch.autograd.grad(objective, last)[0].abs().max()) < 1e-10     # a stationary point: the minimizer
        moved = float((iterates[-1] - gn).norm() / gn.norm())
        if isinstance(loss, SquaredError):
            assert moved < 1e-10                      # quadratic: the GN step is already the minimizer
        else:
            assert moved > 1e-3                       # not quadratic: the minimizer is elsewhere


def test_natural_gradient_step_in_the_books_notation():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=DT)
    fisher, g = a @ a.T, torch.randn(6, dtype=DT)
    for kl_weight, lr in [(1.0, 10.0), (3.0, 0.5)]:
        step = S.natural_gradient_step(g, fisher, kl_weight=kl_weight, inverse_lr=1 / lr).requires_grad_(True)
        objective = step @ g + step @ step / (2 * lr) + 0.5 * kl_weight * step @ fisher @ step
        assert float(torch.autograd.grad(objective, step)[0].abs().max()) < 1e-10
        damping = 1 / (lr * kl_weight)
        torch.testing.assert_close(step.detach(), -torch.linalg.solve(fisher + damping * torch.eye(6, dtype=DT), g) / kl_weight)


def test_race_runs_record_the_time_of_their_updates():
    run = race_run("gauss_newton", "squared_error", 1.0, 0.03, 5, width=3, n_examples=8)
    assert len(run.seconds) == len(run.losses) == 6 and run.seconds[0] == 0.0
    assert all(b > a for a, b in zip(run.seconds, run.seconds[1:]))


def test_an_uncached_race_run_trains_afresh_with_the_same_losses():
    cached = race_run("gd", "squared_error", 0.3, 0.0, 4, width=3, n_examples=8)
    fresh = race_run("gd", "squared_error", 0.3, 0.0, 4, width=3, n_examples=8, cache=False)
    assert fresh is not cached and fresh.losses == cached.losses
    assert race_run("gd", "squared_error", 0.3, 0.0, 4, width=3, n_examples=8) is cached
