"""Exact curvature against references built with torch.autograd.functional, in float64."""
import itertools
import math

import pytest
import torch
from torch import nn

from fso_lib import curvature as C
from fso_lib.losses import (
    BinaryCrossEntropy,
    BinaryCrossEntropyWithLogits,
    CrossEntropy,
    CrossEntropyWithLogits,
    SquaredError,
)
from fso_lib.models import mlp

DT = torch.float64
RTOL = 1e-10


def _rel_close(actual, expected, rtol=RTOL, scale=None):
    """‖actual − expected‖ ≤ rtol · ‖expected‖ (Frobenius), or rtol · scale when a scale is given
    (for matrices that may be exactly zero, such as the residual of a one-layer network)."""
    error = float(torch.linalg.norm(actual - expected))
    scale = float(torch.linalg.norm(expected)) if scale is None else float(scale)
    assert error <= rtol * scale, f"relative error {error / scale:.3e}"


def _model(sizes, activation, loss, seed):
    torch.manual_seed(seed)
    model = mlp(sizes, activation, "identity").to(DT)
    if isinstance(loss, BinaryCrossEntropy):
        model.append(nn.Sigmoid())
    elif isinstance(loss, CrossEntropy):
        model.append(nn.Softmax(dim=-1))
    return model


def _data(model, loss, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model[0].in_features, generator=g, dtype=DT)
    with torch.no_grad():
        f = model(x)
    return x, loss.sample_target(f, g)


# --- references that do not use fso_lib's layout or loss derivatives --------------------------------


def _param_tuple(model):
    return tuple(p.detach().clone() for p in model.parameters())


def _call(model, params, x):
    names = [n for n, _ in model.named_parameters()]
    return torch.func.functional_call(model, dict(zip(names, params)), (x,))


def _assemble(blocks, params):
    """Nested tuple of Hessian blocks (shape_i + shape_j) -> (P, P), row-major tensors in torch order."""
    sizes = [p.numel() for p in params]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                      for i in range(len(params))], 0)


def _reference_hessian(model, loss, x, y):
    params = _param_tuple(model)
    blocks = torch.autograd.functional.hessian(lambda *ps: loss.value(_call(model, ps, x), y), params)
    return _assemble(blocks, params)


def _reference_jacobian(model, x):
    params = _param_tuple(model)
    jac = torch.autograd.functional.jacobian(lambda *ps: _call(model, ps, x), params)
    n, k = jac[0].shape[:2]
    return torch.cat([j.reshape(n, k, -1) for j in jac], dim=2)


def _reference_output_hessians(loss, f, y):
    return torch.stack([torch.autograd.functional.hessian(
        lambda row: loss.per_example(row.unsqueeze(0), y[i:i + 1])[0], f[i]) for i in range(f.shape[0])])


