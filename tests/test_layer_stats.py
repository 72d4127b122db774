"""Capture of layer inputs and pre-activation gradients (thesis §6.1, §6.3)."""
import pytest
import torch
from torch import nn

from fso_lib.layer_stats import (
    LayerCapture, UnsupportedLayerError, augmented_second_moment, input_covariance, supported_linear_layers,
)
from fso_lib.models import deep_autoencoder, linear_layers, mlp


def test_capture_matches_autograd_on_an_mlp():
    torch.manual_seed(0)
    model = mlp([3, 5, 4, 2], activation="relu").double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with LayerCapture(model) as capture:
        loss = ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        for layer, h, g in zip(linear_layers(model), capture.inputs, capture.grads):
            assert h.shape == (6, layer.in_features) and g.shape == (6, layer.out_features)
            assert torch.allclose(layer.weight.grad, g.T @ h)  # ∇W = Σ_i g_i h_iᵀ
            assert torch.allclose(layer.bias.grad, g.sum(0))
        assert torch.equal(capture.inputs[0], x)
        assert torch.allclose(capture.grads[-1], 2 * (model(x) - y) / 6)  # (1/n) ∇_a l for the mean loss
    # hooks are removed on exit
    assert all(len(layer._forward_hooks) == 0 for layer in linear_layers(model))


def test_capture_on_the_deep_autoencoder():
    model = deep_autoencoder(seed=0)
    capture = LayerCapture(model)
    x = torch.rand(4, 784)
    model(x).sum().backward()
    assert [h.shape[1] for h in capture.inputs] == [784, 1000, 500, 250, 30, 250, 500, 1000]
    assert [g.shape[1] for g in capture.grads] == [1000, 500, 250, 30, 250, 500, 1000, 784]
    capture.enabled = False
    capture.clear()
    model(x)
    assert capture.missing("inputs") == list(range(8))
    capture.remove()


@pytest.mark.parametrize("layer, name", [(nn.BatchNorm1d(4), "BatchNorm1d"), (nn.LayerNorm(4), "LayerNorm")])
def test_unsupported_layers_are_named(layer, name):
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=name):
        LayerCapture(model)


def test_linear_without_bias_and_empty_models_are_refused():
    with pytest.raises(UnsupportedLayerError, match="without bias"):
        supported_linear_layers(nn.Sequential(nn.Linear(3, 2, bias=False)))
    with pytest.raises(UnsupportedLayerError, match="no nn.Linear"):
        supported_linear_layers(nn.Sequential(nn.Tanh()))


def test_statistics():
    h = torch.randn(50, 4, dtype=torch.float64)
    assert torch.allclose(input_covariance(h), torch.cov(h.T, correction=0))
    assert torch.allclose(input_covariance(h, damping=0.5), torch.cov(h.T, correction=0) + 0.5 * torch.eye(4))
    a = augmented_second_moment(h)
    assert torch.allclose(a[:4, :4], h.T @ h / 50) and torch.allclose(a[4, :4], h.mean(0)) and a[4, 4] == 1


def test_capture_without_weight_gradients():
    """With the weights' requires_grad off (the optimizers' fast path) the biases still carry every ∂L/∂a."""
    torch.manual_seed(1)
    model = mlp([3, 5, 4, 2], activation="tanh").double()
    reference = mlp([3, 5, 4, 2], activation="tanh").double()
    reference.load_state_dict(model.state_dict())
    for layer in linear_layers(model):
        layer.weight.requires_grad_(False)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with LayerCapture(model) as capture, LayerCapture(reference) as expected:
        ((model(x) - y) ** 2).sum(1).mean().backward()
        ((reference(x) - y) ** 2).sum(1).mean().backward()
        assert all(layer.weight.grad is None for layer in linear_layers(model))
        for g, g_ref, h, layer in zip(capture.grads, expected.grads, capture.inputs, linear_layers(reference)):
            assert torch.allclose(g, g_ref)
            assert torch.allclose(g.T @ h, layer.weight.grad)
