"""Closed forms of the chapter-6 optimizers on the paths the real autoencoder takes (float64, thesis §6.4–6.5):
every product order of ACP and K-FAC, K-FAC's running averages and KL clipping, the heavy-ball recursion,
and the errors for bad statistics or outputs."""
import math

import pytest
import torch

from fso_lib.kron import kron, vec
from fso_lib.models import linear_layers, mlp
from fso_lib.optim import ACP, KFAC, CenteredSGD, DivergenceError, acp_product_order, kfac_product_order
from reference_checks import layer_inputs_and_gradients, mean_squared_error

F64 = dict(dtype=torch.float64)


def _ones(n):
    return torch.ones(n, 1, **F64)


# ACP: sizes and minibatch chosen so that, with and without autograd's gradient, both product orders occur
ACP_SIZES, ACP_N = (3, 12, 20, 2), 6
# K-FAC: every (left, right) association occurs without autograd's gradient, and both pure orders with it
KFAC_SIZES, KFAC_N = (3, 12, 8, 4, 2), 6


def test_the_shapes_reach_every_product_order():
    acp_layers = list(zip(ACP_SIZES[:-1], ACP_SIZES[1:]))
    for weight_grads in (False, True):
        assert {acp_product_order(ACP_N, i, o, weight_grads) for i, o in acp_layers} == {"gradient", "batch"}
    kfac_layers = list(zip(KFAC_SIZES[:-1], KFAC_SIZES[1:]))
    orders = {kfac_product_order(KFAC_N, i, o, False) for i, o in kfac_layers}
    assert orders == {("gradient", "gradient"), ("gradient", "batch"), ("batch", "gradient"), ("batch", "batch")}
    assert {kfac_product_order(KFAC_N, i, o, True) for i, o in kfac_layers} == {("gradient", "gradient"), ("batch", "batch")}


@pytest.mark.parametrize("weight_grads", [False, True])
@pytest.mark.parametrize("bias_update", ["derived", "printed"])
def test_acp_update_is_eq_6_3_3_on_every_product_order(weight_grads, bias_update):
    torch.manual_seed(0)
    model = mlp(ACP_SIZES, activation="tanh").double()
    x, y = torch.randn(ACP_N, ACP_SIZES[0], **F64), torch.randn(ACP_N, ACP_SIZES[-1], **F64)
    x_stats = torch.randn(15, ACP_SIZES[0], **F64)
    lr, lam = 0.3, 0.05
    stats_h, _ = layer_inputs_and_gradients(model, x_stats, torch.zeros(15, ACP_SIZES[-1], **F64))
    hs, gs = layer_inputs_and_gradients(model, x, y)
    before = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in linear_layers(model)]
    opt = ACP(model, lr=lr, damping=lam, alpha=None, bias_update=bias_update, weight_grads=weight_grads)
    opt.update_statistics(x_stats)
    opt.zero_grad()
    mean_squared_error(model, x, y).backward()
    opt.step()
    for layer, h, g, hst, (w, b) in zip(linear_layers(model), hs, gs, stats_h, before):
        alpha = float(g.abs().max()) ** 2                   # max squared per-example gradient
        cov = torch.cov(hst.T, correction=0)                # from the statistics minibatch (1/n)
        inverse = torch.linalg.inv(cov + lam / alpha * torch.eye(cov.shape[0], **F64))
        h_mean = h.mean(0)
        d_w = (g.T @ (h - h_mean) / h.shape[0]) @ inverse / alpha
        d_b = g.mean(0) / alpha - (d_w @ h_mean if bias_update == "derived" else 0)
        assert torch.allclose(layer.weight, w - lr * d_w, rtol=0, atol=1e-12)
        assert torch.allclose(layer.bias, b - lr * d_b, rtol=0, atol=1e-12)


def _kfac_problem(seed=0):
    torch.manual_seed(seed)
    model = mlp(KFAC_SIZES, activation="tanh").double()
    x, y = torch.randn(KFAC_N, KFAC_SIZES[0], **F64), torch.randn(KFAC_N, KFAC_SIZES[-1], **F64)
    return model, x, y


def _factors(model, x_stats, target):
    """A = (1/n) Σ [h;1][h;1]ᵀ and G = (1/n) Σ g gᵀ per layer, for the deterministic 'sampled' loss ‖f − target‖²."""
    hs, gs = layer_inputs_and_gradients(model, x_stats, target)
    out = []
    for h, g in zip(hs, gs):
        ha = torch.cat([h, _ones(h.shape[0])], 1)
        out.append((ha.T @ ha / h.shape[0], g.T @ g / h.shape[0]))
    return out