def _reference_per_example_gradients(model, loss, x, y):
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss.per_example(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def _outcomes(loss, k):
    if isinstance(loss, (CrossEntropy, CrossEntropyWithLogits)):
        return [torch.eye(k, dtype=DT)[c] for c in range(k)]
    return [torch.tensor(bits, dtype=DT) for bits in itertools.product([0.0, 1.0], repeat=k)]


def _outcome_probability(loss, f_row, y):
    if isinstance(loss, CrossEntropy):
        return (f_row * y).sum()
    if isinstance(loss, CrossEntropyWithLogits):
        return (torch.softmax(f_row, 0) * y).sum()
    p = f_row if isinstance(loss, BinaryCrossEntropy) else torch.sigmoid(f_row)
    return torch.prod(torch.where(y > 0, p, 1 - p))


def _reference_fisher(model, loss, x):
    """E_x E_{y ~ p_θ(y|x)} [g gᵀ] by summing over every outcome (categorical / Bernoulli), or, for the
    Gaussian of the squared error, (1/σ²) JᵀJ (appendix B.1)."""
    with torch.no_grad():
        f = model(x)
    n, k = f.shape
    if isinstance(loss, SquaredError):
        jac = _reference_jacobian(model, x)
        return torch.einsum("nkp,nkq->pq", jac, jac) / (n * loss.variance)
    total = 0
    for i in range(n):
        for y in _outcomes(loss, k):
            g = _reference_per_example_gradients(model, loss, x[i:i + 1], y.unsqueeze(0))[0]
            total = total + _outcome_probability(loss, f[i], y) * torch.outer(g, g)
    return total / n


# --- cases -----------------------------------------------------------------------------------------

LOSSES = [SquaredError(), SquaredError(scale=0.5), BinaryCrossEntropy(), CrossEntropy(),
          BinaryCrossEntropyWithLogits(), CrossEntropyWithLogits()]
ARCHITECTURES = [([3, 2], "tanh"), ([2, 4, 3], "sigmoid"), ([3, 3, 2, 3], "softplus"), ([2, 3, 3, 2, 2], "tanh"),
                 ([3, 4, 2], "relu"), ([2, 2, 3, 2], "sigmoid")]
# every loss once and every architecture once (depth 1 to 4; tanh, sigmoid, softplus, relu): keeps the file fast
CASES = [(loss, *ARCHITECTURES[i]) for i, loss in enumerate(LOSSES)]


def _case_id(case):
    loss, sizes, act = case
    return f"{loss!r}-{'x'.join(map(str, sizes))}-{act}"


@pytest.fixture(params=CASES, ids=[_case_id(c) for c in CASES])
def problem(request):
    loss, sizes, act = request.param
    seed = CASES.index(request.param)
    model = _model(sizes, act, loss, seed)
    x, y = _data(model, loss, n=4, seed=seed)
    return model, loss, x, y


def test_hessian_matches_autograd(problem):
    model, loss, x, y = problem
    _rel_close(C.hessian(model, loss, x, y), _reference_hessian(model, loss, x, y))


def test_gauss_newton_matches_autograd_jacobians_and_output_hessians(problem):
    model, loss, x, y = problem
    with torch.no_grad():
        f = model(x)
    jac = _reference_jacobian(model, x)
    torch.testing.assert_close(C.output_jacobian(model, x), jac, rtol=1e-12, atol=1e-14)
    expected = torch.einsum("nkp,nkl,nlq->pq", jac, _reference_output_hessians(loss, f, y), jac) / x.shape[0]
    gn = C.gauss_newton(model, loss, x, y)
    _rel_close(gn, expected)
    # PSD (the output Hessians of these losses are PSD), symmetric
    torch.testing.assert_close(gn, gn.T, rtol=0, atol=1e-14)
    eigenvalues = torch.linalg.eigvalsh(gn)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.abs().max()


def test_fisher_matches_exact_expectation_over_model_targets(problem):
    model, loss, x, _ = problem
    fim = C.fisher(model, loss, x)
    _rel_close(fim, _reference_fisher(model, loss, x))
    eigenvalues = torch.linalg.eigvalsh(fim)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.abs().max()


def test_empirical_fisher_and_residual_match_autograd(problem):
    model, loss, x, y = problem
    grads = _reference_per_example_gradients(model, loss, x, y)
    _rel_close(C.per_example_gradients(model, loss, x, y), grads)
    _rel_close(C.empirical_fisher(model, loss, x, y), grads.T @ grads / x.shape[0])
    H = _reference_hessian(model, loss, x, y)
    _rel_close(C.residual(model, loss, x, y), H - C.gauss_newton(model, loss, x, y), scale=torch.linalg.norm(H))
    _rel_close(C.flat_gradient(model, loss, x, y), grads.mean(0))


def test_residual_is_the_output_hessian_term():
    """H − G = (1/n) Σ_i Σ_j (∂l/∂f_j)_i ∇²f_j(x_i) (thesis §3.1.4), each ∇²f_j by autograd."""
    for loss in (SquaredError(), CrossEntropy()):
        model = _model([2, 3, 3], "tanh", loss, 11)
        x, y = _data(model, loss, 3, 11)
        with torch.no_grad():
            dl = loss.output_gradient(model(x), y)
        params = _param_tuple(model)
        expected = 0
        for i in range(x.shape[0]):
            for j in range(dl.shape[1]):
                blocks = torch.autograd.functional.hessian(lambda *ps: _call(model, ps, x[i:i + 1])[0, j], params)
                expected = expected + dl[i, j] * _assemble(blocks, params)
        _rel_close(C.residual(model, loss, x, y), expected / x.shape[0])


def test_residual_vanishes_where_every_example_is_fitted():
    """At a per-example minimum (targets = outputs), ∂l/∂f = 0 and H = G (thesis §3.1.4)."""
    model = _model([3, 4, 2], "tanh", SquaredError(), 3)
    x = torch.randn(5, 3, dtype=DT)
    with torch.no_grad():
        y = model(x)
    H = C.hessian(model, SquaredError(), x, y)
    assert float(torch.linalg.norm(C.residual(model, SquaredError(), x, y))) <= 1e-12 * float(torch.linalg.norm(H))
    y_off = y + 0.5
    assert float(torch.linalg.norm(C.residual(model, SquaredError(), x, y_off))) > 1e-3 * float(torch.linalg.norm(H))


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_gauss_newton_equals_fisher_exactly_when_theory_says_so(loss):
    """Thesis §3.3.2: G = F for the squared error (any scale, with its matching σ²) and for the canonical
    logits losses; not for the probability forms of the cross-entropies."""
    model = _model([3, 4, 3], "tanh", loss, 5)
    x, y = _data(model, loss, 6, 5)
    gn, fim = C.gauss_newton(model, loss, x, y), C.fisher(model, loss, x)
    if loss.canonical:
        _rel_close(gn, fim, 1e-12)
    else:
        assert float(torch.linalg.norm(gn - fim)) > 1e-2 * float(torch.linalg.norm(fim))


def test_fisher_and_hessian_do_not_depend_on_where_the_softmax_sits_but_gauss_newton_does():
    torch.manual_seed(0)
    for logits_loss, prob_loss, link in [(CrossEntropyWithLogits(), CrossEntropy(), nn.Softmax(dim=-1)),
                                         (BinaryCrossEntropyWithLogits(), BinaryCrossEntropy(), nn.Sigmoid())]:
        logits_model = mlp([3, 4, 3], "tanh").to(DT)
        prob_model = nn.Sequential(*logits_model, link)  # same parameter tensors
        x, y = _data(logits_model, logits_loss, 5, 1)
        _rel_close(C.fisher(prob_model, prob_loss, x), C.fisher(logits_model, logits_loss, x))
        _rel_close(C.hessian(prob_model, prob_loss, x, y), C.hessian(logits_model, logits_loss, x, y))
        _rel_close(C.empirical_fisher(prob_model, prob_loss, x, y), C.empirical_fisher(logits_model, logits_loss, x, y))
        gn_p, gn_z = C.gauss_newton(prob_model, prob_loss, x, y), C.gauss_newton(logits_model, logits_loss, x, y)
        assert float(torch.linalg.norm(gn_p - gn_z)) > 1e-2 * float(torch.linalg.norm(gn_z))


def test_cheap_gauss_newton_for_cross_entropy_on_probabilities():
    """With the probability output and one-hot targets, each example's GN term is the outer product of its
    own gradient, so G = empirical Fisher (for any n); it is *not* the outer product of the averaged
    gradient once n > 1, and it fails for the logits output and for soft targets."""
    loss = CrossEntropy()
    model = _model([3, 4, 3], "tanh", loss, 2)
    x, y = _data(model, loss, 5, 2)
    _rel_close(C.gauss_newton(model, loss, x[:1], y[:1]), C.empirical_fisher(model, loss, x[:1], y[:1]))
    g1 = C.flat_gradient(model, loss, x[:1], y[:1])
    _rel_close(C.gauss_newton(model, loss, x[:1], y[:1]), torch.outer(g1, g1))
    _rel_close(C.gauss_newton(model, loss, x, y), C.empirical_fisher(model, loss, x, y))
    g = C.flat_gradient(model, loss, x, y)
    assert float(torch.linalg.norm(C.gauss_newton(model, loss, x, y) - torch.outer(g, g))) > 0.1 * float(torch.norm(g)) ** 2
    soft = torch.softmax(torch.randn(5, 3, dtype=DT), dim=1)
    diff = C.gauss_newton(model, loss, x, soft) - C.empirical_fisher(model, loss, x, soft)
    assert float(torch.linalg.norm(diff)) > 1e-2 * float(torch.linalg.norm(C.gauss_newton(model, loss, x, soft)))
    logits_model = nn.Sequential(*list(model)[:-1])
    diff = C.gauss_newton(logits_model, CrossEntropyWithLogits(), x[:1], y[:1]) - \
        C.empirical_fisher(logits_model, CrossEntropyWithLogits(), x[:1], y[:1])
    assert float(torch.linalg.norm(diff)) > 1e-3


def test_monte_carlo_fisher_approaches_the_closed_form():
    for loss in (SquaredError(), CrossEntropyWithLogits(), BinaryCrossEntropy()):
        model = _model([2, 3, 2], "tanh", loss, 4)
        x, _ = _data(model, loss, 3, 4)
        exact = C.fisher(model, loss, x)
        estimate = C.monte_carlo_fisher(model, loss, x, 3000, torch.Generator().manual_seed(0))
        assert float(torch.linalg.norm(estimate - exact)) < 0.1 * float(torch.linalg.norm(exact))


def test_matrix_free_products_match_dense_matrices(problem):
    model, loss, x, y = problem
    layout = C.parameter_layout(model)
    v = torch.randn(layout.size, dtype=DT, generator=torch.Generator().manual_seed(9))
    _rel_close(C.hessian_vector_product(model, loss, x, y, v), C.hessian(model, loss, x, y) @ v)
    _rel_close(C.gauss_newton_vector_product(model, loss, x, y, v), C.gauss_newton(model, loss, x, y) @ v)
    _rel_close(C.fisher_vector_product(model, loss, x, v), C.fisher(model, loss, x) @ v)
    _rel_close(C.gauss_newton_vector_product(model, loss, x, y, layout.unflatten(v)),
               C.gauss_newton(model, loss, x, y) @ v)


def test_layout_is_torch_order_and_row_major():
    model = mlp([3, 4, 2], "tanh").to(DT)
    layout = C.parameter_layout(model)
    assert layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert layout.size == 3 * 4 + 4 + 4 * 2 + 2 == len(layout)
    assert [(b.layer_name, b.layer_type, b.start, b.stop) for b in layout.blocks] == \
        [("0", "Linear", 0, 16), ("2", "Linear", 16, 26)]
    theta = C.flat_parameters(model)
    W = model[2].weight
    o, i = 1, 3  # W[o, i] sits at offset o * in + i of its slice: vec(Wᵀ) in column-stacking terms
    assert theta[layout.slices["2.weight"].start + o * 4 + i] == W[o, i]
    assert torch.equal(theta[layout.slices["2.weight"]], W.detach().T.T.reshape(-1))
    assert torch.equal(theta[layout.slices["2.weight"]], W.detach().T.transpose(0, 1).flatten())
    assert torch.equal(layout.flatten(layout.unflatten(theta)), theta)
    assert "2.weight" in layout.describe() and "16:24" in layout.describe()
    C.set_flat_parameters(model, theta * 2)
    torch.testing.assert_close(C.flat_parameters(model), theta * 2)


def test_block_diagonal_matches_slicing(problem):
    model, loss, x, y = problem
    layout = C.parameter_layout(model)
    H = _reference_hessian(model, loss, x, y)
    B = C.block_diagonal(H, layout)
    layers = {}
    offset = 0
    for name, p in model.named_parameters():  # reference blocks from parameter names alone
        layers.setdefault(name.split(".")[0], []).append(range(offset, offset + p.numel()))
        offset += p.numel()
    expected = torch.zeros_like(H)
    for ranges in layers.values():
        idx = torch.tensor([r for rng in ranges for r in rng])
        expected[idx.unsqueeze(1), idx] = H[idx.unsqueeze(1), idx]
    assert torch.equal(B, expected)
    blocks = C.diagonal_blocks(H, layout)
    assert len(blocks) == len(layers) and all(b.shape[0] == b.shape[1] for b in blocks)
    per_tensor = C.block_diagonal(H, layout, by="parameter")
    assert torch.count_nonzero(per_tensor) <= torch.count_nonzero(B)
    torch.testing.assert_close(C.curvature_matrix(model, loss, x, y, "hessian", "block_diagonal"), B,
                               rtol=1e-10, atol=1e-12)


def test_curvature_matrix_dispatches():
    loss = CrossEntropyWithLogits()
    model = _model([2, 3, 3], "tanh", loss, 8)
    x, y = _data(model, loss, 4, 8)
    for kind, fn in [("hessian", C.hessian), ("gauss_newton", C.gauss_newton),
                     ("empirical_fisher", C.empirical_fisher), ("residual", C.residual)]:
        torch.testing.assert_close(C.curvature_matrix(model, loss, x, y, kind), fn(model, loss, x, y))
    torch.testing.assert_close(C.curvature_matrix(model, loss, x, kind="fisher"), C.fisher(model, loss, x))
    with pytest.raises(ValueError, match="Unknown kind"):
        C.curvature_matrix(model, loss, x, y, "diagonal")
    with pytest.raises(ValueError, match="needs targets"):
        C.curvature_matrix(model, loss, x, kind="hessian")
    with pytest.raises(ValueError, match="structure"):
        C.curvature_matrix(model, loss, x, y, structure="kfac")


def test_unsupported_layers_and_losses_raise_clear_errors():
    x, y = torch.randn(2, 4, dtype=DT), torch.randn(2, 2, dtype=DT)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1), nn.Linear(3, 2)).to(DT)
    with pytest.raises(C.UnsupportedLayerError, match=r"'1' \(Dropout\)"):
        C.hessian(model, SquaredError(), x, y)
    nested = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Tanh(), nn.BatchNorm1d(3)), nn.Linear(3, 2)).to(DT)
    with pytest.raises(C.UnsupportedLayerError, match=r"'1.1' \(BatchNorm1d\)"):
        C.gauss_newton(nested, SquaredError(), x, y)
    with pytest.raises(C.UnsupportedLayerError, match="Softmax"):
        C.fisher(nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=0)).to(DT), CrossEntropy(), x)
    with pytest.raises(C.UnsupportedLayerError, match="Linear"):
        C.hessian(nn.Linear(4, 2).to(DT), SquaredError(), x, y)
    with pytest.raises(C.UnsupportedLossError, match="MSELoss"):
        C.gauss_newton(mlp([4, 2]).to(DT), nn.MSELoss(), x, y)
    with pytest.raises(C.UnsupportedLossError):
        C.hessian_vector_product(mlp([4, 2]).to(DT), nn.MSELoss(), x, y, torch.zeros(10, dtype=DT))
    # the nested, supported case works
    ok = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 2))).to(DT)
    assert C.hessian(ok, SquaredError(), x, y).shape == (23, 23)
    assert [b.layer_name for b in C.parameter_layout(ok).blocks] == ["0", "1.1"]


