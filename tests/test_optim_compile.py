"""The chapter-6 optimizers' steady-state step under torch.compile (inductor on the CPU): compiled once,
without graph breaks, and equal to the eager step across statistics updates and inverse refreshes."""
import os
import shutil

import pytest
import torch

from fso_lib.models import deep_autoencoder
from fso_lib.optim import make_optimizer, needs_statistics, prepare_model

SIZES = (96, 64, 32, 8, 32, 64, 96)  # at minibatch 24: both product orders and both inverse forms occur


def _cxx_compiler():
    return next((name for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name and shutil.which(name)), None)


pytestmark = pytest.mark.skipif(
    _cxx_compiler() is None,
    reason="torch.compile on a CPU generates C++ kernels and no C++ compiler ($CXX, g++, c++, clang++) is here")


def _run(name, hyper, compiled, n_steps=7):
    torch.manual_seed(0)
    model = prepare_model(name, deep_autoencoder(SIZES, seed=0))
    opt = make_optimizer(name, model, check_every=None, **hyper)
    if compiled:
        opt.compile_step()
    g = torch.Generator().manual_seed(1)
    parameters = []
    for k in range(n_steps):
        x, x_stats = torch.rand(24, SIZES[0], generator=g), torch.rand(24, SIZES[0], generator=g)
        torch.manual_seed(100 + k)  # K-FAC samples its targets
        if needs_statistics(opt):
            opt.update_statistics(x_stats)
        opt.zero_grad()
        (model(x) - x).square().sum(dim=1).mean().backward()
        opt.step()
        parameters.append([p.detach().clone() for p in model.parameters()])
    return parameters, opt


@pytest.mark.parametrize("name, hyper, graphs", [
    ("acp", dict(lr=0.05, damping=0.1, amortization_period=3), 1),
    ("natural_nn_implicit", dict(lr=0.05, damping=0.1, amortization_period=3, momentum=0.9), 2),
    ("kfac", dict(lr=0.01, damping=0.1, statistics_period=2, inverse_period=3), 2),
])
def test_the_compiled_steady_state_step_is_the_eager_step(name, hyper, graphs):
    """``graphs``: the first step creates the momentum buffers (state of other length), so a method with
    momentum is compiled twice; never once per refresh or per update."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, _ = _run(name, hyper, compiled=False)
    compiled, opt = _run(name, hyper, compiled=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    for k, (a, b) in enumerate(zip(eager, compiled)):
        for p, q in zip(a, b):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (name, k, float((p - q).abs().max()))
    torch._dynamo.reset()
