"""Kronecker identities and the factored GN/Fisher block of one layer (thesis §6.3), in float64."""
import pytest
import torch

from fso_lib import curvature
from fso_lib.kron import (
    augment, backward_factors, block_to_thesis_order, block_to_torch_order, factored_block, kron,
    per_example_parameter_jacobians, preactivation_jacobians, relative_error, thesis_to_torch_permutation,
    unvec, vec,
)
from fso_lib.losses import SquaredError
from fso_lib.models import linear_layers, mlp

F64 = dict(dtype=torch.float64)


def _net(seed=0, sizes=(3, 4, 2), activation="tanh"):
    torch.manual_seed(seed)
    return mlp(sizes, activation=activation).double()


def test_vec_identities():
    g = torch.Generator().manual_seed(0)
    a, x, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(2, 3), (3, 4), (4, 5)])
    assert torch.allclose(vec(a @ x @ b), kron(b.T, a) @ vec(x))
    assert torch.equal(unvec(vec(x), 3, 4), x)
    assert torch.equal(vec(x), x.T.reshape(-1))  # column stacking; torch's flatten is vec(Xᵀ)
    c, d = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
    e, f = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(kron(c, d) @ kron(e, f), kron(c @ e, d @ f))
    assert torch.allclose(torch.linalg.inv(kron(c, d)), kron(torch.linalg.inv(c), torch.linalg.inv(d)))


def test_permutation_maps_torch_layout_to_thesis_vec():
    w, b = torch.randn(4, 3, **F64), torch.randn(4, **F64)
    torch_theta = torch.cat([w.flatten(), b])
    thesis_theta = vec(torch.cat([w, b[:, None]], dim=1))
    assert torch.equal(torch_theta[thesis_to_torch_permutation(3, 4)], thesis_theta)
    m = torch.randn(16, 16, **F64)
    assert torch.equal(block_to_thesis_order(block_to_torch_order(m, 3, 4), 3, 4), m)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_parameter_jacobian_is_the_kronecker_product_6_3_1(layer_index):
    model = _net()
    x = torch.randn(5, 3, **F64)
    _, inputs, jacs = preactivation_jacobians(model, x)
    ours = per_example_parameter_jacobians(inputs[layer_index], jacs[layer_index])
    layout = curvature.parameter_layout(model)
    full = curvature.output_jacobian(model, x)  # (n, d, P) torch layout
    block = layout.blocks[layer_index].slice
    layer = linear_layers(model)[layer_index]
    reference = full[:, :, block][:, :, thesis_to_torch_permutation(layer.in_features, layer.out_features)]
    assert torch.allclose(ours, reference, atol=1e-12)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_sum_of_kronecker_products_is_the_exact_gn_block_6_3_2(layer_index):
    model = _net(1)
    x, y = torch.randn(6, 3, **F64), torch.randn(6, 2, **F64)
    loss = SquaredError()
    out, inputs, jacs = preactivation_jacobians(model, x)
    b_factors = backward_factors(jacs[layer_index], loss.output_hessian(out, y))
    ours = factored_block(inputs[layer_index], b_factors, "sum_of_kronecker")
    layout = curvature.parameter_layout(model)
    exact = curvature.diagonal_blocks(curvature.gauss_newton(model, loss, x, y), layout)[layer_index]
    layer = linear_layers(model)[layer_index]
    assert torch.allclose(ours, block_to_thesis_order(exact, layer.in_features, layer.out_features), atol=1e-12)
    # in torch's row-major [W b] order the factor order flips: Σ B_i ⊗ A_i
    ha = augment(inputs[layer_index])
    row_major = sum(kron(b_i, torch.outer(a_i, a_i)) for a_i, b_i in zip(ha, b_factors)) / len(ha)
    p = torch.arange(ha.shape[1] * layer.out_features).reshape(ha.shape[1], layer.out_features).T.reshape(-1)
    assert torch.allclose(row_major, ours[p][:, p], atol=1e-12)


def test_kfac_is_exact_for_one_example_and_for_a_repeated_input():
    model = _net(2)
    for x in [torch.randn(1, 3, **F64), torch.randn(1, 3, **F64).repeat(5, 1)]:
        _, inputs, jacs = preactivation_jacobians(model, x)
        for h, jac in zip(inputs, jacs):
            b_factors = backward_factors(jac)
            exact = factored_block(h, b_factors, "sum_of_kronecker")
            assert relative_error(factored_block(h, b_factors, "kfac"), exact) < 1e-12
    # ... and not exact in general
    _, inputs, jacs = preactivation_jacobians(model, torch.randn(8, 3, **F64))
    b_factors = backward_factors(jacs[0])
    assert relative_error(factored_block(inputs[0], b_factors, "kfac"), factored_block(inputs[0], b_factors, "sum_of_kronecker")) > 1e-3


