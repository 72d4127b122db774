"""The MLP builder and the deep autoencoder of thesis §4.2."""
import pytest
import torch
from torch import nn

from fso_lib.models import AUTOENCODER_SIZES, deep_autoencoder, linear_layers, mlp


def test_autoencoder_architecture():
    model = deep_autoencoder(seed=0)
    layers = linear_layers(model)
    assert [l.in_features for l in layers] + [layers[-1].out_features] == list(AUTOENCODER_SIZES)
    # sigmoid after every layer except the 30-unit code layer
    kinds = [type(m).__name__ for m in model]
    code_index = kinds.index("Linear", 6)  # 4th Linear
    assert [l.out_features for l in layers].index(30) == 3
    assert kinds[code_index + 1] == "Linear"
    assert kinds.count("Sigmoid") == 7 and isinstance(model[-1], nn.Sigmoid)
    assert model(torch.rand(2, 784)).shape == (2, 784)


def test_sparse_init_has_fifteen_inputs_per_unit():
    model = deep_autoencoder(init="sparse", seed=0)
    for layer in linear_layers(model):
        nonzero = (layer.weight != 0).sum(dim=1)
        assert torch.all(nonzero == 15)
        assert torch.all(layer.bias == 0)


def test_glorot_init_bound_and_seed():
    a = deep_autoencoder(init="glorot", init_scale=0.5, seed=3)
    b = deep_autoencoder(init="glorot", init_scale=0.5, seed=3)
    for la, lb in zip(linear_layers(a), linear_layers(b)):
        assert torch.equal(la.weight, lb.weight)
        bound = 0.5 * (6 / (la.in_features + la.out_features)) ** 0.5
        assert la.weight.abs().max() <= bound


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="activation"):
        mlp([2, 3, 1], activation="swishy")
    with pytest.raises(ValueError, match="init"):
        deep_autoencoder(init="orthogonal")
    with pytest.raises(ValueError, match="sizes"):
        mlp([4])
