"""Shampoo (Gupta et al. 2018) and SOAP (Vyas et al. 2024) against dense re-implementations in float64: the
Kronecker power ((R + εI) ⊗ (L + εI))^(−1/4) vec Γ built densely, SOAP's Adam in the dense rotated space,
across root / basis refreshes; state_dict round trips; refused input; a smoke run on the autoencoder."""
import copy

import pytest
import torch

from fso_lib.kron import kron, vec
from fso_lib.models import deep_autoencoder, linear_layers, mlp
from fso_lib.optim import SOAP, Shampoo, make_optimizer

F64 = dict(dtype=torch.float64)
SIZES, N = (3, 12, 8, 4, 2), 6


def _loss(model, x, y):
    return ((model(x) - y) ** 2).sum(dim=1).mean()


def _dense_power(matrix, power):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.pow(power)) @ vectors.T


def _set_layer(layer, theta_vec):
    w_b = theta_vec.reshape(layer.in_features + 1, layer.out_features).T
    with torch.no_grad():
        layer.weight.copy_(w_b[:, :-1])
        layer.bias.copy_(w_b[:, -1])


def _layer_gradients(model, x, y):
    """vec(Γ) per layer (thesis column-stacked order) and Γ itself, from autograd on the reference model."""
    model.zero_grad()
    _loss(model, x, y).backward()
    grads = [torch.cat([l.weight.grad, l.bias.grad[:, None]], 1) for l in linear_layers(model)]
    return grads


class _DenseShampoo:
    def __init__(self, model, lr, damping, momentum, beta, root_period, grafting, graft_beta2=0.999, graft_eps=1e-8):
        self.__dict__.update(model=model, lr=lr, eps=damping, mu=momentum, beta=beta, period=root_period,
                             grafting=grafting, b2=graft_beta2, geps=graft_eps)
        self.t, self.state = 0, [dict() for _ in linear_layers(model)]

    def step(self, x, y):
        for layer, st, grad in zip(linear_layers(self.model), self.state, _layer_gradients(self.model, x, y)):
            left, right = grad @ grad.T, grad.T @ grad
            if "L" in st:
                if self.beta is None:
                    left, right = st["L"] + left, st["R"] + right
                else:
                    left, right = self.beta * st["L"] + (1 - self.beta) * left, self.beta * st["R"] + (1 - self.beta) * right
            st["L"], st["R"] = left, right
            if self.t % self.period == 0:
                eye_l, eye_r = torch.eye(left.shape[0], **F64), torch.eye(right.shape[0], **F64)
                st["P"] = _dense_power(kron(right + self.eps * eye_r, left + self.eps * eye_l), -0.25)  # dense Kronecker
            d = st["P"] @ vec(grad)
            if self.grafting == "sgd":
                d = d * vec(grad).norm() / d.norm()
            elif self.grafting == "adam":
                st["v"] = (1 - self.b2) * vec(grad) ** 2 + (self.b2 * st["v"] if "v" in st else 0)
                grafted = vec(grad) / ((st["v"] / (1 - self.b2 ** (self.t + 1))).sqrt() + self.geps)
                d = d * grafted.norm() / d.norm()
            st["buf"] = d if "buf" not in st else self.mu * st["buf"] + d
            theta = vec(torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1))
            _set_layer(layer, theta - self.lr * (st["buf"] if self.mu else d))
        self.t += 1