def _kfac_direction(a, gg, grad, lam):
    """Closed form: vec(Δ) = (A + π√λ I ⊗ G + √λ/π I)⁻¹ vec(∇), π from the traces."""
    pi = math.sqrt((a.trace() / a.shape[0]) / (gg.trace() / gg.shape[0]))
    block = kron(a + pi * math.sqrt(lam) * torch.eye(a.shape[0], **F64), gg + math.sqrt(lam) / pi * torch.eye(gg.shape[0], **F64))
    return torch.linalg.solve(block, vec(grad)).reshape(grad.shape[1], grad.shape[0]).T


@pytest.mark.parametrize("weight_grads", [False, True])
def test_kfac_update_on_every_product_order(weight_grads):
    model, x, y = _kfac_problem()
    lam, lr = 0.02, 0.4
    target = torch.randn(KFAC_N, KFAC_SIZES[-1], **F64)
    factors = _factors(model, x, target)
    hs, gs = layer_inputs_and_gradients(model, x, y)
    before = [torch.cat([l.weight.detach(), l.bias.detach()[:, None]], 1).clone() for l in linear_layers(model)]
    opt = KFAC(model, lr=lr, damping=lam, momentum=0.0, loss=lambda out: ((out - target) ** 2).sum(1).mean(),
               statistics_period=1, inverse_period=1, weight_grads=weight_grads)
    opt.update_statistics(x)
    opt.zero_grad()
    mean_squared_error(model, x, y).backward()
    opt.step()
    for layer, h, g, (a, gg), theta in zip(linear_layers(model), hs, gs, factors, before):
        grad = g.T @ torch.cat([h, _ones(h.shape[0])], 1) / h.shape[0]
        expected = theta - lr * _kfac_direction(a, gg, grad, lam)
        assert torch.allclose(torch.cat([layer.weight, layer.bias[:, None]], 1), expected, rtol=0, atol=1e-12)


def test_kfac_factors_are_running_averages():
    model, x, _ = _kfac_problem(1)
    rho = 0.7
    targets = [torch.randn(KFAC_N, KFAC_SIZES[-1], **F64) for _ in range(3)]
    batches = [torch.randn(KFAC_N, KFAC_SIZES[0], **F64) for _ in range(3)]
    current = {}
    opt = KFAC(model, running_average=rho, loss=lambda out: ((out - current["t"]) ** 2).sum(1).mean())
    expected = None
    for xb, t in zip(batches, targets):
        current["t"] = t
        opt.update_statistics(xb)
        new = _factors(model, xb, t)
        expected = new if expected is None else [
            (rho * a0 + (1 - rho) * a1, rho * g0 + (1 - rho) * g1) for (a0, g0), (a1, g1) in zip(expected, new)]
    for layer, (a, gg) in zip(linear_layers(model), expected):
        state = opt.state[layer.weight]
        assert torch.allclose(state["A"], a, rtol=0, atol=1e-13)
        assert torch.allclose(state["G"], gg, rtol=0, atol=1e-13)
        assert state["factor_updates"] == 3


@pytest.mark.parametrize("weight_grads", [False, True])
@pytest.mark.parametrize("clip_active", [True, False])
def test_kfac_kl_clipping(weight_grads, clip_active):
    model, x, y = _kfac_problem(2)
    lam, lr = 0.02, 0.4
    target = torch.randn(KFAC_N, KFAC_SIZES[-1], **F64)
    factors = _factors(model, x, target)
    hs, gs = layer_inputs_and_gradients(model, x, y)
    grads = [g.T @ torch.cat([h, _ones(h.shape[0])], 1) / h.shape[0] for h, g in zip(hs, gs)]
    directions = [_kfac_direction(a, gg, grad, lam) for (a, gg), grad in zip(factors, grads)]
    quadratic = lr * lr * sum(float((d * grad).sum()) for d, grad in zip(directions, grads))
    kl_clip = quadratic / 9 if clip_active else quadratic * 2
    scale = math.sqrt(kl_clip / quadratic) if clip_active else 1.0  # 1/3 when active
    before = [torch.cat([l.weight.detach(), l.bias.detach()[:, None]], 1).clone() for l in linear_layers(model)]
    opt = KFAC(model, lr=lr, damping=lam, momentum=0.0, loss=lambda out: ((out - target) ** 2).sum(1).mean(),
               statistics_period=1, inverse_period=1, kl_clip=kl_clip, weight_grads=weight_grads)
    opt.update_statistics(x)
    opt.zero_grad()
    mean_squared_error(model, x, y).backward()
    opt.step()
    for layer, d, theta in zip(linear_layers(model), directions, before):
        after = torch.cat([layer.weight, layer.bias[:, None]], 1)
        assert torch.allclose(after, theta - lr * scale * d, rtol=0, atol=1e-12)


