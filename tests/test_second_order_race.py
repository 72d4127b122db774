"""One update of each race method equals its closed form, computed here from autograd in float64."""
import math

import pytest
import torch

from fso_lib.optim import ACP, KFAC
from fso_lib.second_order_race import (DIVERGENCE_FACTOR, RACE_METHODS, make_tiny_problem, race_run, race_step)

LR, DAMPING = 0.7, 0.05


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _network(model):
    """``θ ↦ outputs`` for the tiny MLP, written out by hand (Linear, tanh, Linear[, sigmoid/softmax])."""
    shapes = [p.shape for p in model.parameters()]
    final = type(list(model)[-1]).__name__

    def forward(theta, x, keep_preactivations=None):
        parts, k = [], 0
        for s in shapes:
            parts.append(theta[k:k + math.prod(s)].reshape(s))
            k += math.prod(s)
        w1, b1, w2, b2 = parts
        a1 = x @ w1.T + b1
        a2 = torch.tanh(a1) @ w2.T + b2
        if keep_preactivations is not None:
            keep_preactivations.extend([a1, a2])
        if final == "Sigmoid":
            return torch.sigmoid(a2)
        if final == "Softmax":
            return torch.softmax(a2, dim=-1)
        return a2

    return forward


def _per_example_loss(loss_name, out, y):
    if loss_name == "squared_error":
        return ((out - y) ** 2).sum(1)
    if loss_name == "binary_cross_entropy":
        return -(y * out.log() + (1 - y) * (1 - out).log()).sum(1)
    if loss_name == "binary_cross_entropy_with_logits":
        return (torch.nn.functional.softplus(out) - y * out).sum(1)
    log_p = out.log() if loss_name == "cross_entropy" else torch.log_softmax(out, 1)
    return -log_p.gather(1, y.long().reshape(-1, 1)).squeeze(1)


