"""Each chapter-6 optimizer's update against its closed form, on a tiny network in float64 (thesis §6.4–6.5)."""
import copy
import math

import pytest
import torch
from torch import nn

from fso_lib.kron import kron, vec
from fso_lib.layer_stats import UnsupportedLayerError
from fso_lib.models import linear_layers, mlp
from fso_lib.optim import (
    ACP, KFAC, OPTIMIZERS, CenteredSGD, DivergenceError, NaturalNeuralNetwork, WhitenedLinear, make_optimizer,
    needs_statistics, prepare_model,
)

F64 = dict(dtype=torch.float64)


def _problem(seed=0, n=8, sizes=(3, 5, 2)):
    torch.manual_seed(seed)
    model = mlp(sizes, activation="tanh").double()
    x, y = torch.randn(n, sizes[0], **F64), torch.randn(n, sizes[-1], **F64)
    return model, x, y


def _loss(model, x, y):
    return ((model(x) - y) ** 2).sum(dim=1).mean()


def _forward_backward(model, opt, x, y):
    """One training forward/backward pass; returns each layer's (h, per-example ∇_a l) and the parameters before."""
    hs, gs = [], []
    handles = []
    for layer in linear_layers(model):
        def hook(m, args, out):
            hs.append(args[0].detach())
            out.register_hook(lambda g: gs.append(g.detach() * x.shape[0]))
        handles.append(layer.register_forward_hook(hook))
    opt.zero_grad()
    _loss(model, x, y).backward()
    for handle in handles:
        handle.remove()
    before = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in linear_layers(model)]
    return hs, gs[::-1], before


def _local_least_squares(h, grad_a, lr, eps):
    """argmin (1/n) Σ_i ‖ΔW h_i + Δb + lr ∇_{a_i} l‖² + ε ‖ΔW‖², solved directly by least squares (§6.1.1)."""
    n, n_in = h.shape
    design = torch.cat([torch.cat([h, torch.ones(n, 1, **F64)], 1) / math.sqrt(n),
                        torch.cat([math.sqrt(eps) * torch.eye(n_in, **F64), torch.zeros(n_in, 1, **F64)], 1)])
    target = torch.cat([-lr * grad_a / math.sqrt(n), torch.zeros(n_in, grad_a.shape[1], **F64)])
    solution = torch.linalg.lstsq(design, target).solution  # (n_in+1, n_out), one column per output unit
    return solution[:n_in].T, solution[n_in]


def test_centered_gd_is_algorithm_2():
    model, x, y = _problem()
    opt = CenteredSGD(model, lr=0.3)
    hs, gs, before = _forward_backward(model, opt, x, y)
    opt.step()
    for layer, h, g, (w, b) in zip(linear_layers(model), hs, gs, before):
        n = h.shape[0]
        assert torch.allclose(layer.weight, w - 0.3 * g.T @ (h - h.mean(0)) / n)
        assert torch.allclose(layer.bias, b - 0.3 * g.mean(0))


@pytest.mark.parametrize("use_statistics_call", [True, False])
def test_acp_solves_the_local_least_squares_problem(use_statistics_call):
    model, x, y = _problem(1)
    lr, eps = 0.2, 0.05
    opt = ACP(model, lr=lr, damping=eps, alpha=1.0, amortization_period=5)
    if use_statistics_call:
        assert needs_statistics(opt)
        opt.update_statistics(x)  # statistics from the same minibatch: the exact local criterion
    hs, gs, before = _forward_backward(model, opt, x, y)
    opt.step()
    assert not needs_statistics(opt)
    for layer, h, g, (w, b) in zip(linear_layers(model), hs, gs, before):
        d_w, d_b = _local_least_squares(h, g, lr, eps)
        assert torch.allclose(layer.weight - w, d_w, atol=1e-12)
        assert torch.allclose(layer.bias - b, d_b, atol=1e-12)


def test_acp_heuristic_alpha_printed_bias_and_amortized_inverse():
    model, x, y = _problem(2)
    x_stats = torch.randn(20, 3, **F64)
    lr, lam = 0.1, 1e-2
    opt = ACP(model, lr=lr, damping=lam, alpha=None, amortization_period=3, bias_update="printed")
    opt.update_statistics(x_stats)
    for step in range(2):  # the second step reuses the inverse computed with the first step's α
        hs, gs, before = _forward_backward(model, opt, x, y)
        if step == 0:
            alphas = [float(g.abs().max() ** 2) for g in gs]
        opt.step()
        for k, (layer, h, g, (w, b)) in enumerate(zip(linear_layers(model), hs, gs, before)):
            alpha = float(g.abs().max() ** 2)
            hc_stats = x_stats if k == 0 else None
            state = opt.state[layer.weight]
            cov = state["covariance"]
            if k == 0:
                assert torch.allclose(cov, torch.cov(hc_stats.T, correction=0))
            inverse = torch.linalg.inv(cov + lam / alphas[k] * torch.eye(cov.shape[0], **F64))
            d_w = g.T @ (h - h.mean(0)) / h.shape[0] @ inverse / alpha
            assert torch.allclose(layer.weight, w - lr * d_w, atol=1e-12)
            assert torch.allclose(layer.bias, b - lr * g.mean(0) / alpha, atol=1e-12)  # printed: no −ΔW h̄


