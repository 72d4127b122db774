"""The damped input-covariance inverse in dense and Woodbury form (fso_lib.optim.inverse), and the optimizers
that use it: ACP in both forms, and the natural neural network with its whitening implicit."""
import copy

import pytest
import torch

from fso_lib.models import deep_autoencoder
from fso_lib.optim import ACP, CovarianceInverse, NaturalNeuralNetwork, inverse_form, make_optimizer
from fso_lib.optim.natural import WhitenedLinear

F64 = dict(dtype=torch.float64)


def _centered(m, n_in, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, rank or n_in, generator=g, **F64) @ torch.randn(rank or n_in, n_in, generator=g, **F64)
    rows = rows + 3.0  # a mean far from 0, removed below
    return rows - rows.mean(dim=0)


def test_the_form_is_chosen_by_multiply_adds():
    # the deep autoencoder's statistics minibatch of 200: Woodbury for the 500-, 784- and 1000-wide inputs only
    assert [inverse_form(200, n) for n in (30, 250, 500, 784, 1000)] == ["dense", "dense", "woodbury", "woodbury", "woodbury"]
    assert inverse_form(200, 1000, "dense") == "dense" and inverse_form(2000, 30, "woodbury") == "woodbury"
    with pytest.raises(ValueError, match="inverse form"):
        inverse_form(10, 10, "cholesky")


@pytest.mark.parametrize("m, n_in, rank", [(12, 40, None), (12, 40, 5), (50, 20, None), (7, 7, 3)])
@pytest.mark.parametrize("epsilon", [1e-3, 0.5])
def test_both_forms_apply_the_damped_inverse(m, n_in, rank, epsilon):
    centered = _centered(m, n_in, rank)
    exact = torch.linalg.inv(centered.T @ centered / m + epsilon * torch.eye(n_in, **F64))
    rows = torch.randn(9, n_in, **F64)
    # float64 rounding grows with the condition number (largest eigenvalue + ε) / ε of the damped matrix
    condition = float((torch.linalg.eigvalsh(centered.T @ centered / m).max() + epsilon) / epsilon)
    tol = dict(rtol=1e-14 * condition, atol=1e-14 * condition * float(exact.abs().max()))
    for form in ("dense", "woodbury"):
        inverse = CovarianceInverse.from_centered(centered, epsilon, form=form)
        assert inverse.form == form
        torch.testing.assert_close(inverse.apply(rows), rows @ exact, **tol)
        torch.testing.assert_close(inverse.apply(rows, scale=0.25), 0.25 * rows @ exact, **tol)
        torch.testing.assert_close(inverse.dense(), exact, **tol)
        # a tensor ε (ACP's heuristic α keeps it on the device) gives the same numbers
        tensor_eps = CovarianceInverse.from_centered(centered, torch.tensor(epsilon, **F64), form=form)
        torch.testing.assert_close(tensor_eps.apply(rows), rows @ exact, **tol)


def test_state_round_trip_holds_tensors_only():
    centered = _centered(6, 20)
    for form in ("dense", "woodbury"):
        inverse = CovarianceInverse.from_centered(centered, 0.1, form=form)
        state = inverse.to_state()
        assert all(v is None or isinstance(v, (torch.Tensor, float)) for v in state.values())
        again = CovarianceInverse.from_state(state)
        assert again.form == form
        rows = torch.randn(3, 20, **F64)
        torch.testing.assert_close(again.apply(rows), inverse.apply(rows))
        CovarianceInverse.clear_state(state)
        assert CovarianceInverse.from_state(state) is None


SIZES = (96, 64, 32, 8, 32, 64, 96)  # at a statistics minibatch of 24, the 96- and 64-wide inputs take Woodbury