def _fisher_middle(loss_name, out):
    """``D`` of the model's predictive distribution for each example (Table 3.II, or its logits form)."""
    n, k = out.shape
    if loss_name == "squared_error":
        return 2 * torch.eye(k, dtype=out.dtype).expand(n, k, k)
    if loss_name == "binary_cross_entropy":
        return torch.diag_embed(1 / (out * (1 - out)))
    if loss_name == "binary_cross_entropy_with_logits":
        p = torch.sigmoid(out)
        return torch.diag_embed(p * (1 - p))
    if loss_name == "cross_entropy":
        return torch.diag_embed(1 / out)
    p = torch.softmax(out, 1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def _dense_direction(method, loss_name, model, x, y):
    """``(C + εI)⁻¹ g`` (or ``g``) from autograd's Hessian / Jacobians of the hand-written network."""
    forward = _network(model)
    theta = _flat(model).clone()
    risk = lambda t: _per_example_loss(loss_name, forward(t, x), y).mean()  # noqa: E731
    g = torch.autograd.functional.jacobian(risk, theta)
    if method == "gd":
        return g
    if method == "damped_newton":
        matrix = torch.autograd.functional.hessian(risk, theta)
    else:
        out = forward(theta, x)
        jac = torch.autograd.functional.jacobian(lambda t: forward(t, x), theta)  # (n, k, P)
        if method == "gauss_newton":
            middle = torch.stack([torch.autograd.functional.hessian(
                lambda o: _per_example_loss(loss_name, o[None], y[i:i + 1])[0], out[i]) for i in range(x.shape[0])])
        else:
            middle = _fisher_middle(loss_name, out)
        matrix = torch.einsum("nkp,nkl,nlq->pq", jac, middle, jac) / x.shape[0]
    return torch.linalg.solve(matrix + DAMPING * torch.eye(theta.shape[0], dtype=theta.dtype), g)


def _layer_quantities(loss_name, model, x, y):
    """Inputs ``h`` of each layer, per-example gradients w.r.t. its pre-activations, and ``∇W, ∇b`` of ``R``."""
    forward = _network(model)
    theta = _flat(model).clone().requires_grad_(True)
    pre = []
    out = forward(theta, x, pre)
    risk = _per_example_loss(loss_name, out, y).mean()
    per_example = [gi * x.shape[0] for gi in torch.autograd.grad(risk, pre, retain_graph=True)]
    with torch.no_grad():
        inputs = [x, torch.tanh(pre[0])]
    (g,) = torch.autograd.grad(risk, theta)
    return inputs, per_example, g


def _acp_direction(loss_name, model, x, y):
    inputs, per_example, g = _layer_quantities(loss_name, model, x, y)
    pieces, k = [], 0
    for p_w, p_b, h, ga in zip(list(model.parameters())[0::2], list(model.parameters())[1::2], inputs, per_example):
        gw = g[k:k + p_w.numel()].reshape(p_w.shape); k += p_w.numel()
        gb = g[k:k + p_b.numel()]; k += p_b.numel()
        alpha = float(ga.abs().max()) ** 2                       # max squared per-example gradient
        mean = h.mean(0)
        cov = (h - mean).T @ (h - mean) / h.shape[0]
        dw = (gw - torch.outer(gb, mean)) @ torch.linalg.inv(cov + DAMPING / alpha * torch.eye(h.shape[1], dtype=h.dtype)) / alpha
        db = gb / alpha - dw @ mean
        pieces += [dw.reshape(-1), db]
    return torch.cat(pieces)


def _kfac_direction(loss_name, model, x, y, samples, seed):
    _, loss, _, _ = make_tiny_problem(loss_name)
    forward = _network(model)
    theta = _flat(model)
    x_stats = x.repeat(samples, 1)
    with torch.no_grad():
        out = forward(theta, x_stats)
    y_sampled = loss.sample_target(out, torch.Generator().manual_seed(seed))
    if loss_name in ("cross_entropy", "cross_entropy_with_logits"):
        y_sampled = y_sampled.argmax(1) if y_sampled.dim() == 2 else y_sampled
    inputs, grads_stats, _ = _layer_quantities(loss_name, model, x_stats, y_sampled)
    _, _, g = _layer_quantities(loss_name, model, x, y)
    pieces, k = [], 0
    for p_w, p_b, h, ga in zip(list(model.parameters())[0::2], list(model.parameters())[1::2], inputs, grads_stats):
        n_out, n_in = p_w.shape
        gw = g[k:k + p_w.numel()].reshape(p_w.shape); k += p_w.numel()
        gb = g[k:k + p_b.numel()]; k += p_b.numel()
        a_bar = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
        a_factor = a_bar.T @ a_bar / h.shape[0]
        g_factor = ga.T @ ga / h.shape[0]
        pi = math.sqrt((float(a_factor.trace()) / (n_in + 1)) / (float(g_factor.trace()) / n_out))
        gamma = math.sqrt(DAMPING)
        d = (torch.linalg.inv(g_factor + gamma / pi * torch.eye(n_out, dtype=h.dtype))
             @ torch.cat([gw, gb[:, None]], 1)
             @ torch.linalg.inv(a_factor + pi * gamma * torch.eye(n_in + 1, dtype=h.dtype)))
        pieces += [d[:, :n_in].reshape(-1), d[:, n_in]]
    return torch.cat(pieces)


def _one_library_step(method, loss_name, samples=3, seed=5):
    model, loss, x, y = make_tiny_problem(loss_name, width=4, n_examples=10, seed=2)
    if method == "kfac":
        generator = torch.Generator().manual_seed(seed)
        opt = KFAC(model, lr=LR, damping=DAMPING, momentum=0.0, statistics_period=1, inverse_period=1,
                   running_average=0.0, loss=lambda o: loss(o, loss.sample_target(o.detach(), generator)))
    elif method == "acp":
        opt = ACP(model, lr=LR, damping=DAMPING, alpha=None, amortization_period=1, momentum=0.0)
    else:
        opt = None
    before = _flat(model).clone()
    if method == "kfac":
        expected = _kfac_direction(loss_name, model, x, y, samples, seed)
    elif method == "acp":
        expected = _acp_direction(loss_name, model, x, y)
    else:
        expected = _dense_direction(method, loss_name, model, x, y)
    race_step(method, model, loss, x, y, LR, DAMPING, optimizer=opt, kfac_samples=samples)
    return before, _flat(model), expected


@pytest.mark.parametrize("loss_name", ["squared_error", "binary_cross_entropy", "cross_entropy_with_logits"])
@pytest.mark.parametrize("method", list(RACE_METHODS))
def test_one_step_equals_the_closed_form_update(method, loss_name):
    before, after, direction = _one_library_step(method, loss_name)
    assert direction.abs().max() > 1e-3                      # a real step, not a vanishing one
    torch.testing.assert_close(after, before - LR * direction, rtol=1e-8, atol=1e-10)


def test_natural_gradient_differs_from_gauss_newton_on_probabilities():
    # on a sigmoid output with the loss on probabilities, G ≠ F, so the two steps must differ
    b1, a1, _ = _one_library_step("gauss_newton", "binary_cross_entropy")
    b2, a2, _ = _one_library_step("natural_gradient", "binary_cross_entropy")
    assert torch.equal(b1, b2) and (a1 - a2).norm() > 1e-3 * (a1 - b1).norm()


def test_run_records_losses_and_flags_divergence():
    run = race_run("gauss_newton", "squared_error", learning_rate=1.0, damping=1e-2, n_steps=10, width=4, n_examples=16)
    assert len(run.losses) == 11 and not run.diverged and run.final_loss < 0.1 * run.losses[0]
    assert race_run("gauss_newton", "squared_error", 1.0, 1e-2, 10, width=4, n_examples=16) is run   # cached
    blown = race_run("gd", "squared_error", learning_rate=50.0, damping=0.0, n_steps=30, width=4, n_examples=16)
    assert blown.diverged and len(blown.losses) < 31
    assert max(blown.losses) <= DIVERGENCE_FACTOR * blown.losses[0]


def test_kfac_runs_are_reproducible_and_seeded():
    a = race_run("kfac", "cross_entropy_with_logits", 0.5, 0.1, 5, width=4, n_examples=16, seed=1)
    b = race_run("kfac", "cross_entropy_with_logits", 0.5, 0.1, 5, width=4, n_examples=16, seed=1, kfac_samples=2)
    assert a.losses[0] == b.losses[0] and a.losses[1:] != b.losses[1:]   # other samples, other factors


def test_problem_does_not_depend_on_the_default_dtype():
    a = make_tiny_problem("squared_error")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if previous == torch.float64 else torch.float64)
    try:
        b = make_tiny_problem("squared_error")
    finally:
        torch.set_default_dtype(previous)
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_parameter_norms_follow_the_losses():
    run = race_run("acp", "squared_error", 0.5, 0.1, 4, width=4, n_examples=16)
    assert len(run.parameter_norms) == len(run.losses)
    model, *_ = make_tiny_problem("squared_error", width=4, n_examples=16)
    assert abs(run.parameter_norms[0] - float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm())) < 1e-12