@pytest.mark.parametrize("weight_grads", [False, True])
def test_kfac_step_is_the_damped_inverse_of_its_factored_block(weight_grads):
    model, x, y = _problem(3)
    lam, lr = 0.03, 0.5
    # a deterministic "sampled" loss so that the factors can be recomputed here
    target = torch.randn(x.shape[0], 2, **F64)
    stats_model = copy.deepcopy(model)
    opt = KFAC(model, lr=lr, damping=lam, momentum=0.0, loss=lambda out: ((out - target) ** 2).sum(1).mean(),
               statistics_period=1, inverse_period=1, weight_grads=weight_grads)
    opt.update_statistics(x)
    stats_opt = torch.optim.SGD(stats_model.parameters(), lr=0.0)
    hs_stats, gs_stats, _ = _forward_backward(stats_model, stats_opt, x, target)
    hs, gs, before = _forward_backward(model, opt, x, y)
    # ∇_[W b] L = (1/n) Σ_i ∇_{a_i} l [h_i; 1]ᵀ from the hooks (autograd's W.grad is not formed by default)
    grads = [g.T @ torch.cat([h, torch.ones(h.shape[0], 1, **F64)], 1) / h.shape[0] for h, g in zip(hs, gs)]
    opt.step()
    for layer, h, g, grad, (w, b) in zip(linear_layers(model), hs_stats, gs_stats, grads, before):
        ha = torch.cat([h, torch.ones(h.shape[0], 1, **F64)], 1)
        a = ha.T @ ha / h.shape[0]
        gg = g.T @ g / h.shape[0]
        pi = math.sqrt((a.trace() / a.shape[0]) / (gg.trace() / gg.shape[0]))
        block = kron(a + pi * math.sqrt(lam) * torch.eye(a.shape[0], **F64),
                     gg + math.sqrt(lam) / pi * torch.eye(gg.shape[0], **F64))  # thesis order vec([W b])
        step = torch.linalg.solve(block, vec(grad))
        change = torch.cat([layer.weight - w, (layer.bias - b)[:, None]], 1)
        assert torch.allclose(vec(change), -lr * step, atol=1e-12)


def test_kfac_samples_targets_from_the_model():
    model, x, _ = _problem(4, n=4000, sizes=(3, 2))  # one linear layer: ∇_a of the sampled loss is 2(f − y)
    opt = KFAC(model, loss="squared_error", statistics_period=1)
    opt.update_statistics(x)
    g_factor = opt.state[model[0].weight]["G"]
    # y ~ N(f, ½ I) makes E[∇_a l ∇_a lᵀ] = 4 · ½ I = 2 I, the GN/Fisher output matrix of ‖f − y‖²
    assert torch.allclose(g_factor, 2 * torch.eye(2, **F64), atol=0.2)


def test_natural_neural_network_reparametrization():
    model, x, y = _problem(5, n=50)
    reference = copy.deepcopy(model)
    opt = NaturalNeuralNetwork(model, lr=0.1, damping=1e-9, amortization_period=2)
    assert all(isinstance(m, WhitenedLinear) for m in model if not isinstance(m, nn.Tanh))
    assert torch.allclose(model(x), reference(x))
    opt.update_statistics(x)
    assert torch.allclose(model(x), reference(x), atol=1e-10)  # the function did not change
    # the whitened inputs of every layer have zero mean and identity covariance on that minibatch
    h = x
    for module in model:
        if isinstance(module, WhitenedLinear):
            h_e = (h - module.mu) @ module.U.T
            assert torch.allclose(h_e.mean(0), torch.zeros(h.shape[1], **F64), atol=1e-8)
            assert torch.allclose(h_e.T @ h_e / h.shape[0], torch.eye(h.shape[1], **F64), atol=1e-6)
        h = module(h)
    # a gradient step on V is the inverse-covariance-preconditioned step on W = V U (centered on μ)
    w_before = [m.effective_weight().clone() for m in model if isinstance(m, WhitenedLinear)]
    opt.zero_grad()
    _loss(model, x, y).backward()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.0)
    ref_opt.zero_grad()
    _loss(reference, x, y).backward()
    opt.step()
    layers = [m for m in model if isinstance(m, WhitenedLinear)]
    for layer, ref, w in zip(layers, linear_layers(reference), w_before):
        precond = layer.U @ layer.U
        expected = w - 0.1 * (ref.weight.grad - torch.outer(ref.bias.grad, layer.mu)) @ precond
        assert torch.allclose(layer.effective_weight(), expected, atol=1e-8)


def _step(opt, model, x, y, x_stats):
    if needs_statistics(opt):
        opt.update_statistics(x_stats)
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()


