"""K-FAC as Martens & Grosse run it: the exact-Fisher quadratic model, ρ, adaptive damping, the §7 step rule.

Every reference is dense and float64 (fso_lib.curvature) on networks small enough to form F.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fso_lib.curvature import fisher, flat_gradient, parameter_layout
from fso_lib.losses import BinaryCrossEntropy, CrossEntropyWithLogits, SquaredError
from fso_lib.models import mlp
from fso_lib.optim import KFAC
from fso_lib.optim.kfac import KFAC_THESIS_PROTOCOL
from fso_lib.optim.quadratic_model import (
    MinibatchQuadraticModel, levenberg_marquardt_damping, minimizing_coefficients, model_change,
)
from fso_lib.training import sum_squared_error, training_step
from reference_checks import assert_quadratic_model_step

F64 = dict(dtype=torch.float64)
#: the K-FAC loss name → the fso_lib.losses object whose dense Fisher is the reference, and the network's output layer
LOSSES = {
    "squared_error": (SquaredError(), "sigmoid"),
    "bernoulli": (BinaryCrossEntropy(), "sigmoid"),
    "softmax_cross_entropy": (CrossEntropyWithLogits(), "identity"),
}


def _net(seed=0, sizes=(4, 5, 3), output="sigmoid"):
    torch.manual_seed(seed)
    return mlp(list(sizes), activation="sigmoid", output_activation=output).double()


def _flat(model, named: dict) -> torch.Tensor:
    return parameter_layout(model).flatten(named)


def _random_direction(model, scale=1.0):
    return {name: scale * torch.randn_like(p) for name, p in model.named_parameters()}


def _targets(loss_name, output):
    if loss_name == "softmax_cross_entropy":
        return torch.softmax(torch.randn_like(output), dim=1)
    return torch.rand_like(output)


def _parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_quadratic_model_matches_the_dense_fisher(loss_name):
    reference, output = LOSSES[loss_name]
    model = _net(1, output=output)
    x = torch.randn(7, 4, **F64)
    y = _targets(loss_name, model(x).detach())
    dense_fisher = fisher(model, reference, x)
    gradient = flat_gradient(model, reference, x, y)
    layout = parameter_layout(model)
    qm = MinibatchQuadraticModel(model, x, layout.unflatten(gradient), loss_name)
    u, v = _random_direction(model), _random_direction(model)
    fu, fv = _flat(model, u), _flat(model, v)
    # F v by JVP then VJP
    assert torch.allclose(_flat(model, qm.fisher_vector_product(v)), dense_fisher @ fv, rtol=1e-10, atol=1e-12)
    # the Gram matrix from JVPs alone
    gram = qm.fisher_gram([u, v])
    expected = torch.stack([torch.stack([a @ dense_fisher @ b for b in (fu, fv)]) for a in (fu, fv)])
    assert torch.allclose(gram, expected, rtol=1e-10, atol=1e-12)
    # M(δ) − M(0) with and without damping
    for damping in (0.0, 0.3):
        value = 0.5 * fu @ (dense_fisher + damping * torch.eye(len(fu), **F64)) @ fu + gradient @ fu
        assert torch.allclose(qm.change(u, damping), value, rtol=1e-10, atol=1e-12)


def test_minimizing_coefficients_solve_the_two_by_two_system_and_fall_back_to_the_line_minimizer():
    torch.manual_seed(2)
    basis = torch.randn(6, 2, **F64)
    fisher_matrix = basis @ basis.T  # singular on purpose: the damping makes the system definite
    euclid = torch.eye(6, **F64)
    g = torch.randn(6, **F64)
    u, v = torch.randn(6, **F64), torch.randn(6, **F64)
    directions = torch.stack([u, v])
    gf, gi, b = directions @ fisher_matrix @ directions.T, directions @ euclid @ directions.T, directions @ g
    c = minimizing_coefficients(gf, gi, b, damping=0.1)
    assert torch.allclose((gf + 0.1 * gi) @ c, -b, atol=1e-12)
    # a parallel second direction: μ = 0 and α is the line minimizer along u
    parallel = torch.stack([u, 2 * u])
    gf, gi, b = parallel @ fisher_matrix @ parallel.T, parallel @ euclid @ parallel.T, parallel @ g
    c = minimizing_coefficients(gf, gi, b, damping=0.1)
    assert c[1] == 0
    assert torch.allclose(c[0], -(g @ u) / (u @ (fisher_matrix + 0.1 * euclid) @ u), rtol=1e-12)


def _kfac(model, **options):
    defaults = dict(lr=0.2, damping=0.05, momentum=0.0, statistics_period=1000, inverse_period=1000)
    return KFAC(model, **{**defaults, **options})


def _problem(loss_name="squared_error", n=16, seed=3):
    reference, output = LOSSES[loss_name]
    model = _net(seed, output=output)
    torch.manual_seed(seed + 100)
    x = torch.randn(n, 4, **F64)
    y = _targets(loss_name, model(x).detach())
    return model, reference, x, y


def _dense_model(model, reference, x, y):
    """(θ, L(θ), ∇L, F) at the model's current parameters."""
    with torch.no_grad():
        loss = float(reference(model(x), y))
    return (_flat(model, _parameters(model)), loss,
            flat_gradient(model, reference, x, y), fisher(model, reference, x))


