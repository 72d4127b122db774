"""Weight directions applied without being formed (``fso_lib.optim.low_rank``, issue 11).

In their large-batch orders ACP, the implicit natural neural network, centered GD and K-FAC return ``ΔW`` as the
unformed product ``leftᵀ right`` and the optimizer adds it to ``W`` (or to the momentum buffer) with one
``addmm_``. Checked here, in float64 on a small autoencoder whose wide layers take those orders:

* every update equals the one obtained when the same directions are formed first (the former path), with and
  without momentum, across a statistics refresh and an inversion, and with K-FAC's KL clipping active;
* K-FAC's factored KL term equals ``⟨ΔW, ∇_W⟩ + ⟨Δb, ∇_b⟩`` with both formed;
* the non-finite test: a product that overflows is flagged although both factors are finite, a finite one is not;
  a skipped step leaves the parameters and the momentum buffers as they were.
"""
import pytest
import torch

from fso_lib.models import deep_autoencoder
from fso_lib.optim import make_optimizer, needs_statistics, prepare_model
from fso_lib.optim.low_rank import LowRankDirection, as_dense, finiteness_probe
from fso_lib.training import training_step

SIZES = (40, 30, 16, 4, 16, 30, 40)   # at minibatch 8 the wide layers take the large-batch orders
N = 8
F64 = dict(dtype=torch.float64)

CASES = [
    ("acp", dict(lr=0.01, damping=1e-3, amortization_period=3)),
    ("acp", dict(lr=0.01, damping=1e-3, amortization_period=3, momentum=0.9)),
    ("natural_nn_implicit", dict(lr=0.01, damping=1e-3, amortization_period=3, momentum=0.9)),
    ("centered_gd", dict(lr=0.05)),
    ("centered_gd", dict(lr=0.05, momentum=0.9)),
    ("kfac", dict(lr=0.01, damping=1e-2, momentum=0.9, statistics_period=2, inverse_period=3)),
    ("kfac", dict(lr=0.01, damping=1e-2, momentum=0.0, statistics_period=2, inverse_period=3, kl_clip=1e-7)),
]


def _squared_error(output, target):
    return (output - target).square().sum(dim=1).mean()


def _train(name, hyper, form_directions, steps=7):
    """Parameters after ``steps`` updates; ``form_directions``: every low-rank direction is formed before the
    optimizer sees it (the path of the library before it learned to apply them unformed). Returns the
    parameters and how many low-rank directions the optimizer's layer updates returned."""
    torch.manual_seed(0)
    model = prepare_model(name, deep_autoencoder(SIZES, seed=0).double())
    opt = make_optimizer(name, model, **hyper)
    layer_update, counted = opt._layer_update, []

    def counting_layer_update(k, group, h, g):
        pair = layer_update(k, group, h, g)
        counted.extend(isinstance(d, LowRankDirection) for d in pair)
        return tuple(as_dense(d) for d in pair) if form_directions else pair

    opt._layer_update = counting_layer_update
    generator = torch.Generator().manual_seed(1)
    for k in range(steps):
        x, x_stats = torch.rand(N, SIZES[0], generator=generator, **F64), torch.rand(N, SIZES[0], generator=generator, **F64)
        torch.manual_seed(100 + k)  # K-FAC's sampled targets alike in both runs
        training_step(model, _squared_error, opt, x, x, x_stats if needs_statistics(opt) else None)
    return [p.detach().clone() for p in model.parameters()], sum(counted), opt


