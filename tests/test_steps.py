"""Second-order steps (thesis §3.1–3.2.2): each step solves the problem it claims to solve, in float64."""
import pytest
import torch

from fso_lib import curvature as C
from fso_lib import steps as S
from fso_lib.losses import CrossEntropyWithLogits, SquaredError
from fso_lib.models import mlp

DT = torch.float64


def _spd(d, seed, condition=50.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(condition)).item(), d, dtype=DT)) @ q.T


def test_newton_converges_in_one_step_on_a_quadratic():
    A, b = _spd(6, 0), torch.randn(6, dtype=DT)
    f = lambda t: 0.5 * t @ A @ t - b @ t
    theta = torch.randn(6, dtype=DT)
    theta = theta + S.newton_step(A @ theta - b, A)
    torch.testing.assert_close(theta, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-12)
    # the quadratic model of §3.1.1 is exact on a quadratic
    t0, step = torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
    torch.testing.assert_close(S.quadratic_model(f(t0), A @ t0 - b, A, step), f(t0 + step))


def test_newton_on_a_linear_least_squares_network_converges_in_one_step():
    torch.manual_seed(0)
    model = mlp([3, 2]).to(DT)
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)
    S.second_order_step(model, SquaredError(), x, y, "newton")
    assert float(torch.linalg.norm(C.flat_gradient(model, SquaredError(), x, y))) < 1e-12
    # for a linear model the residual is zero, so Gauss-Newton gives the same step
    model2 = mlp([3, 2]).to(DT)
    s1 = S.second_order_step(model2, SquaredError(), x, y, "newton", update=False)
    s2 = S.second_order_step(model2, SquaredError(), x, y, "gauss_newton", update=False)
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 0.5, 10.0])
def test_damped_newton_step_solves_its_regularized_problem(damping):
    """∇_Δ [gᵀΔ + ½ ΔᵀHΔ + (ε/2)‖Δ‖²] = 0 at the damped step, even for an indefinite H (ε > -λ_min)."""
    H = _spd(5, 1)
    H = H - (float(torch.linalg.eigvalsh(H).min()) + 0.5 * damping) * torch.eye(5, dtype=DT)  # λ_min = -ε/2
    assert torch.linalg.eigvalsh(H).min() < 0 < torch.linalg.eigvalsh(H + damping * torch.eye(5, dtype=DT)).min()
    g = torch.randn(5, dtype=DT)
    step = S.damped_newton_step(g, H, damping)
    objective = lambda d: g @ d + 0.5 * d @ H @ d + 0.5 * damping * d @ d
    delta = step.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(delta), delta)
    assert float(grad.abs().max()) < 1e-10 * max(1.0, float(g.abs().max()))
    torch.testing.assert_close(S.gauss_newton_step(g, H, damping), step)


