"""Losses: derivatives against autograd (Tables 3.I, 3.II, appendices A and B), in float64."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fso_lib.losses import (
    LOSSES,
    BinaryCrossEntropy,
    BinaryCrossEntropyWithLogits,
    CrossEntropy,
    CrossEntropyWithLogits,
    SquaredError,
    get_loss,
)

DT = torch.float64
N, K = 4, 3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _outputs_and_targets(loss, soft=False, seed=0):
    """Valid outputs for ``loss`` and targets (hard ones drawn from the model, or soft ones)."""
    g = _gen(seed)
    z = torch.randn(N, K, generator=g, dtype=DT)
    if isinstance(loss, BinaryCrossEntropy):
        f = torch.sigmoid(z)
    elif isinstance(loss, CrossEntropy):
        f = torch.softmax(z, dim=1)
    else:
        f = z
    if soft:
        if isinstance(loss, (CrossEntropy, CrossEntropyWithLogits)):
            y = torch.softmax(torch.randn(N, K, generator=g, dtype=DT), dim=1)
        elif isinstance(loss, (BinaryCrossEntropy, BinaryCrossEntropyWithLogits)):
            y = torch.rand(N, K, generator=g, dtype=DT)
        else:
            y = torch.randn(N, K, generator=g, dtype=DT)
    else:
        y = loss.sample_target(f, g)
    return f, y


ALL_LOSSES = [SquaredError(), SquaredError(scale=0.5), BinaryCrossEntropy(), CrossEntropy(),
              BinaryCrossEntropyWithLogits(), CrossEntropyWithLogits()]


def _autograd_derivatives(loss, f, y):
    grads, hessians = [], []
    for i in range(f.shape[0]):
        fun = lambda row: loss.per_example(row.unsqueeze(0), y[i:i + 1])[0]
        row = f[i].clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fun(row), row)[0])
        hessians.append(torch.autograd.functional.hessian(fun, f[i]))
    return torch.stack(grads), torch.stack(hessians)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_output_gradient_and_hessian_match_autograd(loss, soft):
    f, y = _outputs_and_targets(loss, soft)
    grad, hess = _autograd_derivatives(loss, f, y)
    torch.testing.assert_close(loss.output_gradient(f, y), grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.output_hessian(f, y), hess, rtol=1e-12, atol=1e-12)
    v = torch.randn(N, K, generator=_gen(3), dtype=DT)
    torch.testing.assert_close(loss.output_hessian_product(f, y, v), torch.einsum("nkl,nl->nk", hess, v))
    torch.testing.assert_close(loss.fisher_output_product(f, v),
                               torch.einsum("nkl,nl->nk", loss.fisher_output_matrix(f), v))


def test_value_is_mean_of_per_example():
    for loss in ALL_LOSSES:
        f, y = _outputs_and_targets(loss)
        assert torch.isclose(loss.value(f, y), loss.per_example(f, y).mean())
        assert loss(f, y) == loss.value(f, y)


def test_table_3_1_and_appendix_a_formulas():
    """The thesis's printed expressions, written out literally."""
    f, y = _outputs_and_targets(BinaryCrossEntropy(), soft=True)
    torch.testing.assert_close(BinaryCrossEntropy().output_gradient(f, y), -(y / f - (1 - y) / (1 - f)))
    torch.testing.assert_close(BinaryCrossEntropy().output_hessian(f, y),
                               torch.diag_embed(y / f ** 2 + (1 - y) / (1 - f) ** 2))
    f, y = _outputs_and_targets(CrossEntropy(), soft=True)
    torch.testing.assert_close(CrossEntropy().output_gradient(f, y), -y / f)
    torch.testing.assert_close(CrossEntropy().output_hessian(f, y), torch.diag_embed(y / f ** 2))
    f, y = _outputs_and_targets(SquaredError(), soft=True)
    # Appendix A.1: l = ||f - y||^2 has gradient 2 (f - y); its Hessian is 2 I, and the I of Table 3.I
    # is the Hessian of (1/2) ||f - y||^2.
    torch.testing.assert_close(SquaredError().output_gradient(f, y), 2 * (f - y))
    torch.testing.assert_close(SquaredError().per_example(f, y), ((f - y) ** 2).sum(1))
    eye = torch.eye(K, dtype=DT).expand(N, K, K)
    torch.testing.assert_close(SquaredError().output_hessian(f, y), 2 * eye)
    torch.testing.assert_close(SquaredError(scale=0.5).output_hessian(f, y), eye)