def test_acp_factor_is_exact_when_the_backward_factor_is_a_multiple_of_identity():
    # last layer of a net with identity output and squared error: J_a = I, D = 2I, so B_i = 2I
    model = _net(3)
    x = torch.randn(7, 3, **F64)
    _, inputs, jacs = preactivation_jacobians(model, x)
    b_factors = backward_factors(jacs[-1], 2.0 * torch.eye(2, **F64).expand(7, 2, 2))
    exact = factored_block(inputs[-1], b_factors, "sum_of_kronecker")
    assert relative_error(factored_block(inputs[-1], b_factors, "acp", alpha=2.0), exact) < 1e-12
    assert relative_error(factored_block(inputs[-1], b_factors, "acp"), exact) < 1e-12  # default α = mean trace
    with pytest.raises(ValueError, match="Unknown approximation"):
        factored_block(inputs[-1], b_factors, "diagonal")


def test_preactivation_jacobians_leave_the_models_grad_alone():
    model = _net(4)
    x = torch.randn(5, 3, **F64)
    model(x).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    objects = [p.grad for p in model.parameters()]
    preactivation_jacobians(model, x)
    for p, b, o in zip(model.parameters(), before, objects):
        assert p.grad is o and torch.equal(p.grad, b)
    fresh = _net(4)  # and a model without gradients keeps none
    preactivation_jacobians(fresh, x)
    assert all(p.grad is None for p in fresh.parameters())


def test_factored_block_refuses_inputs_and_factors_with_different_row_counts():
    model = _net(5)
    _, inputs, jacs = preactivation_jacobians(model, torch.randn(6, 3, **F64))
    b_factors = backward_factors(jacs[0])
    for kind in ("sum_of_kronecker", "kfac", "acp"):
        with pytest.raises(ValueError, match=r"b_factors must be \(n, n_out, n_out\) with n = 5, the rows of h"):
            factored_block(inputs[0][:5], b_factors, kind)
        with pytest.raises(ValueError, match=r"b_factors must be \(n, n_out, n_out\)"):
            factored_block(inputs[0], b_factors[:, :, :2], kind)
        with pytest.raises(ValueError, match=r"\(n, n_in\)"):
            factored_block(inputs[0][0], b_factors, kind)


def test_default_acp_alpha_matches_the_trace_of_the_kfac_block_not_of_the_exact_block():
    model = _net(6)
    _, inputs, jacs = preactivation_jacobians(model, torch.randn(9, 3, **F64))
    h, b_factors = inputs[0], backward_factors(jacs[0])
    acp = factored_block(h, b_factors, "acp")
    kfac = factored_block(h, b_factors, "kfac")
    exact = factored_block(h, b_factors, "sum_of_kronecker")
    torch.testing.assert_close(torch.trace(acp), torch.trace(kfac), rtol=1e-12, atol=0)
    assert abs(float(torch.trace(acp) - torch.trace(exact))) > 1e-3 * float(torch.trace(exact))


@pytest.mark.parametrize("sizes, activation, output_activation, identity_layers", [
    ((6, 5, 3, 2, 3, 5, 6), "sigmoid", "sigmoid", (2,)),   # a small autoencoder: linear code layer, sigmoid outputs
    ((4, 7, 3), "tanh", "identity", ()),
])
def test_sequential_backward_factors_match_the_jacobians(sizes, activation, output_activation, identity_layers):
    from fso_lib.kron import sequential_backward_factors
    torch.manual_seed(0)
    net = mlp(sizes, activation=activation, output_activation=output_activation,
              linear_layers_without_activation=identity_layers)
    x = torch.rand(9, sizes[0])
    target = torch.rand(9, sizes[-1], **F64)
    out, inputs, jacobians = preactivation_jacobians(net.double(), x.double())
    reference = [backward_factors(jac, SquaredError().output_hessian(out, target)) for jac in jacobians]
    net.float()   # the recursion casts a float32 network's parameters itself
    seen = []
    for index, h, b in sequential_backward_factors(net, x, SquaredError(), target):
        assert b.dtype == torch.float64
        assert torch.allclose(h, inputs[index].double(), atol=1e-6)
        # the float32 parameters, cast: agreement to float32 rounding
        assert torch.allclose(b, reference[index], rtol=1e-5, atol=1e-7), index
        seen.append(index)
    assert seen == list(range(len(linear_layers(net))))[::-1]


def test_sequential_backward_factors_refuse_a_module_that_is_not_elementwise():
    from fso_lib.kron import sequential_backward_factors
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softmax(dim=1), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Softmax"):
        list(sequential_backward_factors(net, torch.randn(2, 3), SquaredError(), torch.randn(2, 2)))


def test_matrix_free_exact_norm_is_the_dense_blocks_norm():
    from fso_lib.kron import relative_errors_matrix_free
    net = _net(1, (4, 5, 3))
    x, y = torch.randn(7, 4, **F64), torch.randn(7, 3, **F64)
    out, inputs, jacobians = preactivation_jacobians(net, x)
    for h, jac in zip(inputs, jacobians):
        b = backward_factors(jac, SquaredError().output_hessian(out, y))
        result = relative_errors_matrix_free(h, b, with_exact_norm=True)
        dense = float(torch.linalg.matrix_norm(factored_block(h, b, "sum_of_kronecker")))
        assert abs(result["exact_norm"] - dense) < 1e-10 * dense
        assert set(relative_errors_matrix_free(h, b)) == {"kfac", "acp", "ekfac"}
