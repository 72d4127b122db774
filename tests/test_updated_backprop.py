"""Updated backpropagation (thesis §5.2) against the exact layer-by-layer reference, in float64."""
import copy

import numpy as np
import pytest
import torch

from fso_lib.models import mlp
from fso_lib.training import sum_squared_error
from fso_lib.updated_backprop import UpdatedBackprop, layer_structure, layerwise_gradient_step

LRS = [0.2, 0.1, 0.05, 0.025]


def _error_slope(net, x, y, **options):
    errors = []
    for lr in LRS:
        reference_net, net_copy = copy.deepcopy(net), copy.deepcopy(net)
        reference = layerwise_gradient_step(reference_net, sum_squared_error, x, y, lr)
        opt = UpdatedBackprop(net_copy, sum_squared_error, lr, **options)
        opt.step(x, y)
        squared = sum(float((g - r).pow(2).sum()) for used, ref in zip(opt.last_gradients, reference)
                      for g, r in zip(used, ref))
        errors.append(squared ** 0.5)
        # the parameters moved by exactly -lr times the gradients reported
        for (linear, _), (old, _), (grad_w, _) in zip(layer_structure(net_copy), layer_structure(net),
                                                      opt.last_gradients):
            torch.testing.assert_close(linear.weight, old.weight - lr * grad_w)
    return np.polyfit(np.log(LRS), np.log(errors), 1)[0], errors


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    with torch.random.fork_rng():
        net = mlp([5, 4, 4, 3, 2], activation="tanh", output_activation="sigmoid").double()
    return net, torch.randn(7, 5, dtype=torch.float64), torch.rand(7, 2, dtype=torch.float64)


def test_plain_sweep_is_first_order_only(tiny):
    slope, _ = _error_slope(*tiny, correction=False)
    assert 0.9 < slope < 1.1


def test_full_first_order_correction_is_quadratic(tiny):
    slope, _ = _error_slope(*tiny, keep_activation_curvature=True)
    assert 1.8 < slope < 2.2


def test_thesis_correction_beats_plain_backprop(tiny):
    _, plain = _error_slope(*tiny, correction=False)
    _, thesis = _error_slope(*tiny)
    assert all(t < p / 3 for t, p in zip(thesis, plain))


def test_relu_network_makes_the_thesis_correction_exact_to_first_order():
    torch.manual_seed(1)
    net = mlp([4, 6, 5, 3], activation="relu").double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    slope, _ = _error_slope(net, x, y)
    assert 1.8 < slope < 2.2


def test_top_layer_gradient_is_the_plain_gradient(tiny):
    net, x, y = tiny
    grads = torch.autograd.grad(sum_squared_error(net(x), y), [net[-2].weight, net[-2].bias])
    opt = UpdatedBackprop(copy.deepcopy(net), sum_squared_error, lr=0.1)
    opt.step(x, y)
    torch.testing.assert_close(opt.last_gradients[-1][0], grads[0])
    torch.testing.assert_close(opt.last_gradients[-1][1], grads[1])