def _steps(opt, model, n_steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    changes = []
    for k in range(n_steps):
        x = torch.rand(24, SIZES[0], generator=g).to(dtype)
        x_stats = torch.rand(24, SIZES[0], generator=g).to(dtype)
        if opt.needs_statistics():
            opt.update_statistics(x_stats)
        before = _effective(model)
        opt.zero_grad()
        (model(x) - x).square().sum(dim=1).mean().backward()
        opt.step()
        changes.append([a - b for a, b in zip(_effective(model), before)])
    return changes


def _effective(model):
    """(W, b) of every layer; for a whitened layer its equivalent W = V U, b = d − W μ."""
    out = []
    for m in model.modules():
        if isinstance(m, WhitenedLinear):
            out += [m.effective_weight(), m.effective_bias()]
        elif isinstance(m, torch.nn.Linear):
            out += [m.weight.detach().clone(), m.bias.detach().clone()]
    return out


@pytest.mark.parametrize("alpha", [None, 2.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_acp_gives_the_same_updates_in_both_forms(alpha, momentum):
    runs = {}
    for form in ("dense", "woodbury"):
        model = deep_autoencoder(SIZES, seed=0).double()
        opt = ACP(model, lr=0.05, damping=0.01, alpha=alpha, amortization_period=3, momentum=momentum, inverse_form=form)
        runs[form] = _steps(opt, model, 7, torch.float64)
    for a, b in zip(runs["dense"], runs["woodbury"]):
        for da, db in zip(a, b):
            torch.testing.assert_close(da, db, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("form", ["dense", "woodbury"])
def test_implicit_whitening_gives_the_updates_of_the_whitened_layers(momentum, form):
    """natural_nn_implicit (plain layers, ΔW = gᵀ(h − μ)(C + εI)⁻¹) against natural_nn (WhitenedLinear layers,
    gradient descent on V and d) in float64: the same equivalent (W, b) at every step, across re-whitenings."""
    hyper = dict(lr=0.05, damping=0.05, amortization_period=3, momentum=momentum)
    whitened_model = deep_autoencoder(SIZES, seed=0).double()
    implicit_model = copy.deepcopy(whitened_model)
    whitened = _steps(NaturalNeuralNetwork(whitened_model, **hyper), whitened_model, 7, torch.float64)
    opt = make_optimizer("natural_nn_implicit", implicit_model, inverse_form=form, **hyper)
    implicit = _steps(opt, implicit_model, 7, torch.float64)
    assert all(p.grad is None for p in implicit_model.parameters() if p.dim() == 2)  # no weight GEMM in backward
    for k, (a, b) in enumerate(zip(whitened, implicit)):
        for da, db in zip(a, b):
            torch.testing.assert_close(da, db, rtol=1e-8, atol=1e-10, msg=f"update {k}")
    for a, b in zip(_effective(whitened_model), _effective(implicit_model)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_implicit_whitening_in_float32_follows_float64():
    hyper = dict(lr=0.05, damping=0.05, amortization_period=3, momentum=0.9)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        model = deep_autoencoder(SIZES, seed=0).to(dtype)
        runs[dtype] = _steps(make_optimizer("natural_nn_implicit", model, **hyper), model, 7, dtype)
    for a, b in zip(runs[torch.float32], runs[torch.float64]):
        for da, db in zip(a, b):
            assert torch.allclose(da.double(), db, rtol=0, atol=1e-6 + 1e-4 * float(db.abs().max()))


def test_implicit_whitening_refuses_a_whitened_model():
    model = deep_autoencoder(SIZES, seed=0)
    NaturalNeuralNetwork(model)  # whitens in place
    with pytest.raises(Exception, match="plain nn.Linear"):
        NaturalNeuralNetwork(model, whitened_layers=False)


@pytest.mark.parametrize("form", ["dense", "woodbury"])
def test_a_small_damping_on_float32_statistics_is_retried_from_the_rows_in_float64(form):
    """A float32 product S Sᵀ (or SᵀS) of centered MNIST rows has negative eigenvalues of the order of its rounding
    error (about -1.6e-4 here, against 1.1e3 at the top). With a damping below that, the float32 Cholesky fails,
    and so does the float64 Cholesky of the same matrix cast to float64; forming the matrix again from the rows in
    float64 succeeds (it is positive semi-definite in exact arithmetic). Seen in a run of ACP with adaptive damping."""
    from fso_lib.data import load_mnist

    x = load_mnist(sample=True).train_images[:200].float()
    centered = x - x.mean(0)
    m, epsilon = centered.shape[0], 1e-7
    matrix = centered @ centered.T if form == "woodbury" else centered.T @ centered / m
    shift = epsilon * m if form == "woodbury" else epsilon
    damped = matrix.double() + shift * torch.eye(matrix.shape[0], dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(damped)[1]) > 0  # the float32 matrix, even cast to float64, is indefinite
    inverse = CovarianceInverse.from_centered(centered, epsilon, form=form)
    rows = torch.randn(3, centered.shape[1])
    assert torch.isfinite(inverse.apply(rows)).all()
    # (how accurate the float32 result can be at such a damping is another matter: the condition number of
    # C + εI is about 6e7 here; the checks of the inverse's values are the tests above, at usual dampings)