def _outcomes(loss, f):
    """Every possible target of one example with its probability (exact expectation over p(y|x))."""
    k = f.shape[0]
    if isinstance(loss, (CrossEntropy, CrossEntropyWithLogits)):
        p = f if isinstance(loss, CrossEntropy) else torch.softmax(f, 0)
        return [(torch.eye(k, dtype=DT)[c], p[c]) for c in range(k)]
    p = f if isinstance(loss, BinaryCrossEntropy) else torch.sigmoid(f)
    result = []
    for bits in itertools.product([0.0, 1.0], repeat=k):
        y = torch.tensor(bits, dtype=DT)
        result.append((y, torch.prod(torch.where(y > 0, p, 1 - p))))
    return result


@pytest.mark.parametrize("loss", [BinaryCrossEntropy(), CrossEntropy(), BinaryCrossEntropyWithLogits(),
                                  CrossEntropyWithLogits()], ids=repr)
def test_table_3_2_fisher_is_the_exact_expectation_of_the_score_outer_product(loss):
    """Appendix B.2/B.3: E_{y~p(y|x)}[(∂l/∂f)ᵀ(∂l/∂f)] = D(f), summing over every outcome."""
    f, _ = _outputs_and_targets(loss)
    D = loss.fisher_output_matrix(f)
    for i in range(N):
        expected = torch.zeros(K, K, dtype=DT)
        mean_score = torch.zeros(K, dtype=DT)
        total = 0.0
        for y, prob in _outcomes(loss, f[i]):
            g = loss.output_gradient(f[i:i + 1], y.unsqueeze(0))[0]
            expected += prob * torch.outer(g, g)
            mean_score += prob * g
            total += float(prob)
        assert math.isclose(total, 1.0, rel_tol=1e-12)
        torch.testing.assert_close(D[i], expected, rtol=1e-10, atol=1e-12)
        # The score has zero mean, except for the probability form of the multiclass loss: there
        # E[∂l/∂f] = −Σ_c p_c e_c / p_c = −𝟙, a direction that J kills (Σ_j ∂f_j/∂θ = 0 on the simplex).
        zero_mean = torch.full((K,), -1.0 if isinstance(loss, CrossEntropy) else 0.0, dtype=DT)
        torch.testing.assert_close(mean_score, zero_mean, rtol=0, atol=1e-12)


def test_table_3_2_literal_formulas():
    f, _ = _outputs_and_targets(BinaryCrossEntropy())
    torch.testing.assert_close(BinaryCrossEntropy().fisher_output_matrix(f), torch.diag_embed(1 / (f * (1 - f))))
    f, _ = _outputs_and_targets(CrossEntropy())
    torch.testing.assert_close(CrossEntropy().fisher_output_matrix(f), torch.diag_embed(1 / f))


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_squared_error_is_a_gaussian_negative_log_likelihood(scale):
    """Appendix B.1: l = scale ||f − y||² = −log N(y; f, σ² I) + const with σ² = 1/(2 scale), D = I/σ²."""
    loss = SquaredError(scale)
    f, _ = _outputs_and_targets(loss)
    ys = [torch.randn(N, K, generator=_gen(s), dtype=DT) for s in range(3)]
    normal = torch.distributions.Normal(f, loss.variance ** 0.5)
    gaps = [loss.per_example(f, y) + normal.log_prob(y).sum(1) for y in ys]
    torch.testing.assert_close(gaps[0], gaps[1])
    torch.testing.assert_close(gaps[0], gaps[2])
    torch.testing.assert_close(loss.fisher_output_matrix(f), torch.eye(K, dtype=DT).expand(N, K, K) / loss.variance)
    # E[g gᵀ] = 4 scale² E[(y − f)(y − f)ᵀ] = 4 scale² σ² I = 2 scale I, here by Monte Carlo.
    samples = torch.stack([loss.output_gradient(f, loss.sample_target(f, _gen(s))) for s in range(4000)])
    estimate = torch.einsum("snk,snl->nkl", samples, samples) / samples.shape[0]
    assert torch.allclose(estimate, loss.fisher_output_matrix(f), atol=0.1 * 2 * scale)


