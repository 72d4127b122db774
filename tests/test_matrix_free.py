"""fso_lib.matrix_free.CurvatureProducts against the dense matrices of fso_lib.curvature, float64."""
import pytest
import torch

from fso_lib import curvature as C
from fso_lib.losses import BinaryCrossEntropy, CrossEntropyWithLogits, SquaredError
from fso_lib.matrix_free import CurvatureProducts
from fso_lib.models import mlp

CASES = [
    (SquaredError(), "tanh", "identity"),
    (BinaryCrossEntropy(), "sigmoid", "sigmoid"),
    (CrossEntropyWithLogits(), "tanh", "identity"),
]


def problem(loss, activation, output_activation, seed=0):
    torch.manual_seed(seed)
    model = mlp([4, 5, 3, 3], activation, output_activation).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = loss.sample_target(out, torch.Generator().manual_seed(seed))
    return model, x, y


@pytest.mark.parametrize("loss,activation,output_activation", CASES)
def test_products_match_dense_matrices(loss, activation, output_activation):
    model, x, y = problem(loss, activation, output_activation)
    ops = CurvatureProducts(model, loss, x, y)
    v = torch.randn_like(ops.theta)
    torch.testing.assert_close(ops.gradient(), C.flat_gradient(model, loss, x, y), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ops.hessian_vector_product(v), C.hessian(model, loss, x, y) @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ops.gauss_newton_vector_product(v), C.gauss_newton(model, loss, x, y) @ v,
                               rtol=1e-10, atol=1e-12)
    # and the same as the one-call products of fso_lib.curvature
    torch.testing.assert_close(ops.hessian_vector_product(v), C.hessian_vector_product(model, loss, x, y, v),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ops.gauss_newton_vector_product(v), C.gauss_newton_vector_product(model, loss, x, y, v),
                               rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert float(ops.risk()) == pytest.approx(float(loss.value(model(x), y)), rel=1e-14)


def test_hessian_and_gauss_newton_products_differ_away_from_a_fit():
    """A check that can fail: on a random start the residual term is not zero, so H v ≠ G v."""
    model, x, y = problem(SquaredError(), "tanh", "identity")
    ops = CurvatureProducts(model, SquaredError(), x, y)
    v = torch.randn_like(ops.theta)
    assert float((ops.hessian_vector_product(v) - ops.gauss_newton_vector_product(v)).norm()) > 1e-3


def test_parameters_are_read_once():
    model, x, y = problem(SquaredError(), "tanh", "identity")
    ops = CurvatureProducts(model, SquaredError(), x, y)
    before = ops.gradient()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(ops.gradient(), before)


def test_clear_errors():
    model, x, y = problem(SquaredError(), "tanh", "identity")
    ops = CurvatureProducts(model, SquaredError(), x, y)
    with pytest.raises(ValueError, match="one per parameter"):
        ops.hessian_vector_product(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="fso_lib.losses"):
        CurvatureProducts(model, torch.nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match="risk"):
        CurvatureProducts(model, SquaredError(), x * float("nan"), y)
