"""Martens & Grosse's quadratic-model step rule and Levenberg–Marquardt damping offered to ACP, the implicit
natural neural network and EKFAC (fso_lib.optim.quadratic_model.QuadraticModelSteps; issues 12, 14), checked in float64 against
the dense Fisher (fso_lib.curvature) on a 4-5-3 network. K-FAC's own checks are in test_kfac_adaptive.py."""
from __future__ import annotations

import copy

import pytest
import torch

from fso_lib.curvature import fisher, flat_gradient, parameter_layout
from fso_lib.losses import SquaredError
from fso_lib.models import mlp
from fso_lib.optim import ACP, EKFAC, KFAC, NaturalNeuralNetwork
from fso_lib.training import training_step
from reference_checks import assert_quadratic_model_step

F64 = dict(dtype=torch.float64)
REFERENCE = SquaredError()  # the loss "squared_error" of the optimizers' quadratic model


def _acp(model, **options):
    return ACP(model, **{**dict(lr=1.0, damping=0.05, amortization_period=1000), **options})


def _acp_fixed(model, **options):
    return ACP(model, **{**dict(lr=1.0, damping=0.05, alpha=0.5, amortization_period=1000, momentum=0.0), **options})


def _natural(model, **options):
    return NaturalNeuralNetwork(model, **{**dict(lr=1.0, damping=0.05, amortization_period=1000,
                                                 whitened_layers=False), **options})


def _kfac(model, **options):
    return KFAC(model, **{**dict(lr=1.0, damping=0.05, momentum=0.0, statistics_period=1000, inverse_period=1000),
                          **options})


def _ekfac(model, **options):
    return EKFAC(model, **{**dict(lr=1.0, damping=0.05, momentum=0.0, statistics_period=1000, eigenbasis_period=1000,
                                  scale_period=1000), **options})


BUILDERS = {"acp": _acp, "acp_fixed_alpha": _acp_fixed, "natural_nn_implicit": _natural, "kfac": _kfac, "ekfac": _ekfac}


def _problem(n=24, seed=3):
    torch.manual_seed(seed)
    model = mlp([4, 5, 3], activation="sigmoid", output_activation="sigmoid").double()
    torch.manual_seed(seed + 100)
    x = torch.randn(n, 4, **F64)
    y = torch.rand(n, 3, **F64)
    return model, x, y


def _flat(model):
    return parameter_layout(model).flatten({n: p.detach() for n, p in model.named_parameters()})


def _statistics(opt, x):
    torch.manual_seed(0)  # K-FAC samples targets: the same draw for the optimizer and its twin
    opt.update_statistics(x)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_quadratic_model_step_is_the_minimizer_along_the_methods_own_direction_and_the_previous_step(name):
    """δ = αΔ + μδ₀ with Δ the method's own direction (its step at lr = 1, computed by a twin with the same
    statistics) and (α, μ) solving the 2×2 normal equations of ½δᵀ(F + εI)δ + ∇ᵀδ with the dense Fisher."""
    build = BUILDERS[name]
    model, x, y = _problem()
    twin = copy.deepcopy(model)
    opt, proposer = build(model, step_rule="quadratic_model"), build(twin)
    _statistics(opt, x)
    _statistics(proposer, x)
    previous = None
    for _ in range(3):
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        theta = _flat(model)
        gradient, dense_fisher = flat_gradient(model, REFERENCE, x, y), fisher(model, REFERENCE, x)
        training_step(twin, REFERENCE, proposer, x, y)
        proposal = _flat(twin) - theta
        training_step(model, REFERENCE, opt, x, y)
        delta = _flat(model) - theta
        alpha, mu = opt.last_step_coefficients.tolist()
        curvature = dense_fisher + opt.damping * torch.eye(len(theta), **F64)
        assert float(gradient @ proposal) < 0  # the method's direction descends
        assert_quadratic_model_step(delta, proposal, previous, gradient, curvature, alpha, mu)
        predicted = 0.5 * delta @ curvature @ delta + gradient @ delta
        assert float(predicted) < 0
        previous = delta


@pytest.mark.parametrize("name", ["acp", "natural_nn_implicit", "ekfac"])
@pytest.mark.parametrize("step_rule", ["fixed", "quadratic_model"])
def test_rho_is_the_reduction_ratio_of_the_dense_model_and_moves_the_damping(name, step_rule):
    model, x, y = _problem()
    opt = BUILDERS[name](model, lr=0.5, damping_adaptation=True, damping_adaptation_period=1, step_rule=step_rule)
    _statistics(opt, x)
    for _ in range(3):
        theta, damping = _flat(model), opt.damping
        with torch.no_grad():
            loss_before = float(REFERENCE(model(x), y))
        gradient, dense_fisher = flat_gradient(model, REFERENCE, x, y), fisher(model, REFERENCE, x)
        training_step(model, REFERENCE, opt, x, y)
        delta = _flat(model) - theta
        with torch.no_grad():
            loss_after = float(REFERENCE(model(x), y))
        predicted = float(0.5 * delta @ dense_fisher @ delta + gradient @ delta)  # the undamped model
        rho = (loss_after - loss_before) / predicted
        assert opt.last_rho == pytest.approx(rho, rel=1e-9)
        omega = 19 / 20
        expected = damping * omega if rho > 0.75 else damping / omega if rho < 0.25 else damping
        assert opt.damping == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["acp", "natural_nn_implicit", "ekfac"])
def test_state_dict_round_trip_resumes_the_quadratic_model_rule_exactly(name):
    model, x, y = _problem()
    options = dict(step_rule="quadratic_model", damping_adaptation=True, damping_adaptation_period=2)
    opt = BUILDERS[name](model, **options)
    _statistics(opt, x)
    for _ in range(4):
        training_step(model, REFERENCE, opt, x, y)
    copy_model = copy.deepcopy(model)
    resumed = BUILDERS[name](copy_model, **options)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.damping == opt.damping != 0.05 and resumed.last_rho == opt.last_rho
    for _ in range(2):
        training_step(model, REFERENCE, opt, x, y)
        training_step(copy_model, REFERENCE, resumed, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copy_model.parameters()))


def test_configurations_the_model_cannot_serve_are_refused_and_leave_the_model_as_it_was():
    model, x, _ = _problem()
    with pytest.raises(ValueError, match="whitened_layers=False"):
        NaturalNeuralNetwork(copy.deepcopy(model), step_rule="quadratic_model")
    wrapped = torch.nn.Sequential(torch.nn.Flatten(), model)
    with pytest.raises(ValueError, match="first"):
        ACP(wrapped, step_rule="quadratic_model")
    assert all(p.requires_grad for p in model.parameters())  # the refused optimizer took its hooks off
    assert not model[0]._forward_hooks and not model[0]._backward_hooks and not model[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="step_rule"):
        ACP(model, step_rule="line_search")
    with pytest.raises(ValueError, match="compile"):
        ACP(model, step_rule="quadratic_model").compile_step()