def test_logits_forms_equal_probability_forms_composed_with_sigmoid_and_softmax():
    z = torch.randn(N, K, generator=_gen(1), dtype=DT)
    for logits_loss, prob_loss, link in [
        (BinaryCrossEntropyWithLogits(), BinaryCrossEntropy(), torch.sigmoid),
        (CrossEntropyWithLogits(), CrossEntropy(), lambda t: torch.softmax(t, dim=-1)),
    ]:
        for soft in (False, True):
            _, y = _outputs_and_targets(logits_loss, soft=soft, seed=5)
            torch.testing.assert_close(logits_loss.per_example(z, y), prob_loss.per_example(link(z), y))
            # the output Hessian of the logits form is the Hessian of the composition (autograd):
            for i in range(N):
                h = torch.autograd.functional.hessian(
                    lambda row: prob_loss.per_example(link(row).unsqueeze(0), y[i:i + 1])[0], z[i])
                torch.testing.assert_close(logits_loss.output_hessian(z, y)[i], h)
            # the Fisher is invariant to the change of output coordinates: D_z = Pᵀ D_p P, P = ∂p/∂z
            for i in range(N):
                P = torch.autograd.functional.jacobian(link, z[i])
                Dp = prob_loss.fisher_output_matrix(link(z[i]).unsqueeze(0))[0]
                torch.testing.assert_close(logits_loss.fisher_output_matrix(z)[i], P.T @ Dp @ P)


def test_canonical_losses_have_output_hessian_equal_to_fisher_and_others_do_not():
    for loss in ALL_LOSSES:
        f, y = _outputs_and_targets(loss)
        same = torch.allclose(loss.output_hessian(f, y), loss.fisher_output_matrix(f))
        assert same == loss.canonical, loss


def test_logits_forms_are_stable_for_large_logits():
    z = torch.tensor([[800.0, -800.0, 0.0]], dtype=DT)
    y = torch.tensor([[0.0, 1.0, 1.0]], dtype=DT)
    value = BinaryCrossEntropyWithLogits().per_example(z, y)
    assert torch.isfinite(value).all() and math.isclose(float(value), 1600 + math.log(2), rel_tol=1e-12)
    value = CrossEntropyWithLogits().per_example(z, torch.tensor([1]))
    assert torch.isfinite(value).all() and math.isclose(float(value), 1600, rel_tol=1e-12)


def test_integer_labels_equal_one_hot_rows():
    z = torch.randn(N, K, generator=_gen(2), dtype=DT)
    labels = torch.tensor([0, 2, 1, 2])
    one_hot = F.one_hot(labels, K).to(DT)
    for loss, f in [(CrossEntropyWithLogits(), z), (CrossEntropy(), torch.softmax(z, 1))]:
        torch.testing.assert_close(loss.per_example(f, labels), loss.per_example(f, one_hot))
        torch.testing.assert_close(loss.output_hessian(f, labels), loss.output_hessian(f, one_hot))
    torch.testing.assert_close(CrossEntropyWithLogits().value(z, labels), F.cross_entropy(z, labels))


def test_sample_target_follows_the_predictive_distribution():
    g = _gen(7)
    p = torch.tensor([[0.2, 0.5, 0.3]], dtype=DT).expand(20000, 3)
    counts = CrossEntropy().sample_target(p, g).mean(0)
    assert torch.allclose(counts, p[0], atol=0.02)
    assert torch.allclose(BinaryCrossEntropy().sample_target(p, g).mean(0), p[0], atol=0.02)
    assert torch.allclose(CrossEntropyWithLogits().sample_target(torch.log(p), g).mean(0), p[0], atol=0.02)
    samples = SquaredError(scale=2.0).sample_target(torch.zeros(20000, 1, dtype=DT), g)
    assert abs(float(samples.var()) - 0.25) < 0.02


def test_cheap_gauss_newton_claim_for_cross_entropy():
    """Thesis §3.3.3 (final version): for one example, a one-hot target and the probability output,
    ∂²l/∂f² = (∂l/∂f)ᵀ(∂l/∂f). It fails for soft targets, for the logits output, and for several
    binary outputs."""
    f, y = _outputs_and_targets(CrossEntropy())
    g = CrossEntropy().output_gradient(f, y)
    torch.testing.assert_close(CrossEntropy().output_hessian(f, y), g.unsqueeze(2) * g.unsqueeze(1))
    f, y = _outputs_and_targets(CrossEntropy(), soft=True)
    g = CrossEntropy().output_gradient(f, y)
    assert not torch.allclose(CrossEntropy().output_hessian(f, y), g.unsqueeze(2) * g.unsqueeze(1))
    z, y = _outputs_and_targets(CrossEntropyWithLogits())
    g = CrossEntropyWithLogits().output_gradient(z, y)
    assert not torch.allclose(CrossEntropyWithLogits().output_hessian(z, y), g.unsqueeze(2) * g.unsqueeze(1))
    f, y = _outputs_and_targets(BinaryCrossEntropy())  # k = 3 independent binary outputs, hard targets
    g = BinaryCrossEntropy().output_gradient(f, y)
    h = BinaryCrossEntropy().output_hessian(f, y)
    torch.testing.assert_close(torch.diagonal(h, dim1=1, dim2=2), g ** 2)  # holds output by output
    assert not torch.allclose(h, g.unsqueeze(2) * g.unsqueeze(1))  # but not as a matrix