@pytest.mark.parametrize("name", ["centered_gd", "acp", "acp_fixed_alpha", "kfac", "natural_nn"])
def test_state_dict_round_trip_gives_identical_next_steps(name):
    model, x, y = _problem(6)
    x_stats = torch.randn(10, 3, **F64)
    hyper = dict(amortization_period=2) if name in ("acp", "acp_fixed_alpha", "natural_nn") else {}
    if name == "kfac":
        hyper = dict(statistics_period=2, inverse_period=3)
    model = prepare_model(name, model)
    opt = make_optimizer(name, model, **hyper)
    for _ in range(3):
        _step(opt, model, x, y, x_stats)
    clone = copy.deepcopy(model)
    clone_opt = make_optimizer(name, clone, **hyper)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):  # crosses a statistics update and an inversion
        torch.manual_seed(7)
        _step(opt, model, x, y, x_stats)
        torch.manual_seed(7)
        _step(clone_opt, clone, x, y, x_stats)
        for p, q in zip(model.parameters(), clone.parameters()):
            assert torch.equal(p, q)


def test_unsupported_layers_raise_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    for cls in (ACP, KFAC, CenteredSGD):
        with pytest.raises(UnsupportedLayerError, match="BatchNorm1d"):
            cls(model)
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d"):
        NaturalNeuralNetwork(model)


def test_a_blown_up_step_is_reported_and_the_parameters_are_kept():
    model, x, y = _problem(7)
    opt = ACP(model, lr=0.1, damping=1e-2, alpha=1.0)
    opt.update_statistics(x)
    before = [p.detach().clone() for p in model.parameters()]
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    opt.zero_grad()
    _loss(model, x_bad, y).backward()
    with pytest.raises(DivergenceError, match="not finite"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y) * float("nan")
        loss.backward()
        return loss
    with pytest.raises(DivergenceError, match="loss is nan"):
        opt.step(closure)


def test_registry_builds_every_optimizer_and_each_lowers_the_loss():
    for name, spec in OPTIMIZERS.items():
        model, x, y = _problem(8, n=32)
        model = prepare_model(name, model)
        opt = make_optimizer(name, model, lr=spec.defaults["lr"] * 0.5)
        start = float(_loss(model, x, y).detach())
        for _ in range(5):
            _step(opt, model, x, y, x)
        assert float(_loss(model, x, y).detach()) < start, name
    with pytest.raises(ValueError, match="prepare_model"):
        make_optimizer("batchnorm", mlp([3, 2]))
    with pytest.raises(ValueError, match="Unknown optimizer"):
        make_optimizer("lbfgs", mlp([3, 2]))


@pytest.mark.parametrize("name, schedule", [
    ("acp", dict(amortization_period=3)),
    ("kfac", dict(statistics_period=2, inverse_period=4)),
    ("natural_nn", dict(amortization_period=3)),
])
def test_a_compiled_step_keeps_the_statistics_and_inversion_schedule(name, schedule):
    """torch.compile(opt.step) must train exactly like the eager step across refreshes: the update counter that
    drives the schedules has to advance inside the compiled step (dynamo drops mutations of plain int attributes
    of an optimizer). The first step runs eager, as in the benchmark runner; the "eager" backend traces with
    dynamo and needs no C++ compiler."""
    from fso_lib.optim import prepare_model
    from fso_lib.training import training_step

    torch.manual_seed(0)
    base = mlp([6, 5, 6], "sigmoid", "sigmoid").double()
    data = torch.rand(9, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(2)  # K-FAC samples its targets: the same draws in both runs
        model = prepare_model(name, copy.deepcopy(base))
        opt = make_optimizer(name, model, lr=0.3, check_every=None, **schedule)
        step = torch.compile(opt.step, backend="eager") if compiled else None
        for k in range(9):
            stats = data[(k + 3) % 9] if needs_statistics(opt) else None
            training_step(model, lambda out, y: ((out - y) ** 2).sum(dim=1).mean(), opt, data[k], data[k],
                          statistics_inputs=stats, optimizer_step=step if k > 0 else None)  # first step eager
        runs[compiled] = (opt.n_updates, [p.detach().clone() for p in model.parameters()])
    assert runs[True][0] == runs[False][0] == 9
    for eager, compiled in zip(runs[False][1], runs[True][1]):
        assert torch.allclose(eager, compiled, rtol=0, atol=1e-10)


def test_largest_magnitude_is_the_infinity_norm_and_keeps_nan():
    from fso_lib.optim.acp import largest_magnitude

    torch.manual_seed(0)
    for sign in (1.0, -1.0):  # the largest magnitude on a positive and on a negative entry
        x = torch.randn(7, 5)
        x[3, 2] = sign * 10.0
        assert largest_magnitude(x) == torch.linalg.vector_norm(x, ord=float("inf")) == 10.0
    x[0, 0] = float("nan")
    assert torch.isnan(largest_magnitude(x))
