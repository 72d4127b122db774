"""EKFAC (George et al. 2018) against dense references in float64: its block in K-FAC's eigenbasis
(``kron.factored_block(kind="ekfac")``), the optimizer's update, its schedules and state_dict."""
import copy

import pytest
import torch

from fso_lib.kron import augment, backward_factors, factored_block, kron, preactivation_jacobians, relative_error, vec
from fso_lib.losses import SquaredError
from fso_lib.models import deep_autoencoder, linear_layers, mlp
from fso_lib.optim import EKFAC, KFAC, DivergenceError, kfac_product_order, make_optimizer, needs_statistics
from reference_checks import layer_inputs_and_gradients, mean_squared_error

F64 = dict(dtype=torch.float64)
# every (left, right) association of the projection occurs without autograd's gradient, and both pure orders with it
SIZES, N = (3, 12, 8, 4, 2), 6


def _layer_blocks(seed, sizes, n):
    """(h, B_i) of every layer of a random tanh MLP on n random inputs, with the squared error's output Hessian."""
    torch.manual_seed(seed)
    model = mlp(sizes, activation="tanh").double()
    x, y = torch.randn(n, sizes[0], **F64), torch.randn(n, sizes[-1], **F64)
    out, inputs, jacs = preactivation_jacobians(model, x)
    hessians = SquaredError().output_hessian(out, y)
    return [(h, backward_factors(jac, hessians)) for h, jac in zip(inputs, jacs)]


def _diagonal_in_kfac_basis(h, b_factors):
    """Definition, dense: Q diag(diag(Qᵀ F Q)) Qᵀ with F the exact block and Q = U_A ⊗ U_B (K-FAC's eigenbasis)."""
    exact = factored_block(h, b_factors, "sum_of_kronecker")
    ha = augment(h)
    _, u_a = torch.linalg.eigh(ha.T @ ha / len(h))
    _, u_b = torch.linalg.eigh(b_factors.mean(0))
    q = kron(u_a, u_b)
    return q @ torch.diag(torch.diagonal(q.T @ exact @ q)) @ q.T


@pytest.mark.parametrize("sizes, n", [((3, 5, 2), 4), ((4, 3, 3, 2), 10), ((2, 6, 1), 3)])
def test_ekfac_block_is_the_best_diagonal_in_kfac_basis_and_beats_kfac(sizes, n):
    # Both blocks are diagonal in the basis Q = U_A ⊗ U_B: K-FAC's diagonal is Λ_A ⊗ Λ_B, EKFAC's is diag(Qᵀ F Q).
    # ‖F − Q D Qᵀ‖_F = ‖Qᵀ F Q − D‖_F (Q orthogonal), and over diagonal D that is smallest when D holds the
    # diagonal of Qᵀ F Q: the orthogonal projection onto the diagonal matrices. So EKFAC's error ≤ K-FAC's, always.
    margins = []
    for seed in range(20):
        for h, b_factors in _layer_blocks(seed, sizes, n):
            exact = factored_block(h, b_factors, "sum_of_kronecker")
            ekfac = factored_block(h, b_factors, "ekfac")
            assert torch.allclose(ekfac, _diagonal_in_kfac_basis(h, b_factors), atol=1e-12)
            kfac = factored_block(h, b_factors, "kfac")
            e_ekfac, e_kfac = relative_error(ekfac, exact), relative_error(kfac, exact)
            assert e_ekfac <= e_kfac + 1e-12
            # the residual of EKFAC is orthogonal to every matrix diagonal in the basis (projection)
            assert abs(float(((exact - ekfac) * (ekfac - kfac)).sum())) < 1e-10 * float(exact.square().sum())
            margins.append(e_kfac - e_ekfac)
    assert max(margins) > 1e-3  # the inequality is strict somewhere: the two blocks differ on these nets


def test_with_one_example_ekfac_kfac_and_the_exact_block_agree():
    # one example: F = a aᵀ ⊗ B is itself a Kronecker product, so K-FAC is exact and EKFAC (the best diagonal in
    # the basis in which F is diagonal) is F too; this holds for any number of outputs
    for seed in range(5):
        for sizes in [(3, 4, 2), (4, 5, 1)]:
            for h, b_factors in _layer_blocks(seed, sizes, 1):
                exact = factored_block(h, b_factors, "sum_of_kronecker")
                for kind in ("kfac", "ekfac"):
                    assert torch.allclose(factored_block(h, b_factors, kind), exact, atol=1e-12), kind


