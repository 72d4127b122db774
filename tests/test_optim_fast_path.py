"""The optimizers' fast path (no autograd weight GEMM) and their steps without host synchronization.

* updates formed from the captured ``h`` and ``∂L/∂a`` equal those formed from autograd's ``W.grad``
  (``weight_grads=True``, the path the optimizers took before) on the deep autoencoder, across a refresh
  and an inversion, with and without momentum;
* ``.grad`` on request: ``weight_grads=True`` or ``materialize_grads()``;
* a steady-state step reads nothing back to the host; the non-finite flag keeps the parameters.
"""
import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fso_lib.models import deep_autoencoder, linear_layers, mlp
from fso_lib.optim import (
    ACP, KFAC, CenteredSGD, DivergenceError, NaturalNeuralNetwork, acp_product_order, check_divergence,
    kfac_product_order, make_optimizer, needs_statistics, prepare_model,
)

# a smaller autoencoder with the same structure; at minibatch 24 its wide layers take the large-batch orders
SIZES = (96, 64, 32, 8, 32, 64, 96)
N = 24


def _squared_error(output, target):
    return (output - target).square().sum(dim=1).mean()


def _batches(n_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(N, SIZES[0], generator=g), torch.rand(N, SIZES[0], generator=g)) for _ in range(n_steps)]


def _run(name, hyper, steps, dtype=torch.float32, **options):
    """Per-step parameter changes of optimizer ``name`` on the autoencoder (fixed seeds for K-FAC's sampling)."""
    torch.manual_seed(0)
    model = prepare_model(name, deep_autoencoder(SIZES, seed=0).to(dtype))
    opt = make_optimizer(name, model, **hyper, **options)
    changes = []
    for k, (x, x_stats) in enumerate(steps):
        x, x_stats = x.to(dtype), x_stats.to(dtype)
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(100 + k)
        if needs_statistics(opt):
            opt.update_statistics(x_stats)
        opt.zero_grad()
        _squared_error(model(x), x).backward()
        opt.step()
        changes.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    return changes, model, opt


def test_the_autoencoder_takes_the_large_batch_orders():
    layers = list(zip(SIZES[:-1], SIZES[1:]))
    assert {acp_product_order(N, i, o, False) for i, o in layers} == {"gradient", "batch"}
    assert {acp_product_order(N, i, o, True) for i, o in layers} == {"gradient", "batch"}
    assert ("batch", "batch") in {kfac_product_order(N, i, o, False) for i, o in layers}
    assert ("batch", "batch") in {kfac_product_order(N, i, o, True) for i, o in layers}
    # the real benchmark: minibatch 200 on the full autoencoder
    full = list(zip((784, 1000, 500, 250, 30, 250, 500, 1000), (1000, 500, 250, 30, 250, 500, 1000, 784)))
    assert acp_product_order(200, 784, 1000, False) == "batch"
    assert kfac_product_order(200, 784, 1000, False) == ("batch", "batch")
    assert {kfac_product_order(200, i, o, True) for i, o in full} >= {("batch", "batch")}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name, hyper", [
    ("centered_gd", dict(lr=0.05)),
    ("acp", dict(lr=0.01, damping=0.1, amortization_period=3)),
    ("acp_fixed_alpha", dict(lr=0.05, damping=0.1, amortization_period=3)),
    ("kfac", dict(lr=0.01, damping=0.1, statistics_period=2, inverse_period=3)),
])
def test_fast_path_gives_the_updates_of_the_autograd_path(name, hyper, momentum):
    steps = _batches(7)  # refreshes / inversions at updates 0, 3 and 6; K-FAC statistics at 0, 2, 4, 6
    fast, fast_model, fast_opt = _run(name, dict(hyper, momentum=momentum), steps, check_every=None)  # masked step
    slow, slow_model, _ = _run(name, dict(hyper, momentum=momentum), steps, weight_grads=True)
    assert all(p.grad is None for p in fast_model.parameters() if p.dim() == 2)  # no weight GEMM in backward
    assert all(p.grad is not None for p in slow_model.parameters())
    for k, (a, b) in enumerate(zip(fast, slow)):
        for da, db in zip(a, b):
            assert torch.allclose(da, db, rtol=0, atol=1e-6), (name, k, float((da - db).abs().max()))
    if name == "kfac":
        return  # a float64 K-FAC run samples other targets (randn in float64): no float64 twin to compare with
    # ... and the fast path is the float64 run to float32 accuracy
    exact, _, _ = _run(name, dict(hyper, momentum=momentum), steps, dtype=torch.float64)
    for a, b in zip(fast, exact):
        for da, db in zip(a, b):
            assert torch.allclose(da.double(), db, rtol=0, atol=1e-6 + 1e-4 * float(db.abs().max()))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_natural_neural_network_steps_are_sgd_on_the_whitened_parameters(momentum):
    """NNN's step (masked, no host read) against torch.optim.SGD on V, d with the same re-whitenings."""
    hyper = dict(lr=0.05, damping=0.1, amortization_period=3, momentum=momentum)
    model = prepare_model("natural_nn", deep_autoencoder(SIZES, seed=0))
    ref_model = copy.deepcopy(model)
    opt = make_optimizer("natural_nn", model, **hyper)
    rewhitener = NaturalNeuralNetwork(ref_model, **hyper)  # used only for its re-whitening
    rewhitener.remove_hooks()
    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=momentum)
    for k, (x, x_stats) in enumerate(_batches(7)):
        if needs_statistics(opt):
            opt.update_statistics(x_stats)
            rewhitener._collect_statistics(x_stats)
            sgd.state.clear()  # NNN restarts its momentum in the new coordinates
        for m, o in ((model, opt), (ref_model, sgd)):
            o.zero_grad()
            _squared_error(m(x), x).backward()
            o.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            # 1e-6 relative and absolute: each re-whitening (V' = W U'⁻¹) magnifies float32 rounding differences
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-6), (k, float((p - q).detach().abs().max()))