def test_block_diagonal_by_parameter_keeps_exactly_each_tensors_own_block():
    """by="parameter": one block per tensor (W and b separately), so the W–b coupling of a layer is zeroed.
    The reference is built from the parameter sizes alone; it fails for per-layer blocks and for zeros."""
    loss = SquaredError()
    model = _model([3, 4, 2], "tanh", loss, 21)
    x, y = _data(model, loss, 5, 21)
    H = C.hessian(model, loss, x, y)
    expected, offset = torch.zeros_like(H), 0
    for _, p in model.named_parameters():
        sl = slice(offset, offset + p.numel())
        expected[sl, sl] = H[sl, sl]
        offset += p.numel()
    per_tensor = C.block_diagonal(H, C.parameter_layout(model), by="parameter")
    assert torch.equal(per_tensor, expected)
    assert torch.count_nonzero(per_tensor) > 0
    per_layer = C.block_diagonal(H, C.parameter_layout(model), by="layer")
    w_b = per_layer[0:12, 12:16]  # layer 0: 0.weight is rows 0:12, 0.bias rows 12:16
    assert torch.count_nonzero(w_b) > 0 and torch.count_nonzero(per_tensor[0:12, 12:16]) == 0
    blocks = C.diagonal_blocks(H, C.parameter_layout(model), by="parameter")
    assert [b.shape[0] for b in blocks] == [p.numel() for p in model.parameters()]