def _dense_ekfac_direction(h, g, grad, damping):
    """vec Δ = (Q diag(s + ε) Qᵀ)⁻¹ vec ∇ with s = diag(Qᵀ F̂ Q), F̂ = mean_n vec(g_n ã_nᵀ) vec(g_n ã_nᵀ)ᵀ formed
    from the per-example gradients, Q = U_A ⊗ U_G; thesis (column-stacked) order; returns Δ as [W b]."""
    ha = augment(h)
    per_example = torch.stack([kron(a[:, None], gi[:, None]).squeeze(1) for a, gi in zip(ha, g)])  # vec(g ãᵀ) = ã ⊗ g
    fisher = per_example.T @ per_example / len(h)
    _, u_a = torch.linalg.eigh(ha.T @ ha / len(h))
    _, u_g = torch.linalg.eigh(g.T @ g / len(h))
    q = kron(u_a, u_g)
    s = torch.diagonal(q.T @ fisher @ q)
    block = q @ torch.diag(s + damping) @ q.T
    step = torch.linalg.solve(block, vec(grad))
    return step.reshape(grad.shape[1], grad.shape[0]).T


@pytest.mark.parametrize("weight_grads", [False, True])
@pytest.mark.parametrize("kl_clip", [None, 1e-4])
def test_ekfac_update_is_the_damped_inverse_of_its_block(weight_grads, kl_clip):
    torch.manual_seed(0)
    model = mlp(SIZES, activation="tanh").double()
    x, y = torch.randn(N, SIZES[0], **F64), torch.randn(N, SIZES[-1], **F64)
    x_stats, target = torch.randn(N, SIZES[0], **F64), torch.randn(N, SIZES[-1], **F64)
    damping, lr = 0.03, 0.4
    layers = linear_layers(model)
    orders = {kfac_product_order(N, l.in_features, l.out_features, weight_grads) for l in layers}
    assert len(orders) == (2 if weight_grads else 4)  # the shapes reach every association
    hs_stats, gs_stats = layer_inputs_and_gradients(model, x_stats, target)
    hs, gs = layer_inputs_and_gradients(model, x, y)
    before = [torch.cat([l.weight.detach(), l.bias.detach()[:, None]], 1).clone() for l in layers]
    opt = EKFAC(model, lr=lr, damping=damping, momentum=0.0, loss=lambda out: ((out - target) ** 2).sum(1).mean(),
                statistics_period=1, eigenbasis_period=1, scale_period=1, weight_grads=weight_grads, kl_clip=kl_clip)
    opt.update_statistics(x_stats)
    opt.zero_grad()
    mean_squared_error(model, x, y).backward()
    opt.step()
    directions, kl = [], 0.0
    for h_s, g_s, h, g, layer in zip(hs_stats, gs_stats, hs, gs, layers):
        grad = g.T @ augment(h) / len(h)
        direction = _dense_ekfac_direction(h_s, g_s, grad, damping)
        # the same block from kron.factored_block with B_i = g_i g_iᵀ (the sampled loss's per-example factors), + εI
        block = factored_block(h_s, torch.einsum("nr,ns->nrs", g_s, g_s), "ekfac")
        block = block + damping * torch.eye(block.shape[0], **F64)
        from_kron = torch.linalg.solve(block, vec(grad)).reshape(grad.shape[1], grad.shape[0]).T
        assert torch.allclose(direction, from_kron, atol=1e-10)
        directions.append(direction)
        kl += float((direction * grad).sum())
    scale = 1.0 if kl_clip is None else min(1.0, (kl_clip / (lr * lr * kl)) ** 0.5)
    if kl_clip is not None:
        assert scale < 0.9  # the clip is active in this configuration
    for layer, theta, direction in zip(layers, before, directions):
        after = torch.cat([layer.weight, layer.bias[:, None]], 1)
        assert torch.allclose(after, theta - lr * scale * direction, rtol=0, atol=1e-10)


