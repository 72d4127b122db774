"""fso_lib.costs: every count is checked against the shapes of the matrices the library builds on tiny
networks, and every FLOP count against torch's FlopCounterMode running the computation."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fso_lib import costs
from fso_lib import curvature as C
from fso_lib.layer_stats import LayerCapture, augmented_second_moment, gradient_second_moment, input_covariance
from fso_lib.losses import BinaryCrossEntropy, SquaredError
from fso_lib.matrix_free import CurvatureProducts
from fso_lib.models import AUTOENCODER_SIZES, deep_autoencoder, mlp

# FlopCounterMode's import path triggers torch's own deprecation notice about torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

NETS = [([3, 4, 5, 2], 7), ([5, 7, 3, 4], 11), ([6, 2, 9], 4), ([3, 8, 8, 8, 2], 13)]


def flops_of(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def pairs(widths):
    return list(zip(widths[:-1], widths[1:]))


def tiny_problem(sizes, n, seed=0):
    torch.manual_seed(seed)
    model = mlp(sizes, "sigmoid", "sigmoid").double()
    x = torch.rand(n, sizes[0], dtype=torch.float64)
    y = torch.rand(n, sizes[-1], dtype=torch.float64)
    return model, x, y



def test_autoencoder_parameter_count_matches_the_model():
    model = deep_autoencoder(seed=0)
    sizes = costs.layer_sizes(model)
    assert sizes == list(zip(AUTOENCODER_SIZES[:-1], AUTOENCODER_SIZES[1:]))
    assert costs.parameter_count(sizes) == sum(p.numel() for p in model.parameters()) == 2_837_314
    hessian_row = costs.curvature_costs(sizes, 200)[1]
    assert hessian_row.entries == 2_837_314 ** 2 and hessian_row.bytes_float32 == 4 * 2_837_314 ** 2


@pytest.mark.parametrize("sizes,n", NETS)
def test_entries_match_the_dense_matrices_of_a_tiny_net(sizes, n):
    model, x, y = tiny_problem(sizes, n)
    loss = BinaryCrossEntropy()
    rows = {row.name: row for row in costs.curvature_costs(costs.layer_sizes(model), n)}
    names = list(rows)
    assert rows[names[0]].entries == C.flat_gradient(model, loss, x, y).numel()
    assert rows[names[1]].entries == C.hessian(model, loss, x, y).numel()
    assert rows[names[2]].entries == C.gauss_newton(model, loss, x, y).numel()
    blocks = C.diagonal_blocks(C.gauss_newton(model, loss, x, y), C.parameter_layout(model))
    assert rows[names[3]].entries == sum(b.numel() for b in blocks)
    with LayerCapture(model) as capture:
        loss.value(model(x), y).backward()
    kfac = sum(augmented_second_moment(h).numel() + gradient_second_moment(g).numel()
               for h, g in zip(capture.inputs, capture.grads))
    assert rows[names[4]].entries == kfac
    assert rows[names[5]].entries == sum(input_covariance(h).numel() for h in capture.inputs)


@pytest.mark.parametrize("sizes,n", NETS)
def test_product_flops_match_flop_counter(sizes, n):
    model, x, y = tiny_problem(sizes, n)
    ops = CurvatureProducts(model, SquaredError(), x, y)
    v = torch.randn_like(ops.theta)
    layers = pairs(sizes)
    assert flops_of(lambda: model(x)) == costs.forward_flops(layers, n)
    assert flops_of(ops.gradient) == costs.gradient_flops(layers, n)
    assert flops_of(lambda: ops.hessian_vector_product(v)) == costs.hessian_vector_product_flops(layers, n)
    assert flops_of(lambda: ops.gauss_newton_vector_product(v)) == costs.gauss_newton_vector_product_flops(layers, n)


@pytest.mark.parametrize("sizes,n", NETS)
def test_factor_flops_match_flop_counter(sizes, n):
    model, x, y = tiny_problem(sizes, n)
    with LayerCapture(model) as capture:
        SquaredError().value(model(x), y).backward()
    rows = costs.curvature_costs(pairs(sizes), n)
    kfac = flops_of(lambda: [(augmented_second_moment(h), gradient_second_moment(g))
                             for h, g in zip(capture.inputs, capture.grads)])
    acp = flops_of(lambda: [input_covariance(h) for h in capture.inputs])
    assert rows[4].form_flops == kfac
    assert rows[5].form_flops == acp


def test_dense_matrices_cost_products_per_column_and_cubic_inversion():
    sizes, n = [(4, 3), (3, 2)], 5
    p = costs.parameter_count(sizes)
    assert p == 5 * 3 + 4 * 2
    rows = costs.curvature_costs(sizes, n)
    assert rows[1].form_flops == p * costs.hessian_vector_product_flops(sizes, n)
    assert rows[2].form_flops == p * costs.gauss_newton_vector_product_flops(sizes, n)
    assert rows[2].invert_flops == pytest.approx(p ** 3 / 3)
    assert rows[3].invert_flops == pytest.approx((15 ** 3 + 8 ** 3) / 3)
    assert rows[4].invert_flops == pytest.approx((5 ** 3 + 3 ** 3 + 4 ** 3 + 2 ** 3) / 3)
    assert rows[5].invert_flops == pytest.approx((4 ** 3 + 3 ** 3) / 3)
    assert rows[0].invert_flops == 0


def test_hessian_column_by_column_is_the_dense_hessian():
    """The 'form' count of the dense Hessian assumes P products, one per column: they give the matrix."""
    model, x, y = tiny_problem([3, 4, 2], 6)
    ops = CurvatureProducts(model, SquaredError(), x, y)
    eye = torch.eye(ops.theta.numel(), dtype=torch.float64)
    columns = torch.stack([ops.hessian_vector_product(e) for e in eye], dim=1)
    torch.testing.assert_close(columns, C.hessian(model, SquaredError(), x, y), rtol=1e-10, atol=1e-12)


def test_human_bytes_and_timing_helpers():
    assert costs.human_bytes(4 * 2_837_314 ** 2) == "32.2 TB"
    assert costs.human_bytes(999) == "999 B"
    assert costs.human_seconds(0.251) == "251 ms" and costs.human_seconds(90) == "1.5 min"
    assert costs.human_seconds(3 * 86400) == "3 days" and costs.human_seconds(2e12).endswith("years")
    calls = []
    times = costs.median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert set(times) == {"a", "b"} and calls == ["a", "b"] * 4  # interleaved, warm-up included
    assert all(t >= 0 for t in times.values())
    assert costs.matmul_rate(size=64, repeats=2) > 0