class _DenseSOAP:
    def __init__(self, model, lr, betas, eps, beta, period):
        self.__dict__.update(model=model, lr=lr, b1=betas[0], b2=betas[1], eps=eps, beta=beta, period=period)
        self.t, self.state = 0, [dict() for _ in linear_layers(model)]

    def step(self, x, y):
        for layer, st, grad in zip(linear_layers(self.model), self.state, _layer_gradients(self.model, x, y)):
            left, right = grad @ grad.T, grad.T @ grad
            if "L" in st:
                left, right = self.beta * st["L"] + (1 - self.beta) * left, self.beta * st["R"] + (1 - self.beta) * right
            st["L"], st["R"] = left, right
            if self.t % self.period == 0:
                basis = kron(torch.linalg.eigh(right)[1], torch.linalg.eigh(left)[1])  # vec(Q_Lᵀ Γ Q_R) = (Q_R ⊗ Q_L)ᵀ vec Γ
                if "Q" in st:
                    turn = basis.T @ st["Q"]          # old coordinates → new: m exactly, v as a diagonal covariance
                    st["m"], st["v"] = turn @ st["m"], turn.square() @ st["v"]
                st["Q"] = basis
            rotated = st["Q"].T @ vec(grad)
            st["m"] = (1 - self.b1) * rotated + (self.b1 * st["m"] if "m" in st else 0)
            st["v"] = (1 - self.b2) * rotated ** 2 + (self.b2 * st["v"] if "v" in st else 0)
            k = self.t + 1
            adam = (st["m"] / (1 - self.b1 ** k)) / ((st["v"] / (1 - self.b2 ** k)).sqrt() + self.eps)
            theta = vec(torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1))
            _set_layer(layer, theta - self.lr * (st["Q"] @ adam))
        self.t += 1


def _run_against(opt, model, dense, reference, steps=7, seed=0, atol=1e-10):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x, y = torch.randn(N, SIZES[0], generator=g, **F64), torch.randn(N, SIZES[-1], generator=g, **F64)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        dense.step(x, y)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=atol), t


@pytest.mark.parametrize("weight_grads", [False, True])
@pytest.mark.parametrize("grafting, momentum, decay", [("none", 0.0, 0.9), ("sgd", 0.8, None), ("adam", 0.5, 0.7)])
def test_shampoo_matches_the_dense_kronecker_power(weight_grads, grafting, momentum, decay):
    torch.manual_seed(0)
    model = mlp(SIZES, activation="tanh").double()
    reference = copy.deepcopy(model)
    hyper = dict(lr=0.02, damping=1e-3, momentum=momentum, factor_decay=decay, root_period=3, grafting=grafting)
    opt = Shampoo(model, weight_grads=weight_grads, **hyper)
    dense = _DenseShampoo(reference, 0.02, 1e-3, momentum, decay, 3, grafting)
    _run_against(opt, model, dense, reference)  # 7 steps: roots at 0, 3, 6 and stale roots between


@pytest.mark.parametrize("weight_grads, period, atol", [(True, 2, 1e-10), (False, 1, 1e-6)])
def test_soap_is_adam_in_the_dense_rotated_space(weight_grads, period, atol):
    """Against the dense re-implementation. With ``weight_grads=True`` SOAP forms ``Γ`` as the reference does and the
    two agree to rounding, bases at 0, 2, 4, 6 (m and v carried across three changes). Without it, the 12→8 layer
    (wider than the 6 examples) works through the n rows of ``Γ``: the same numbers up to rounding, but a factor of a
    few minibatches is singular, and ``eigh`` picks its null-space basis from the rounding; a gradient that reaches
    that subspace later is then rotated differently, and Adam's per-coordinate scaling is not invariant to it (a
    property of SOAP, not of the code). With a basis refreshed at every step the subspace is never reached before
    the next refresh and the two agree to 1e-6 (a wrong rotation or factor moves them by ≈ lr = 1e-2)."""
    torch.manual_seed(1)
    model = mlp(SIZES, activation="tanh").double()
    reference = copy.deepcopy(model)
    opt = SOAP(model, lr=0.01, betas=(0.8, 0.9), eps=1e-6, factor_decay=0.7, eigenbasis_period=period,
               weight_grads=weight_grads)
    dense = _DenseSOAP(reference, 0.01, (0.8, 0.9), 1e-6, 0.7, period)
    _run_against(opt, model, dense, reference, seed=1, atol=atol)