def test_grad_on_request():
    torch.manual_seed(0)
    model = mlp([5, 7, 3], activation="tanh").double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    _squared_error(reference(x), y).backward()
    for cls in (ACP, KFAC, CenteredSGD):
        fast = copy.deepcopy(model)
        opt = cls(fast)
        assert not fast[0].weight.requires_grad and fast[0].bias.requires_grad
        _squared_error(fast(x), y).backward()
        assert fast[0].weight.grad is None and fast[0].bias.grad is not None
        opt.materialize_grads()
        for layer, ref in zip(linear_layers(fast), linear_layers(reference)):
            assert torch.allclose(layer.weight.grad, ref.weight.grad) and torch.allclose(layer.bias.grad, ref.bias.grad)
        opt.remove_hooks()
        assert all(p.requires_grad for p in fast.parameters())
        kept = copy.deepcopy(model)
        cls(kept, weight_grads=True)
        _squared_error(kept(x), y).backward()
        assert torch.allclose(kept[0].weight.grad, reference[0].weight.grad)


# -- no host synchronization -------------------------------------------------------------------------
SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
           "equal", "allclose", "is_nonzero", "nonzero", "masked_select", "unique", "argwhere", "_local_scalar_dense"}


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that read a value back to the host (a device synchronization on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.calls.append(name)
        if name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            self.calls.append("boolean indexing")
        return func(*args, **(kwargs or {}))


def test_the_host_read_detector_sees_a_read():
    with HostReads() as reads:
        t = torch.ones(3)
        if t.sum() > 0:
            float(t[0])
    assert reads.calls == ["__bool__", "__float__"]


@pytest.mark.parametrize("name, hyper", [
    ("centered_gd", dict(momentum=0.9)),
    ("acp", dict(amortization_period=4)),
    ("acp_fixed_alpha", dict(amortization_period=4, momentum=0.5)),
    ("kfac", dict(statistics_period=2, inverse_period=4)),
    ("kfac", dict(statistics_period=2, inverse_period=4, kl_clip=1e-3)),
    ("natural_nn", dict(amortization_period=4, momentum=0.9)),
])
def test_steady_state_steps_read_nothing_back(name, hyper):
    torch.manual_seed(0)
    model = prepare_model(name, deep_autoencoder(SIZES, seed=0))
    opt = make_optimizer(name, model, check_every=None, **hyper)
    for k, (x, x_stats) in enumerate(_batches(8)):
        refresh = k % 4 == 0  # inversions / re-whitening read their factorization status once per refresh
        with HostReads() as reads:
            if needs_statistics(opt):
                opt.update_statistics(x_stats)
            opt.zero_grad()
            _squared_error(model(x), x).backward()
            opt.step()
        if not refresh:
            assert reads.calls == [], (k, reads.calls)
    check_divergence(opt)  # nothing diverged


def test_check_every_k_reads_the_flag_once_per_k_steps():
    torch.manual_seed(0)
    model = deep_autoencoder(SIZES, seed=0)
    opt = CenteredSGD(model, lr=0.01, check_every=3)
    counts = []
    for x, _ in _batches(6):
        with HostReads() as reads:
            opt.zero_grad()
            _squared_error(model(x), x).backward()
            opt.step()
        counts.append(len(reads.calls))
    assert counts == [0, 0, 1, 0, 0, 1]


def _nan_step(opt, model, x):
    opt.zero_grad()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    _squared_error(model(x_bad), x).backward()
    opt.step()


@pytest.mark.parametrize("cls", [ACP, CenteredSGD])
def test_a_non_finite_update_sets_the_flag_and_keeps_the_parameters(cls):
    torch.manual_seed(0)
    model = deep_autoencoder(SIZES, seed=0)
    opt = cls(model, lr=0.01, momentum=0.9, check_every=None)
    batches = _batches(5)
    for x, _ in batches[:2]:
        opt.zero_grad()
        _squared_error(model(x), x).backward()
        opt.step()
    kept = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    assert not bool(opt.diverged)
    _nan_step(opt, model, batches[2][0])           # update 2 is not finite: skipped, flag set, no exception
    assert bool(opt.diverged)
    opt.zero_grad()
    _squared_error(model(batches[3][0]), batches[3][0]).backward()
    opt.step()                                      # later updates are skipped too until the flag is checked
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), kept))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers))
    with pytest.raises(DivergenceError, match="update at step 2 is not finite"):
        check_divergence(opt)
    assert not bool(opt.diverged)                   # the check clears the flag
    check_divergence(torch.optim.SGD(model.parameters(), lr=0.1))  # a no-op for torch's optimizers


def test_every_registry_entry_accepts_check_every():
    from fso_lib.optim import OPTIMIZERS
    for name in OPTIMIZERS:
        model = prepare_model(name, mlp([4, 6, 3], activation="tanh"))
        opt = make_optimizer(name, model, check_every=None)
        check_divergence(opt)
        if hasattr(opt, "check_every"):
            assert opt.check_every is None