class _DenseEKFAC:
    """The EKFAC recursion written densely (per-example gradients formed, dense Kronecker basis), for one layer list."""

    def __init__(self, model, lr, damping, momentum, rho, stats_every, basis_every, scale_every):
        self.model, self.lr, self.damping, self.momentum, self.rho = model, lr, damping, momentum, rho
        self.stats_every, self.basis_every, self.scale_every = stats_every, basis_every, scale_every
        self.t, self.state = 0, [dict() for _ in linear_layers(model)]

    def step(self, x, y, x_stats, target):
        t = self.t
        due = t % self.stats_every == 0 or t % self.scale_every == 0 or t % self.basis_every == 0
        batch = layer_inputs_and_gradients(self.model, x_stats, target) if due else None
        hs, gs = layer_inputs_and_gradients(self.model, x, y)
        for layer, st, k in zip(linear_layers(self.model), self.state, range(len(self.state))):
            if batch is not None:
                h_s, g_s = batch[0][k], batch[1][k]
                ha = augment(h_s)
                a_new, g_new = ha.T @ ha / len(ha), g_s.T @ g_s / len(ha)
                st["A"] = a_new if "A" not in st else self.rho * st["A"] + (1 - self.rho) * a_new
                st["G"] = g_new if "G" not in st else self.rho * st["G"] + (1 - self.rho) * g_new
            new_basis = t % self.basis_every == 0
            if new_basis:
                st["q"] = kron(torch.linalg.eigh(st["A"])[1], torch.linalg.eigh(st["G"])[1])
            if new_basis or t % self.scale_every == 0:
                per_example = torch.stack([kron(a[:, None], gi[:, None]).squeeze(1) for a, gi in zip(augment(h_s), g_s)])
                s = torch.diagonal(st["q"].T @ (per_example.T @ per_example / len(h_s)) @ st["q"])
                st["s"] = s if new_basis else self.rho * st["s"] + (1 - self.rho) * s
            grad = gs[k].T @ augment(hs[k]) / len(hs[k])
            step = st["q"] @ ((st["q"].T @ vec(grad)) / (st["s"] + self.damping))
            st["buf"] = step if "buf" not in st else self.momentum * st["buf"] + step
            theta = vec(torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)) - self.lr * st["buf"]
            w_b = theta.reshape(layer.in_features + 1, layer.out_features).T
            with torch.no_grad():
                layer.weight.copy_(w_b[:, :-1])
                layer.bias.copy_(w_b[:, -1])
        self.t += 1


def test_ekfac_schedules_running_averages_and_momentum_match_the_dense_recursion():
    torch.manual_seed(1)
    model = mlp(SIZES, activation="tanh").double()
    reference = copy.deepcopy(model)
    hyper = dict(lr=0.02, damping=0.05, momentum=0.7)  # small enough that the run stays bounded
    schedule = dict(statistics_period=2, eigenbasis_period=4, scale_period=3, running_average=0.6)
    targets = {}
    opt = EKFAC(model, loss=lambda out: ((out - targets["t"]) ** 2).sum(1).mean(), **hyper, **schedule)
    dense = _DenseEKFAC(reference, hyper["lr"], hyper["damping"], hyper["momentum"], 0.6, 2, 4, 3)
    # more examples than the widest layer: the factors have full rank. With fewer, they have null spaces whose
    # eigenvectors are arbitrary, and a scale estimated from a later batch depends on that arbitrary choice, so
    # that two correct implementations agree only if they round alike.
    n = 2 * max(SIZES)
    for t in range(9):  # crosses two basis refreshes, scale refreshes between them, and steps without statistics
        x, y = torch.randn(n, SIZES[0], **F64), torch.randn(n, SIZES[-1], **F64)
        x_stats, targets["t"] = torch.randn(n, SIZES[0], **F64), torch.randn(n, SIZES[-1], **F64)
        if needs_statistics(opt):
            opt.update_statistics(x_stats)
        opt.zero_grad()
        mean_squared_error(model, x, y).backward()
        opt.step()
        dense.step(x, y, x_stats, targets["t"])
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-10), (t, float((p - q).abs().max()))