# ----------------------------------------------------------------------------- bad input is refused
def _small_problem(loss=None, n=6):
    loss = loss or SquaredError()
    model = _model([3, 4, 2], "tanh", loss, 30)
    x, y = _data(model, loss, n, 30)
    return model, loss, x, y


DENSE_WITH_TARGETS = [C.hessian, C.gauss_newton, C.empirical_fisher, C.residual, C.per_example_gradients,
                      C.flat_gradient]


@pytest.mark.parametrize("function", DENSE_WITH_TARGETS, ids=lambda f: f.__name__)
def test_targets_with_the_wrong_number_of_rows_or_shape_are_refused(function):
    model, loss, x, y = _small_problem()
    with pytest.raises(ValueError, match=r"x has 6 rows .*expected one target row per example, i.e. y of shape \(6, k\)"):
        function(model, loss, x, y[:5])  # 5 target rows for 6 inputs
    with pytest.raises(ValueError, match=r"expected a target of shape \(n, k\) = \(6, 2\)"):
        function(model, loss, x, y[:, :1])  # a column that would broadcast
    with pytest.raises(ValueError, match=r"y of shape \(6, k\)"):
        function(model, loss, x, y[0])  # one row (k,) for every example


def test_class_labels_as_floats_or_columns_are_refused_by_the_curvature_code():
    loss = CrossEntropyWithLogits()
    model = _model([3, 4, 3], "tanh", loss, 31)
    x = torch.randn(6, 3, dtype=DT)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    assert C.hessian(model, loss, x, labels).shape == (31, 31)
    for bad, message in [(labels.to(DT), "float target must hold probability rows"),
                         (labels[:, None], r"integer class labels must have shape \(n,\) = \(6,\)")]:
        for function in (C.hessian, C.gauss_newton, C.empirical_fisher):
            with pytest.raises(ValueError, match=message):
                function(model, loss, x, bad)