def test_the_minibatch_rows_give_the_products_of_the_formed_gradient():
    """Shampoo's and SOAP's factors ``Γ Γᵀ``, ``Γᵀ Γ`` and SOAP's rotation ``Q_Lᵀ Γ Q_R`` through the n rows of a layer
    wider than its minibatch equal those of the formed ``Γ = gᵀ [h 1]`` (float64)."""
    model = mlp((10, 12, 3), activation="tanh").double()
    opt = SOAP(model, eigenbasis_period=1)
    x = torch.randn(5, 10, **F64)
    _loss(model, x, torch.randn(5, 3, **F64)).backward()
    h, g = opt._captured(0)
    rows = opt._minibatch_rows(h, g)
    assert rows is not None and opt._minibatch_rows(*opt._captured(1)) is None  # 12→3 is narrower than 5 examples
    grad = opt._gradient(opt.param_groups[0], h, g)
    for from_rows, formed in zip(opt._gradient_products(rows), (grad @ grad.T, grad.T @ grad)):
        torch.testing.assert_close(from_rows, formed, rtol=1e-12, atol=1e-14)
    q_left, _ = torch.linalg.qr(torch.randn(12, 12, **F64))
    q_right, _ = torch.linalg.qr(torch.randn(11, 11, **F64))
    torch.testing.assert_close((rows[0] @ q_left).T @ (rows[1] @ q_right), q_left.T @ grad @ q_right,
                               rtol=1e-12, atol=1e-14)


def test_soap_carries_the_moments_across_a_basis_change():
    # after a refresh, the first moment is the old one expressed in the new coordinates (exactly), and the second
    # moment keeps its sum (the rows of P∘P sum to one for an orthogonal P)
    torch.manual_seed(2)
    model = mlp((3, 4, 2), activation="tanh").double()
    opt = SOAP(model, eigenbasis_period=2, factor_decay=0.5)
    x, y = torch.randn(5, 3, **F64), torch.randn(5, 2, **F64)
    for t in range(2):
        opt.zero_grad()
        _loss(model, x * (t + 1), y).backward()
        opt.step()
    st = opt.state[model[0].weight]
    old = {k: st[k].clone() for k in ("Q_L", "Q_R", "exp_avg", "exp_avg_sq")}
    opt.zero_grad()
    _loss(model, -x, y).backward()
    opt.step()  # refresh at update 2
    st = opt.state[model[0].weight]
    assert not torch.allclose(st["Q_L"].abs(), old["Q_L"].abs())  # the basis did move
    beta1, beta2 = opt.param_groups[0]["betas"]
    carried = st["Q_L"].T @ old["Q_L"] @ old["exp_avg"] @ (st["Q_R"].T @ old["Q_R"]).T
    # m_new = β₁ · carried + (1 − β₁) · Γ', v_new = β₂ · v_carried + (1 − β₂) · Γ'²: solving each for Γ' must agree
    v_carried = (st["Q_L"].T @ old["Q_L"]).square() @ old["exp_avg_sq"] @ (st["Q_R"].T @ old["Q_R"]).square().T
    assert torch.allclose(v_carried.sum(), old["exp_avg_sq"].sum(), rtol=1e-12)
    rotated_sq = (st["exp_avg_sq"] - beta2 * v_carried) / (1 - beta2)
    rotated = (st["exp_avg"] - beta1 * carried) / (1 - beta1)
    assert torch.allclose(rotated.square(), rotated_sq, atol=1e-10)  # both are the same new-basis gradient


def test_shampoo_with_one_gradient_is_the_polar_factor():
    # one update, one set of factors L = ΓΓᵀ, R = ΓᵀΓ: with Γ = U Σ Vᵀ, L^(-1/4) Γ R^(-1/4) = U Σ^(-1/2) Σ Σ^(-1/2) Vᵀ
    # = U Vᵀ (all singular values set to one); with a tiny ε the step is that up to O(ε/σ_min²)
    torch.manual_seed(3)
    model = mlp((4, 3), activation="tanh").double()
    x, y = torch.randn(6, 4, **F64), torch.randn(6, 3, **F64)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    opt = Shampoo(model, lr=1.0, damping=1e-14, momentum=0.0, factor_decay=None, root_period=1)
    opt.zero_grad()
    _loss(model, x, y).backward()
    grad = _gradient_of(w, b, x, y)
    opt.step()
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    step = torch.cat([w - model[0].weight, (b - model[0].bias)[:, None]], 1)
    assert torch.allclose(step, u @ vh, atol=1e-6)