def test_get_loss_and_errors():
    assert set(LOSSES) == {"squared_error", "binary_cross_entropy", "cross_entropy",
                           "binary_cross_entropy_with_logits", "cross_entropy_with_logits"}
    assert isinstance(get_loss("cross_entropy"), CrossEntropy)
    assert get_loss("squared_error", scale=0.5).scale == 0.5
    with pytest.raises(ValueError, match="Unknown loss"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="positive"):
        SquaredError(scale=0)
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        SquaredError().value(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))


# ----------------------------------------------------------------------------- targets that do not sum to 1
def test_logits_cross_entropy_scales_with_the_target_mass():
    """For a target row y that does not sum to 1 the loss is −yᵀ log softmax(z) = (Σ_j y_j) logsumexp(z) − yᵀz:
    gradient (Σy) p − y and Hessian (Σy)(diag p − p pᵀ). The reference differentiates −yᵀ log_softmax(z)
    with autograd, so a missing Σy factor in any of the three formulas fails here."""
    g = _gen(11)
    z = torch.randn(N, K, generator=g, dtype=DT)
    y = torch.rand(N, K, generator=g, dtype=DT) * torch.tensor([[0.3], [2.5], [1.0], [4.0]], dtype=DT)
    assert not torch.allclose(y.sum(1), torch.ones(N, dtype=DT), atol=0.1)
    loss = CrossEntropyWithLogits()

    def reference(row, i):
        return -(y[i] * torch.log_softmax(row, dim=0)).sum()

    for i in range(N):
        row = z[i].clone().requires_grad_(True)
        value = reference(row, i)
        grad = torch.autograd.grad(value, row)[0]
        hess = torch.autograd.functional.hessian(lambda r: reference(r, i), z[i])
        torch.testing.assert_close(loss.per_example(z, y)[i], value.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss.output_gradient(z, y)[i], grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss.output_hessian(z, y)[i], hess, rtol=1e-12, atol=1e-12)
        v = torch.randn(K, generator=g, dtype=DT)
        torch.testing.assert_close(loss.output_hessian_product(z, y, v.expand(N, K))[i], hess @ v,
                                   rtol=1e-12, atol=1e-12)
    # the Fisher D does not depend on the target: it stays diag(p) − p pᵀ whatever the mass
    p = torch.softmax(z, 1)
    torch.testing.assert_close(loss.fisher_output_matrix(z), torch.diag_embed(p) - p[:, :, None] * p[:, None, :])


# ----------------------------------------------------------------------------- bad input is refused
REGRESSION_LOSSES = [SquaredError(), BinaryCrossEntropy(), BinaryCrossEntropyWithLogits()]
CLASS_LOSSES = [CrossEntropy(), CrossEntropyWithLogits()]


def _valid_output(loss, n=N, k=K):
    z = torch.randn(n, k, generator=_gen(5), dtype=DT)
    if isinstance(loss, BinaryCrossEntropy):
        return torch.sigmoid(z)
    if isinstance(loss, CrossEntropy):
        return torch.softmax(z, 1)
    return z


def _every_entry_point(loss, f, y):
    v = torch.ones_like(f)
    return [lambda: loss.value(f, y), lambda: loss.per_example(f, y), lambda: loss.output_gradient(f, y),
            lambda: loss.output_hessian(f, y), lambda: loss.output_hessian_product(f, y, v)]


@pytest.mark.parametrize("loss", REGRESSION_LOSSES, ids=repr)
@pytest.mark.parametrize("shape", [(N,), (1, K), (N - 1, K), (N, 1), (N, K, 1)])
def test_regression_targets_of_the_wrong_shape_are_refused(loss, shape):
    f = _valid_output(loss)
    y = torch.rand(shape, generator=_gen(6), dtype=DT)
    for call in _every_entry_point(loss, f, y):
        with pytest.raises(ValueError, match=rf"expected a target of shape \(n, k\) = \({N}, {K}\)"):
            call()


@pytest.mark.parametrize("loss", REGRESSION_LOSSES, ids=repr)
def test_a_1d_target_is_a_column_only_for_a_single_output(loss):
    f = _valid_output(loss, k=1)
    y = torch.rand(N, generator=_gen(6), dtype=DT)
    torch.testing.assert_close(loss.per_example(f, y), loss.per_example(f, y[:, None]))
    torch.testing.assert_close(loss.output_hessian(f, y), loss.output_hessian(f, y[:, None]))
    with pytest.raises(ValueError, match=r"\(n, k\) = \(4, 1\)"):
        loss.value(f, y[:-1])