@pytest.mark.parametrize("check_every", [1, None])  # unmasked step (flag read first) and device-masked step
@pytest.mark.parametrize("cls, hyper", [(CenteredSGD, {}), (ACP, dict(alpha=1.0, damping=0.1, amortization_period=100))])
def test_heavy_ball_momentum_is_the_recursion(cls, hyper, check_every):
    """buf₀ = d₀, buf_t = μ buf_{t−1} + d_t, θ_{t+1} = θ_t − lr buf_t, with d_t the method's direction by hand."""
    torch.manual_seed(3)
    sizes = (3, 7, 2)
    model = mlp(sizes, activation="tanh").double()
    lr, mu = 0.2, 0.8
    x_stats = torch.randn(20, 3, **F64)
    opt = cls(model, lr=lr, momentum=mu, check_every=check_every, **hyper)
    if cls is ACP:
        opt.update_statistics(x_stats)
        covariances = [torch.cov(h.T, correction=0) for h in layer_inputs_and_gradients(model, x_stats, torch.zeros(20, 2, **F64))[0]]
    buffers = None
    for step in range(4):
        x, y = torch.randn(5, 3, **F64), torch.randn(5, 2, **F64)
        hs, gs = layer_inputs_and_gradients(model, x, y)
        theta = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in linear_layers(model)]
        directions = []
        for k, (h, g) in enumerate(zip(hs, gs)):
            d_w = g.T @ (h - h.mean(0)) / h.shape[0]
            d_b = g.mean(0)
            if cls is ACP:
                d_w = d_w @ torch.linalg.inv(covariances[k] + 0.1 * torch.eye(h.shape[1], **F64))
                d_b = d_b - d_w @ h.mean(0)
            directions.append((d_w, d_b))
        buffers = directions if buffers is None else [
            (mu * bw + dw, mu * bb + db) for (bw, bb), (dw, db) in zip(buffers, directions)]
        opt.zero_grad()
        mean_squared_error(model, x, y).backward()
        opt.step()
        for layer, (w, b), (bw, bb) in zip(linear_layers(model), theta, buffers):
            assert torch.allclose(layer.weight, w - lr * bw, rtol=0, atol=1e-12), step
            assert torch.allclose(layer.bias, b - lr * bb, rtol=0, atol=1e-12), step


# -- bad statistics and outputs -----------------------------------------------------------------------
@pytest.mark.parametrize("make, seed, bad_value", [
    (lambda model: KFAC(model, statistics_period=1, inverse_period=1), 4, float("nan")),
    (lambda model: ACP(model, alpha=1.0), 5, float("inf")),
], ids=["kfac", "acp"])
def test_a_non_finite_statistics_minibatch_is_named(make, seed, bad_value):
    model, x, y = _kfac_problem(seed)
    opt = make(model)
    x_bad = x.clone()
    x_bad[seed % x.shape[0], 1] = bad_value
    opt.update_statistics(x_bad)
    opt.zero_grad()
    mean_squared_error(model, x, y).backward()
    with pytest.raises(DivergenceError, match="statistics minibatch contained non-finite values"):
        opt.step()


def test_kfac_bernoulli_refuses_outputs_that_are_not_probabilities():
    model, x, y = _kfac_problem(6)  # a tanh MLP with a linear output layer, shifted: outputs outside [0, 1]
    with torch.no_grad():
        model[-1].bias.add_(1.5)
    opt = KFAC(model, loss="bernoulli", statistics_period=1, inverse_period=1)
    opt.update_statistics(x)
    opt.zero_grad()
    mean_squared_error(model, x, y).backward()
    with pytest.raises(ValueError, match=r"expects the model's outputs to be probabilities in \[0, 1\]"):
        opt.step()
    # with a sigmoid output layer the same loss is accepted
    torch.manual_seed(6)
    model = mlp(KFAC_SIZES, activation="tanh", output_activation="sigmoid").double()
    opt = KFAC(model, loss="bernoulli", statistics_period=1, inverse_period=1)
    opt.update_statistics(x)
    opt.zero_grad()
    mean_squared_error(model, x, torch.rand_like(y)).backward()
    opt.step()


def test_kfac_loss_conventions_are_in_the_public_docstring():
    doc = KFAC.__doc__
    assert "``\"bernoulli\"``" in doc and "**probabilities** in [0, 1]" in doc
    assert "``\"softmax_cross_entropy\"``" in doc and "**logits**" in doc
