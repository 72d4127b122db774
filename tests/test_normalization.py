"""Batch-norm and mean-only batch-norm model variants (thesis §6.6)."""
import pytest
import torch
from torch import nn

from fso_lib.models import deep_autoencoder, linear_layers, mlp
from fso_lib.normalization import MeanOnlyBatchNorm1d, batch_norm_autoencoder, with_batch_norm


def test_mean_only_batch_norm_centres_in_training_and_uses_the_running_mean_in_evaluation():
    layer = MeanOnlyBatchNorm1d(3, momentum=0.5)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.randn(10, 3) + 4.0
    y = layer(x)
    assert torch.allclose(y.mean(0), layer.bias, atol=1e-5)
    assert torch.allclose(y.std(0), x.std(0))  # no scaling
    assert torch.allclose(layer.running_mean, 0.5 * x.mean(0))
    layer.eval()
    assert torch.allclose(layer(x), x - layer.running_mean + layer.bias)


@pytest.mark.parametrize("kind, cls", [("full", nn.BatchNorm1d), ("mean_only", MeanOnlyBatchNorm1d)])
def test_with_batch_norm_inserts_after_each_hidden_linear(kind, cls):
    model = mlp([5, 4, 3, 2], activation="tanh")
    bn = with_batch_norm(model, kind)
    kinds = [type(m) for m in bn]
    assert kinds == [nn.Linear, cls, nn.Tanh, nn.Linear, cls, nn.Tanh, nn.Linear]
    assert bn[0].bias is None and bn[-1].bias is not None
    assert torch.equal(bn[0].weight, model[0].weight) and bn[0].weight is not model[0].weight
    out = bn(torch.randn(8, 5))
    assert out.shape == (8, 2)
    with pytest.raises(ValueError, match="already"):
        with_batch_norm(bn, kind)
    with pytest.raises(ValueError, match="Unknown normalization"):
        with_batch_norm(model, "group")


def test_batch_norm_autoencoder():
    model = batch_norm_autoencoder("mean_only", seed=0)
    assert sum(isinstance(m, MeanOnlyBatchNorm1d) for m in model) == 7
    assert [l.out_features for l in linear_layers(model)] == [l.out_features for l in linear_layers(deep_autoencoder(seed=0))]
    assert model(torch.rand(3, 784)).shape == (3, 784)