def test_damping_shrinks_the_step_and_tends_to_gradient_descent():
    H, g = _spd(4, 2), torch.randn(4, dtype=DT)
    norms = [float(torch.linalg.norm(S.damped_newton_step(g, H, eps))) for eps in (0.0, 0.1, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    eps = 1e8
    assert float(torch.linalg.norm(S.damped_newton_step(g, H, eps) * eps + g)) < 1e-5 * float(torch.linalg.norm(g))


@pytest.mark.parametrize("lam,epsilon", [(1.0, 0.0), (2.0, 0.3), (0.5, 5.0)])
def test_natural_gradient_step_solves_the_problem_of_section_3_2_2(lam, epsilon):
    """Δ* = argmin Δᵀg + (ε/2)‖Δ‖² + (λ/2) ΔᵀFΔ = −(1/λ)(F + (ε/λ) I)⁻¹ g."""
    F, g = _spd(5, 3), torch.randn(5, dtype=DT)
    step = S.natural_gradient_step(g, F, lam, epsilon)
    delta = step.clone().requires_grad_(True)
    objective = g @ delta + 0.5 * epsilon * delta @ delta + 0.5 * lam * delta @ F @ delta
    (grad,) = torch.autograd.grad(objective, delta)
    assert float(grad.abs().max()) < 1e-10
    torch.testing.assert_close(step, -torch.linalg.solve(F + (epsilon / lam) * torch.eye(5, dtype=DT), g) / lam)


def test_natural_gradient_with_lambda_zero_is_gradient_descent():
    F, g = _spd(3, 4), torch.randn(3, dtype=DT)
    torch.testing.assert_close(S.natural_gradient_step(g, F, 0.0, 4.0), S.gradient_descent_step(g, 0.25))
    with pytest.raises(ValueError):
        S.natural_gradient_step(g, F, 0.0, 0.0)


def test_block_diagonal_step_solves_each_block_of_the_block_diagonal_matrix():
    torch.manual_seed(1)
    model = mlp([3, 4, 3], "tanh").to(DT)
    loss = CrossEntropyWithLogits()
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    layout = C.parameter_layout(model)
    G, g = C.gauss_newton(model, loss, x, y), C.flat_gradient(model, loss, x, y)
    step = S.block_diagonal_step(g, G, layout, damping=1e-2)
    dense = -torch.linalg.solve(C.block_diagonal(G, layout) + 1e-2 * torch.eye(layout.size, dtype=DT), g)
    torch.testing.assert_close(step, dense, rtol=1e-10, atol=1e-12)
    # thesis §3.1.5: inverse of a block-diagonal matrix = block-diagonal of the block inverses
    blocks = C.diagonal_blocks(G + 1e-2 * torch.eye(layout.size, dtype=DT), layout)
    torch.testing.assert_close(torch.block_diag(*[torch.linalg.inv(b) for b in blocks]),
                               torch.linalg.inv(C.block_diagonal(G, layout) + 1e-2 * torch.eye(layout.size, dtype=DT)))
    via_model = S.second_order_step(model, loss, x, y, "gauss_newton", 1e-2, "block_diagonal", update=False)
    torch.testing.assert_close(via_model, step)
    full = S.second_order_step(model, loss, x, y, "gauss_newton", 1e-2, "full", update=False)
    assert not torch.allclose(full, step)


def test_lecun_learning_rate_and_the_stability_limit_of_gradient_descent():
    """§3.1.2: with η = 1/λ_max one GD step removes the error along the top eigenvector; η > 2/λ_max diverges."""
    A = _spd(4, 5, condition=20.0)
    evals, evecs = torch.linalg.eigh(A)
    eta = S.lecun_learning_rate(A)
    assert abs(eta - 1 / float(evals.max())) < 1e-12
    theta = torch.randn(4, dtype=DT)
    after = theta + S.gradient_descent_step(A @ theta, eta)
    assert abs(float(evecs[:, -1] @ after)) < 1e-12
    for rate, diverges in [(1.9 * eta, False), (2.1 * eta, True)]:
        t = theta.clone()
        for _ in range(300):
            t = t - rate * (A @ t)
        assert (float(torch.linalg.norm(t)) > 1e3) == diverges


def test_second_order_step_methods_and_errors():
    torch.manual_seed(2)
    model = mlp([2, 3, 2], "tanh").to(DT)
    loss = CrossEntropyWithLogits()
    x, y = torch.randn(5, 2, dtype=DT), torch.randint(0, 2, (5,))
    before = C.flat_parameters(model)
    step = S.second_order_step(model, loss, x, y, "natural_gradient", damping=1e-3, learning_rate=0.5)
    torch.testing.assert_close(C.flat_parameters(model), before + step)
    expected = 0.5 * S.damped_newton_step(_grad_at(before, model, loss, x, y),
                                          _fisher_at(before, model, loss, x), 1e-3)
    torch.testing.assert_close(step, expected)
    assert set(S.STEP_METHODS) == {"newton", "gauss_newton", "natural_gradient", "empirical_fisher"}
    with pytest.raises(ValueError, match="Unknown method"):
        S.second_order_step(model, loss, x, y, "bfgs")
    with pytest.raises(ValueError, match="structure"):
        S.second_order_step(model, loss, x, y, structure="diagonal")
    with pytest.raises(ValueError, match="does not match"):
        S.newton_step(torch.zeros(3, dtype=DT), torch.eye(4, dtype=DT))


def _grad_at(theta, model, loss, x, y):
    clone = mlp([2, 3, 2], "tanh").to(DT)
    C.set_flat_parameters(clone, theta)
    return C.flat_gradient(clone, loss, x, y)


def _fisher_at(theta, model, loss, x):
    clone = mlp([2, 3, 2], "tanh").to(DT)
    C.set_flat_parameters(clone, theta)
    return C.fisher(clone, loss, x)