@pytest.mark.parametrize("step_rule", ["fixed", "quadratic_model"])
@pytest.mark.parametrize("damped_rho", [False, True])
def test_rho_is_the_reduction_ratio_of_the_dense_model(step_rule, damped_rho):
    model, reference, x, y = _problem()
    opt = _kfac(model, momentum=0.9, damping_adaptation=True, damping_adaptation_period=1, step_rule=step_rule,
                damped_rho=damped_rho)
    torch.manual_seed(0)
    opt.update_statistics(x)
    for _ in range(3):  # the third update has momentum / a previous update δ₀
        theta, loss_before, gradient, dense_fisher = _dense_model(model, reference, x, y)
        damping = opt.damping
        training_step(model, reference, opt, x, y)
        delta = _flat(model, _parameters(model)) - theta
        with torch.no_grad():
            loss_after = float(reference(model(x), y))
        quadratic = dense_fisher + (damping if damped_rho else 0.0) * torch.eye(len(delta), **F64)
        predicted = 0.5 * delta @ quadratic @ delta + gradient @ delta
        assert predicted < 0
        assert opt.last_rho == pytest.approx((loss_after - loss_before) / float(predicted), rel=1e-9)
        assert float(opt.last_model_change) == pytest.approx(float(predicted), rel=1e-9)


def test_quadratic_model_step_minimizes_its_model():
    model, reference, x, y = _problem(n=24)
    twin = copy.deepcopy(model)
    opt = _kfac(model, step_rule="quadratic_model")
    proposer = _kfac(twin, lr=1.0, momentum=0.0)  # the same factors: its step is the K-FAC direction Δ itself
    torch.manual_seed(0)
    opt.update_statistics(x)
    torch.manual_seed(0)
    proposer.update_statistics(x)
    previous = None
    for update in range(3):
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        theta, _, gradient, dense_fisher = _dense_model(model, reference, x, y)
        training_step(twin, reference, proposer, x, y)
        proposal = _flat(twin, _parameters(twin)) - theta
        training_step(model, reference, opt, x, y)
        delta = _flat(model, _parameters(model)) - theta
        alpha, mu = opt.last_step_coefficients.tolist()
        curvature = dense_fisher + opt.damping * torch.eye(len(theta), **F64)

        def model_value(a, m):
            step = a * proposal + (m * previous if previous is not None else 0)
            return float(0.5 * step @ curvature @ step + gradient @ step)

        assert_quadratic_model_step(delta, proposal, previous, gradient, curvature, alpha, mu)
        best = model_value(alpha, mu)
        for da, dm in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1)):
            h = 1e-3 * max(abs(alpha), 1e-3)
            if previous is None and dm:
                continue
            assert model_value(alpha + h * da, mu + h * dm) > best
        previous = delta


