"""fso_lib.reparametrization: the same function in other coordinates; GD changes, natural gradient does not
(exactly for a linear change, to first order in η for a nonlinear one). float64."""
import pytest
import torch
from torch.func import jacrev

from fso_lib import reparametrization as R

HIDDEN = 2


@pytest.fixture(scope="module")
def problem():
    return R.make_regression_problem(n_examples=64, hidden=HIDDEN, seed=1)


def parametrizations():
    return [R.scaled_input_parametrization([1.0, 0.2], HIDDEN), R.polar_first_layer_parametrization(HIDDEN)]


@pytest.mark.parametrize("parametrization", parametrizations(), ids=lambda p: p.name)
def test_round_trip_keeps_the_function(problem, parametrization):
    theta_prime = parametrization.from_standard(problem.theta0)
    torch.testing.assert_close(parametrization.to_standard(theta_prime), problem.theta0, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(theta_prime, problem.theta0)  # other coordinates indeed


def test_scaled_inputs_read_scaled_data(problem):
    """W₁' (S x) = W₁ x: the first layer of the scaled parametrization applied to S x."""
    scales = torch.tensor([1.0, 0.2], dtype=torch.float64)
    p = R.scaled_input_parametrization(scales, HIDDEN)
    w1_prime = p.from_standard(problem.theta0)[: 2 * HIDDEN].reshape(HIDDEN, 2)
    w1 = problem.theta0[: 2 * HIDDEN].reshape(HIDDEN, 2)
    torch.testing.assert_close((problem.x * scales) @ w1_prime.T, problem.x @ w1.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("parametrization", parametrizations(), ids=lambda p: p.name)
def test_fisher_transforms_with_the_jacobian_of_the_map(problem, parametrization):
    """F' = Φᵀ F Φ with Φ = ∂θ/∂θ' (thesis §3.2: the Fisher is a metric on the functions)."""
    theta_prime = parametrization.from_standard(problem.theta0)
    phi = jacrev(parametrization.to_standard)(theta_prime)
    f_standard = R.fisher_matrix(problem, R.standard_parametrization(), problem.theta0)
    f_prime = R.fisher_matrix(problem, parametrization, theta_prime)
    torch.testing.assert_close(f_prime, phi.T @ f_standard @ phi, rtol=1e-10, atol=1e-12)


def test_linear_change_exact_for_undamped_natural_gradient_not_for_gd(problem):
    p = R.scaled_input_parametrization([1.0, 0.2], HIDDEN)
    ng = R.function_distance(R.training_path(problem, R.standard_parametrization(), "natural_gradient", 0.3, 10),
                             R.training_path(problem, p, "natural_gradient", 0.3, 10), problem.x, HIDDEN)
    gd = R.function_distance(R.training_path(problem, R.standard_parametrization(), "gd", 0.3, 10),
                             R.training_path(problem, p, "gd", 0.3, 10), problem.x, HIDDEN)
    assert float(ng.max()) < 1e-10
    assert float(gd[-1]) > 1e-3


def test_one_step_orders_in_the_step_size(problem):
    """After one step the functions differ by O(η) for GD in both changes of coordinates, by O(η²) for
    natural gradient in the nonlinear (polar) one; halving η must show it."""
    step_sizes = [0.1 / 2 ** k for k in range(5)]
    polar = R.polar_first_layer_parametrization(HIDDEN)
    scaled = R.scaled_input_parametrization([1.0, 0.2], HIDDEN)
    slope = {}
    for name, p in [("polar", polar), ("scaled", scaled)]:
        for method in ("gd", "natural_gradient"):
            distances = [R.one_step_distance(problem, p, method, eta) for eta in step_sizes]
            if name == "scaled" and method == "natural_gradient":
                assert max(distances) < 1e-12
                continue
            slope[name, method] = R.fitted_slope(step_sizes, distances)
    assert slope["polar", "gd"] == pytest.approx(1.0, abs=0.15)
    assert slope["scaled", "gd"] == pytest.approx(1.0, abs=0.15)
    assert slope["polar", "natural_gradient"] == pytest.approx(2.0, abs=0.2)


def test_fitted_slope_reads_a_power_law():
    assert R.fitted_slope([1.0, 0.5, 0.25], [3.0, 0.75, 0.1875]) == pytest.approx(2.0)


def test_clear_errors(problem):
    with pytest.raises(ValueError, match="method"):
        R.training_path(problem, R.standard_parametrization(), "adam", 0.1, 1)
    with pytest.raises(ValueError, match="positive"):
        R.scaled_input_parametrization([1.0, -1.0], HIDDEN)
