"""Glorot and He initializations with the scale α (thesis §2.4.2)."""
import math

import pytest
import torch

from fso_lib.initialization import variance_scaling_init_, weight_variance
from fso_lib.models import glorot_uniform_init_, linear_layers, mlp


@pytest.mark.parametrize("scheme, alpha", [("glorot", 2.0), ("glorot", 0.5), ("he", 2.0), ("he", 8.0)])
def test_empirical_weight_variance_matches_the_formula(scheme, alpha):
    net = mlp([400, 300, 200], activation="relu")
    variance_scaling_init_(net, scheme, alpha, generator=torch.Generator().manual_seed(0))
    for layer in linear_layers(net):
        expected = weight_variance(layer.in_features, layer.out_features, scheme, alpha)
        assert float(layer.weight.detach().var()) == pytest.approx(expected, rel=0.02)
        assert torch.all(layer.bias == 0)


def test_formulas():
    assert weight_variance(100, 50, "glorot", 2.0) == pytest.approx(2 / 150)
    assert weight_variance(100, 50, "he", 2.0) == pytest.approx(2 / 100)
    with pytest.raises(ValueError, match="scheme"):
        weight_variance(3, 3, "lecun")


def test_glorot_scale_is_alpha_two_scale_squared():
    a, b = mlp([30, 20, 10]), mlp([30, 20, 10])
    glorot_uniform_init_(a, scale=0.7, generator=torch.Generator().manual_seed(1))
    variance_scaling_init_(b, "glorot", alpha=2 * 0.7**2, generator=torch.Generator().manual_seed(1))
    for la, lb in zip(linear_layers(a), linear_layers(b)):
        assert torch.equal(la.weight, lb.weight)
        assert la.weight.abs().max() <= 0.7 * math.sqrt(6 / (la.in_features + la.out_features))


def test_initialization_does_not_import_models():
    """fso_lib.models builds on fso_lib.initialization, never the other way round (no import cycle)."""
    import ast
    from pathlib import Path

    import fso_lib.initialization as init_module

    tree = ast.parse(Path(init_module.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any(node.level for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)), imported
    assert not any((m or "").startswith("fso_lib") for m in imported)
    assert linear_layers is init_module.linear_layers  # models re-exports the one definition