def test_ekfac_state_dict_round_trip_resumes_identically():
    torch.manual_seed(2)
    model = mlp((3, 5, 2), activation="tanh").double()
    x, y, x_stats = torch.randn(8, 3, **F64), torch.randn(8, 2, **F64), torch.randn(10, 3, **F64)
    hyper = dict(statistics_period=2, eigenbasis_period=3, scale_period=2)

    def step(opt, model):
        if needs_statistics(opt):
            opt.update_statistics(x_stats)
        opt.zero_grad()
        mean_squared_error(model, x, y).backward()
        opt.step()

    opt = make_optimizer("ekfac", model, **hyper)
    for _ in range(4):
        step(opt, model)
    clone = copy.deepcopy(model)
    clone_opt = make_optimizer("ekfac", clone, **hyper)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert clone_opt.scale_period == 2 and clone_opt.eigenbasis_period == 3
    for _ in range(4):  # crosses a basis refresh and scale refreshes; targets are sampled: same seed in both
        torch.manual_seed(7)
        step(opt, model)
        torch.manual_seed(7)
        step(clone_opt, clone)
        for p, q in zip(model.parameters(), clone.parameters()):
            assert torch.equal(p, q)


def test_ekfac_refuses_bad_input_with_clear_messages():
    model = mlp((3, 4, 2)).double()
    with pytest.raises(ValueError, match="scale_period and eigenbasis_period"):
        EKFAC(model, scale_period=0)
    with pytest.raises(TypeError, match="eigenbasis_period"):
        EKFAC(model, inverse_period=5)
    with pytest.raises(ValueError, match="damping must be positive"):
        EKFAC(model, damping=0.0)
    opt = EKFAC(model)
    mean_squared_error(model, torch.randn(4, 3, **F64), torch.randn(4, 2, **F64)).backward()
    with pytest.raises(RuntimeError, match="update_statistics"):
        opt.step()
    opt = EKFAC(mlp((3, 4, 2)).double(), statistics_period=1)
    x_bad = torch.randn(4, 3, **F64)
    x_bad[0, 0] = float("nan")
    opt.update_statistics(x_bad)
    mean_squared_error(opt.model, torch.randn(4, 3, **F64), torch.randn(4, 2, **F64)).backward()
    with pytest.raises(DivergenceError, match="non-finite"):
        opt.step()


def test_ekfac_is_kfac_when_the_scale_is_kfacs_products():
    # with one statistics example, A = ã ãᵀ and G = g gᵀ, and s = (U_Gᵀ g)²(U_Aᵀ ã)² = λ_G λ_A: EKFAC's block is
    # K-FAC's undamped block. The updates then differ only by the damping (ε on the product vs K-FAC's γ = √ε
    # split with π), so with a tiny damping both are the same pseudo-inverse step in the range of the block
    torch.manual_seed(3)
    model = mlp((3, 4, 2), activation="tanh").double()
    x_stats, target = torch.randn(1, 3, **F64), torch.randn(1, 2, **F64)
    opt = EKFAC(model, statistics_period=1, loss=lambda out: ((out - target) ** 2).sum(1).mean())
    opt.update_statistics(x_stats)
    mean_squared_error(model, torch.randn(5, 3, **F64), torch.randn(5, 2, **F64)).backward()
    opt.step()
    for layer in linear_layers(model):
        st = opt.state[layer.weight]
        products = torch.outer(st["eigenvalues_G"], st["eigenvalues_A"])
        assert torch.allclose(st["scale"], products, atol=1e-12)


def test_ekfac_trains_the_autoencoder_on_the_sample_smoke():
    # smoke only: a few updates of the registry's defaults on the deep autoencoder, no divergence, loss goes down
    from fso_lib.data import load_mnist
    torch.manual_seed(0)
    images = load_mnist(sample=True).train_images[:400]
    model = deep_autoencoder(seed=0)
    opt = make_optimizer("ekfac", model)
    losses = []
    for step in range(12):
        x = images[(step * 100) % 400:(step * 100) % 400 + 100]
        if needs_statistics(opt):
            opt.update_statistics(images[(step * 37) % 300:(step * 37) % 300 + 100])
        opt.zero_grad()
        loss = ((model(x) - x) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_matrix_free_relative_errors_match_the_dense_blocks():
    from fso_lib.kron import relative_errors_matrix_free
    for seed in range(4):
        for h, b_factors in _layer_blocks(seed, (4, 5, 3), 7):
            exact = factored_block(h, b_factors, "sum_of_kronecker")
            matrix_free = relative_errors_matrix_free(h, b_factors)
            for kind in ("kfac", "acp", "ekfac"):
                # a difference of squares: an error of 0 comes out as about √(machine ε) ≈ 1e-8
                assert abs(matrix_free[kind] - relative_error(factored_block(h, b_factors, kind), exact)) < 1e-7, kind