@pytest.mark.parametrize("loss", CLASS_LOSSES, ids=repr)
def test_class_targets_of_the_wrong_shape_or_dtype_are_refused(loss):
    f = _valid_output(loss)
    labels = torch.tensor([0, 2, 1, 2])
    bad = {
        "float labels (n,)": (labels.to(DT), r"float target must hold probability rows of shape \(n, k\) = \(4, 3\)"),
        "int labels (n, 1)": (labels[:, None], r"integer class labels must have shape \(n,\) = \(4,\)"),
        "int labels, n-1 rows": (labels[:-1], r"integer class labels must have shape \(n,\) = \(4,\)"),
        "rows (1, k)": (torch.full((1, K), 1 / K, dtype=DT), r"shape \(n, k\) = \(4, 3\)"),
        "one-hot rows as int": (F.one_hot(labels, K), r"integer class labels must have shape \(n,\)"),
        "bool labels": (labels > 0, r"integer class labels"),
    }
    for name, (y, message) in bad.items():
        for call in _every_entry_point(loss, f, y):
            with pytest.raises(ValueError, match=message):
                call()
    # the accepted forms agree
    torch.testing.assert_close(loss.output_hessian(f, labels), loss.output_hessian(f, F.one_hot(labels, K).to(DT)))


def test_a_broadcast_target_would_have_given_a_wrong_hessian():
    """Why the shape check exists: float labels (n,) read as a column broadcast over the k classes."""
    z = torch.randn(N, K, generator=_gen(8), dtype=DT)
    labels = torch.tensor([0, 2, 1, 2])
    broadcast = labels.to(DT)[:, None].expand(N, K)  # what the old code silently used
    right = CrossEntropyWithLogits().output_hessian(z, labels)
    wrong = broadcast.sum(1)[:, None, None] * CrossEntropyWithLogits().fisher_output_matrix(z)
    assert not torch.allclose(right, wrong)


@pytest.mark.parametrize("values", [[[0.2, 1.3]], [[-0.1, 0.5]], [[0.0, 0.5]], [[1.0, 0.5]], [[math.nan, 0.5]]])
def test_binary_cross_entropy_refuses_outputs_outside_0_1(values):
    f = torch.tensor(values, dtype=DT)
    y = torch.ones_like(f)
    loss = BinaryCrossEntropy()
    calls = _every_entry_point(loss, f, y) + [lambda: loss.fisher_output_matrix(f),
                                              lambda: loss.fisher_output_product(f, y), lambda: loss.sample_target(f)]
    for call in calls:
        with pytest.raises(ValueError, match=r"probabilities, every output in \(0, 1\).*BinaryCrossEntropyWithLogits"):
            call()


@pytest.mark.parametrize("values", [[[1.2, -0.2]], [[0.0, 1.0]], [[0.5, 0.6]], [[math.inf, 0.5]]])
def test_cross_entropy_refuses_outputs_off_the_simplex(values):
    f = torch.tensor(values, dtype=DT)
    loss = CrossEntropy()
    calls = _every_entry_point(loss, f, torch.tensor([0])) + [
        lambda: loss.fisher_output_matrix(f), lambda: loss.fisher_output_product(f, f), lambda: loss.sample_target(f)]
    for call in calls:
        with pytest.raises(ValueError, match="CrossEntropy takes .*CrossEntropyWithLogits"):
            call()


def test_probability_checks_accept_saturated_but_valid_outputs():
    # a float32 softmax row can hold an exact 1 next to tiny positive entries: still a valid distribution
    f = torch.softmax(torch.tensor([[40.0, 0.0, 0.0]]), 1)
    assert f[0, 0] == 1.0 and float(CrossEntropy().value(f, torch.tensor([0]))) == 0.0
    assert torch.isfinite(CrossEntropy().fisher_output_matrix(f)).all()
    # the logits form samples from a softmax that underflows to exact zeros without complaint
    assert CrossEntropyWithLogits().sample_target(torch.tensor([[0.0, -200.0]]), _gen(0)).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_products_refuse_vectors_that_would_broadcast(loss):
    f, y = _outputs_and_targets(loss)
    for v in (torch.ones(K, dtype=DT), torch.ones(1, K, dtype=DT), torch.ones(N, 1, dtype=DT)):
        with pytest.raises(ValueError, match=r"one vector per example, of shape \(n, k\) = \(4, 3\)"):
            loss.output_hessian_product(f, y, v)
        with pytest.raises(ValueError, match=r"one vector per example"):
            loss.fisher_output_product(f, v)