def test_quadratic_model_step_with_kl_clip_bounds_the_exact_fisher_norm():
    model, reference, x, y = _problem()
    opt = _kfac(model, step_rule="quadratic_model", kl_clip=1e-6)
    torch.manual_seed(0)
    opt.update_statistics(x)
    theta, _, _, dense_fisher = _dense_model(model, reference, x, y)
    training_step(model, reference, opt, x, y)
    delta = _flat(model, _parameters(model)) - theta
    assert float(delta @ dense_fisher @ delta) == pytest.approx(1e-6, rel=1e-9)  # the unclipped step exceeds it


def _measured_step(opt, model, x, y, loss_after):
    """One update whose measured 'loss after' is ``loss_after(opt)`` (ρ forced by construction)."""
    opt.zero_grad()
    loss = sum_squared_error(model(x), y)
    loss.backward()
    opt.step(minibatch_loss=lambda: loss_after(opt, loss.detach()), loss=loss.detach())


@pytest.mark.parametrize("forced_rho, factor", [(1.0, 0.95), (0.9, 0.95), (0.5, 1.0), (0.1, 1 / 0.95), (-2.0, 1 / 0.95)])
def test_damping_moves_in_the_direction_of_the_levenberg_marquardt_rule(forced_rho, factor):
    model, _, x, y = _problem()
    opt = _kfac(model, damping_adaptation=True, damping_adaptation_period=1)
    torch.manual_seed(0)
    opt.update_statistics(x)
    before = opt.damping
    _measured_step(opt, model, x, y, lambda o, loss: loss + forced_rho * o.last_model_change)
    assert opt.last_rho == pytest.approx(forced_rho, rel=1e-9)
    assert opt.damping == pytest.approx(before * factor, rel=1e-12)