@pytest.mark.parametrize("name, hyper", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_unformed_directions_give_the_updates_of_formed_ones(name, hyper):
    unformed, n_low_rank, _ = _train(name, hyper, form_directions=False)
    formed, _, _ = _train(name, hyper, form_directions=True)
    assert n_low_rank > 0, "the small autoencoder no longer reaches the low-rank path: the check would be empty"
    for a, b in zip(unformed, formed):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_the_kl_clip_was_active_in_the_case_above():
    # the K-FAC case with kl_clip: its quadratic term lr²·Σ⟨Δ, ∇⟩ is far above the clip, so the step was scaled
    name, hyper = CASES[-1]
    _, _, opt = _train(name, hyper, form_directions=False, steps=2)
    quadratic = sum(float(opt.state[layer.weight]["kl_term"]) for layer in opt.layers) * hyper["lr"] ** 2
    assert quadratic > 10 * hyper["kl_clip"]


def test_kfac_factored_kl_term_is_the_inner_product_with_the_gradient():
    torch.manual_seed(0)
    model = prepare_model("kfac", deep_autoencoder(SIZES, seed=0).double())
    opt = make_optimizer("kfac", model, lr=0.01, kl_clip=1.0, statistics_period=1, inverse_period=1)
    x = torch.rand(N, SIZES[0], **F64)
    opt.update_statistics(torch.rand(N, SIZES[0], **F64))
    opt.zero_grad()
    _squared_error(model(x), x).backward()
    opt._before_updates()
    checked = 0
    for k, group in enumerate(opt.param_groups):
        h, g = opt._captured(k)
        d_weight, d_bias = opt._layer_update(k, group, h, g)
        if not isinstance(d_weight, LowRankDirection):
            continue
        expected = (d_weight.dense() * (g.T @ h)).sum() + (d_bias * g.sum(0)).sum()
        torch.testing.assert_close(opt.state[group["params"][0]]["kl_term"], expected, rtol=1e-12, atol=0.0)
        checked += 1
    assert checked >= 2


def test_low_rank_direction_forms_scales_and_bounds():
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(5, 7, generator=generator, **F64), torch.randn(5, 4, generator=generator, **F64)
    direction = LowRankDirection(left, right)
    torch.testing.assert_close(direction.dense(), left.T @ right, rtol=0, atol=0)
    assert direction.shape == (7, 4)
    torch.testing.assert_close((direction * 2.5).dense(), 2.5 * (left.T @ right))
    assert float(direction.magnitude_bound()) >= float(direction.dense().abs().max())
    with pytest.raises(ValueError, match="same number of rows"):
        LowRankDirection(left, right[:4])


def test_the_finiteness_probe_flags_overflow_and_non_finite_factors_only():
    ones = torch.ones(4, 3)
    overflowing = LowRankDirection(ones * 1e20, ones * 1e20)   # every entry 4e40: inf in float32
    assert torch.isinf(overflowing.dense()).all()
    assert not torch.isfinite(finiteness_probe(overflowing))
    # entries 4 · 10³⁸ overflow, although each product of two entries (10³⁸) does not
    summed_overflow = LowRankDirection(ones * 1e19, ones * 1e19)
    assert torch.isinf(summed_overflow.dense()).all()
    assert not torch.isfinite(finiteness_probe(summed_overflow))
    large_but_finite = LowRankDirection(ones * 1e17, ones * 1e17)   # 4e34
    assert torch.isfinite(large_but_finite.dense()).all() and torch.isfinite(finiteness_probe(large_but_finite))
    with_nan = LowRankDirection(ones, ones.clone().index_put_((torch.tensor([0]), torch.tensor([2])), torch.tensor(float("nan"))))
    assert not torch.isfinite(finiteness_probe(with_nan))
    assert not torch.isfinite(finiteness_probe(torch.tensor([1.0, float("inf")])))


@pytest.mark.parametrize("name, hyper", [CASES[1], CASES[4], CASES[5]], ids=["acp", "centered_gd", "kfac"])
def test_a_skipped_low_rank_step_keeps_parameters_and_momentum(name, hyper):
    torch.manual_seed(0)
    model = prepare_model(name, deep_autoencoder(SIZES, seed=0).double())
    opt = make_optimizer(name, model, check_every=None, **hyper)
    generator = torch.Generator().manual_seed(1)
    for k in range(2):  # momentum buffers exist after these; the bad step (update 2) refreshes no inverse
        x = torch.rand(N, SIZES[0], generator=generator, **F64)
        if needs_statistics(opt):
            opt.update_statistics(torch.rand(N, SIZES[0], generator=generator, **F64))
        opt.zero_grad()
        _squared_error(model(x), x).backward()
        opt.step()
    parameters = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x = torch.rand(N, SIZES[0], generator=generator, **F64)
    if needs_statistics(opt):
        opt.update_statistics(torch.rand(N, SIZES[0], generator=generator, **F64))
    opt.zero_grad()
    loss = _squared_error(model(x), x) * float("nan")
    loss.backward()   # every captured gradient is NaN: the update's factors are NaN
    opt.step()
    assert bool(opt.diverged)
    for before, p in zip(parameters, model.parameters()):
        assert torch.equal(before, p.detach())
    for before, p in zip(buffers, model.parameters()):
        assert torch.equal(before, opt.state[p]["momentum_buffer"])