def _gradient_of(w, b, x, y):
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = ((x @ w.T + b - y) ** 2).sum(1).mean()
    gw, gb = torch.autograd.grad(loss, [w, b])
    return torch.cat([gw, gb[:, None]], 1)


@pytest.mark.parametrize("name, hyper", [
    ("shampoo", dict(root_period=2, grafting="adam")),
    ("soap", dict(eigenbasis_period=2)),
])
def test_state_dict_round_trip_resumes_identically(name, hyper):
    torch.manual_seed(4)
    model = mlp((3, 5, 2), activation="tanh").double()
    x, y = torch.randn(8, 3, **F64), torch.randn(8, 2, **F64)

    def step(opt, model, t):
        opt.zero_grad()
        _loss(model, x * (1 + 0.1 * t), y).backward()
        opt.step()

    opt = make_optimizer(name, model, **hyper)
    for t in range(3):
        step(opt, model, t)
    clone = copy.deepcopy(model)
    clone_opt = make_optimizer(name, clone, **hyper)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(3, 7):  # crosses refreshes
        step(opt, model, t)
        step(clone_opt, clone, t)
        for p, q in zip(model.parameters(), clone.parameters()):
            assert torch.equal(p, q)


def test_bad_input_is_refused_with_clear_messages():
    model = mlp((3, 4, 2)).double()
    with pytest.raises(ValueError, match="grafting must be one of"):
        Shampoo(model, grafting="adagrad")
    with pytest.raises(ValueError, match="damping must be positive"):
        Shampoo(model, damping=0.0)
    with pytest.raises(ValueError, match="root_period"):
        Shampoo(model, root_period=0)
    with pytest.raises(ValueError, match="factor_decay"):
        Shampoo(model, factor_decay=1.0)
    with pytest.raises(ValueError, match="betas"):
        SOAP(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="factor_decay"):
        SOAP(model, factor_decay=None)
    with pytest.raises(ValueError, match="eigenbasis_period"):
        SOAP(model, eigenbasis_period=0)
    opt = Shampoo(model)
    with pytest.raises(RuntimeError, match="no captured"):
        opt.step()


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_trains_the_autoencoder_on_the_sample_smoke(name):
    # smoke only: a few updates of the registry's defaults on the deep autoencoder, no divergence, loss goes down
    from fso_lib.data import load_mnist
    images = load_mnist(sample=True).train_images[:400]
    model = deep_autoencoder(seed=0)
    opt = make_optimizer(name, model)
    losses = []
    for step in range(12):
        x = images[(step * 100) % 400:(step * 100) % 400 + 100]
        opt.zero_grad()
        loss = ((model(x) - x) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def _cxx_compiler():
    import os
    import shutil
    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


@pytest.mark.skipif(_cxx_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize("name, hyper", [
    ("shampoo", dict(root_period=3)),
    ("soap", dict(eigenbasis_period=3)),
    ("ekfac", dict(statistics_period=2, eigenbasis_period=4, scale_period=2)),
])
def test_a_compiled_step_gives_the_eager_steps(name, hyper):
    # the refreshes (eigh) run eagerly before the compiled steady-state part; float64, so that SOAP's division of
    # round-off by eps (see its docstring) stays far below the tolerance
    from fso_lib.optim import needs_statistics
    torch.manual_seed(0)
    model = mlp((8, 16, 4, 8), activation="sigmoid").double()
    clone = copy.deepcopy(model)
    eager = make_optimizer(name, model, check_every=None, **hyper)
    compiled = make_optimizer(name, clone, check_every=None, **hyper).compile_step()
    g = torch.Generator().manual_seed(1)
    for t in range(8):  # crosses refreshes at 0, 3, 6 (EKFAC: 0, 4)
        x, x_stats = torch.rand(32, 8, generator=g, **F64), torch.rand(32, 8, generator=g, **F64)
        for net, opt in ((model, eager), (clone, compiled)):
            torch.manual_seed(t)  # EKFAC samples its targets
            if needs_statistics(opt):
                opt.update_statistics(x_stats)
            opt.zero_grad()
            _loss(net, x, x).backward()
            opt.step()
        for p, q in zip(model.parameters(), clone.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-7), t