@pytest.mark.parametrize("function", [C.gauss_newton, C.hessian, C.empirical_fisher])
def test_probability_losses_refuse_logits_in_the_curvature_code(function):
    model = _model([3, 4, 2], "tanh", SquaredError(), 32)  # no sigmoid: outputs are logits, outside (0, 1)
    x = torch.randn(6, 3, dtype=DT) * 3
    y = torch.ones(6, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"BinaryCrossEntropy takes probabilities.*\(0, 1\)"):
        function(model, BinaryCrossEntropy(), x, y)
    with pytest.raises(ValueError, match="CrossEntropy takes"):
        C.fisher(model, CrossEntropy(), x)


def test_non_finite_inputs_are_named():
    model, loss, x, y = _small_problem()
    v = torch.zeros(C.parameter_layout(model).size, dtype=DT)
    bad_x, bad_y = x.clone(), y.clone()
    bad_x[2, 1], bad_y[0, 0] = math.nan, math.inf
    calls = {
        "hessian": lambda a, b: C.hessian(model, loss, a, b),
        "gauss_newton": lambda a, b: C.gauss_newton(model, loss, a, b),
        "empirical_fisher": lambda a, b: C.empirical_fisher(model, loss, a, b),
        "hvp": lambda a, b: C.hessian_vector_product(model, loss, a, b, v),
        "gnvp": lambda a, b: C.gauss_newton_vector_product(model, loss, a, b, v),
        "fisher": lambda a, b: C.fisher(model, loss, a),
        "fvp": lambda a, b: C.fisher_vector_product(model, loss, a, v),
        "monte_carlo": lambda a, b: C.monte_carlo_fisher(model, loss, a, 2),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="input x contains non-finite values"):
            call(bad_x, y)
        if name not in ("fisher", "fvp", "monte_carlo"):
            with pytest.raises(ValueError, match="target y contains non-finite values"):
                call(x, bad_y)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="parameter '0.weight' contains non-finite values"):
        C.gauss_newton(model, loss, x, y)