def test_rho_is_one_on_an_exactly_quadratic_loss_and_the_damping_falls_every_period():
    # one linear layer and the squared error: L is quadratic and its Hessian is the Fisher 2 XᵀX / n
    torch.manual_seed(5)
    model = mlp([3, 2], activation="identity").double()
    x, y = torch.randn(12, 3, **F64), torch.randn(12, 2, **F64)
    period = 3
    opt = _kfac(model, damping=0.5, damping_adaptation=True, damping_adaptation_period=period)
    torch.manual_seed(0)
    opt.update_statistics(x)
    for update in range(1, 7):
        training_step(model, sum_squared_error, opt, x, y)
        expected = 0.5 * 0.95 ** (period * (update // period))
        assert opt.damping == pytest.approx(expected, rel=1e-12)
        if update % period == 0:
            assert opt.last_rho == pytest.approx(1.0, rel=1e-9)


def test_damping_stays_within_its_bounds_and_a_skipped_step_measures_nothing():
    assert levenberg_marquardt_damping(1e-6, 0.9, 5, (1e-6, 1.0)) == 1e-6
    assert levenberg_marquardt_damping(0.9, -1.0, 5, (1e-6, 1.0)) == 1.0
    assert levenberg_marquardt_damping(0.1, 0.9, 5, (1e-6, 1.0), predicted_decrease=False) == pytest.approx(0.1 / 0.95 ** 5)
    assert levenberg_marquardt_damping(0.1, float("nan"), 5, (1e-6, 1.0)) == pytest.approx(0.1 / 0.95 ** 5)
    model, _, x, y = _problem()
    opt = _kfac(model, damping_adaptation=True, damping_adaptation_period=1, check_every=None)
    torch.manual_seed(0)
    opt.update_statistics(x)
    before = opt.damping
    opt.zero_grad()
    loss = sum_squared_error(model(x), y)
    loss.backward()
    opt.step(minibatch_loss=lambda: torch.tensor(0.0, **F64), loss=torch.tensor(float("nan"), **F64))
    assert math.isnan(opt.last_rho) and opt.damping == before and bool(opt.diverged)


def test_damping_adaptation_asks_for_the_minibatch_loss_and_the_fisher():
    model, _, x, y = _problem()
    opt = _kfac(model, damping_adaptation=True, damping_adaptation_period=1)
    torch.manual_seed(0)
    opt.update_statistics(x)
    sum_squared_error(model(x), y).backward()
    with pytest.raises(ValueError, match="minibatch_loss"):
        opt.step()
    with pytest.raises(ValueError, match="exact Fisher"):
        _kfac(_net(), loss=lambda out: out.square().sum(1).mean(), step_rule="quadratic_model")
    wrapped = torch.nn.Sequential(torch.nn.Flatten(), _net())
    with pytest.raises(ValueError, match="first"):
        _kfac(wrapped, damping_adaptation=True)


def test_state_dict_round_trip_keeps_the_adapted_damping_and_the_previous_update():
    model, reference, x, y = _problem()
    options = dict(damping_adaptation=True, damping_adaptation_period=2, step_rule="quadratic_model")
    opt = _kfac(model, **options)
    torch.manual_seed(0)
    opt.update_statistics(x)
    for _ in range(4):
        training_step(model, reference, opt, x, y)
    assert opt.damping != 0.05  # adapted
    state = copy.deepcopy(opt.state_dict())
    copy_model = copy.deepcopy(model)
    resumed = _kfac(copy_model, **options)
    resumed.load_state_dict(state)
    assert resumed.damping == opt.damping and resumed.last_rho == opt.last_rho
    for p, q in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(resumed.state[q]["previous_update"], opt.state[p]["previous_update"])
    for _ in range(2):  # and both continue identically (ρ measured on the second)
        training_step(model, reference, opt, x, y)
        training_step(copy_model, reference, resumed, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copy_model.parameters()))
    assert resumed.damping == opt.damping


def test_thesis_protocol_keeps_only_the_last_statistics_minibatch():
    model, _, x, _ = _problem()
    opt = KFAC(model, **KFAC_THESIS_PROTOCOL)
    assert (opt.statistics_period, opt.inverse_period) == (100, 100)
    torch.manual_seed(0)
    opt.update_statistics(x)
    torch.manual_seed(1)
    opt.update_statistics(2 * x)
    fresh = KFAC(copy.deepcopy(model), **KFAC_THESIS_PROTOCOL)
    torch.manual_seed(1)
    fresh.update_statistics(2 * x)
    for layer, fresh_layer in zip(opt.layers, fresh.layers):
        assert torch.equal(opt.state[layer.weight]["A"], fresh.state[fresh_layer.weight]["A"])
        assert torch.equal(opt.state[layer.weight]["G"], fresh.state[fresh_layer.weight]["G"])


def test_model_change_is_the_quadratic_form_of_the_coefficients():
    gf = torch.tensor([[2.0, 0.5], [0.5, 1.0]], **F64)
    gi = torch.tensor([[1.0, 0.2], [0.2, 3.0]], **F64)
    b = torch.tensor([-1.0, 0.4], **F64)
    c = torch.tensor([0.7, -0.3], **F64)
    assert float(model_change(c, gf, gi, b, damping=0.5)) == pytest.approx(
        float(0.5 * c @ (gf + 0.5 * gi) @ c + b @ c), rel=1e-14)


def test_quadratic_model_on_part_of_the_minibatch_uses_the_fisher_of_those_examples():
    model, reference, x, y = _problem(n=20)
    opt = _kfac(model, damping_adaptation=True, damping_adaptation_period=1, quadratic_model_examples=6)
    torch.manual_seed(0)
    opt.update_statistics(x)
    theta, loss_before, gradient, _ = _dense_model(model, reference, x, y)
    part_fisher = fisher(model, reference, x[:6])
    training_step(model, reference, opt, x, y)
    delta = _flat(model, _parameters(model)) - theta
    predicted = 0.5 * delta @ part_fisher @ delta + gradient @ delta  # gradient of the whole minibatch
    assert float(opt.last_model_change) == pytest.approx(float(predicted), rel=1e-9)


def test_a_skipped_quadratic_model_step_keeps_the_parameters_and_the_previous_update():
    model, reference, x, y = _problem()
    opt = _kfac(model, step_rule="quadratic_model", check_every=None)
    torch.manual_seed(0)
    opt.update_statistics(x)
    training_step(model, reference, opt, x, y)
    previous = [opt.state[p]["previous_update"].clone() for p in model.parameters()]
    before = _parameters(model)
    opt.zero_grad()
    sum_squared_error(model(x), y).backward()
    opt.step(loss=torch.tensor(float("nan"), **F64))  # a non-finite loss: the step is masked on the device
    assert bool(opt.diverged)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(torch.equal(opt.state[p]["previous_update"], old) for p, old in zip(model.parameters(), previous))
