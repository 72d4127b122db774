"""fso_lib.spectrum: Lanczos against dense eigendecompositions (float64), and the Kronecker preconditioners
against the optimizers whose curvature they stand for."""
import pytest
import torch

from fso_lib import curvature as C
from fso_lib.losses import SquaredError
from fso_lib.matrix_free import CurvatureProducts
from fso_lib.models import mlp
from fso_lib.optim import ACP, KFAC
from fso_lib.spectrum import (
    NonSymmetricOperatorError, acp_preconditioner, hutchinson_trace, kfac_preconditioner, lanczos, preconditioned_operator,
)


def small_problem(seed=0, n=12):
    torch.manual_seed(seed)
    model = mlp([4, 6, 3, 4], "tanh", "identity").double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randn(n, 4, dtype=torch.float64)
    return model, x, y


def top(values: torch.Tensor, k: int, which: str = "largest") -> torch.Tensor:
    key = values if which == "largest" else values.abs()
    return values[torch.argsort(key, descending=True)[:k]]


@pytest.mark.parametrize("matrix_name", ["hessian", "gauss_newton"])
def test_lanczos_matches_dense_top5_of_a_small_network(matrix_name):
    model, x, y = small_problem()
    loss = SquaredError()
    dense = getattr(C, matrix_name)(model, loss, x, y)
    products = CurvatureProducts(model, loss, x, y)
    product = products.hessian_vector_product if matrix_name == "hessian" else products.gauss_newton_vector_product
    result = lanczos(product, products.theta.numel(), k=5, tol=1e-12, max_iterations=products.theta.numel())
    expected = top(torch.linalg.eigvalsh(dense), 5)
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=1e-10)
    assert result.converged
    assert result.n_products < products.theta.numel()  # it did not need the whole space


def test_hessian_has_negative_eigenvalues_and_magnitude_order_finds_them():
    """Away from a fit the Hessian is indefinite: the check below fails if the test problem is not."""
    model, x, y = small_problem(seed=3)
    loss = SquaredError()
    dense = C.hessian(model, loss, x, y)
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert float(eigenvalues.min()) < -1e-3
    products = CurvatureProducts(model, loss, x, y)
    result = lanczos(products.hessian_vector_product, products.theta.numel(), k=6, which="magnitude", tol=1e-12,
                     max_iterations=products.theta.numel())
    torch.testing.assert_close(result.eigenvalues, top(eigenvalues, 6, "magnitude"), rtol=1e-8, atol=1e-10)


def test_clustered_and_negative_spectrum_and_ritz_vectors():
    generator = torch.Generator().manual_seed(1)
    n = 150
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    values = torch.cat([torch.tensor([10.0, 10.0 - 1e-4, 10.0 - 2e-4, 4.0, -20.0], dtype=torch.float64),
                        torch.rand(n - 5, generator=generator, dtype=torch.float64) * 2 - 1])
    matrix = (basis * values) @ basis.T
    for which in ("largest", "magnitude"):
        result = lanczos(lambda v: matrix @ v, n, k=4, which=which, tol=1e-11, max_iterations=n,
                         return_eigenvectors=True)
        expected = top(values, 4, which)
        torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-9, atol=1e-9)
        residual = matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues
        assert float(residual.norm(dim=0).max()) < 1e-7
        # no ghost copies of the converged top eigenvalue: the three clustered values appear once each
        assert len(set(round(float(v), 6) for v in result.eigenvalues)) == 4


def test_invariant_subspace_restart_finds_every_eigenvalue():
    """A diagonal start vector orthogonal to eigenvectors: the Krylov space closes early and Lanczos restarts."""
    matrix = torch.diag(torch.tensor([5.0, 3.0, 0.0, 0.0, 1.0, -2.0], dtype=torch.float64))
    start = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    result = lanczos(lambda v: matrix @ v, 6, k=6, start=start, check_symmetry=False)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([5.0, 3.0, 1.0, 0.0, 0.0, -2.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert result.converged


def test_same_seed_same_numbers_and_float32_operator():
    model, x, y = small_problem()
    products = CurvatureProducts(model, SquaredError(), x, y)
    n = products.theta.numel()
    first = lanczos(products.gauss_newton_vector_product, n, k=3, seed=7, max_iterations=20)
    second = lanczos(products.gauss_newton_vector_product, n, k=3, seed=7, max_iterations=20)
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    model32 = model.float()
    products32 = CurvatureProducts(model32, SquaredError(), x.float(), y.float())
    result32 = lanczos(products32.gauss_newton_vector_product, n, k=3, tol=1e-5, max_iterations=n,
                       operator_dtype=torch.float32)
    assert result32.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(result32.eigenvalues, first.eigenvalues, rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused_clearly():
    generator = torch.Generator().manual_seed(0)
    square = torch.randn(20, 20, generator=generator, dtype=torch.float64)
    with pytest.raises(NonSymmetricOperatorError, match="not symmetric"):
        lanczos(lambda v: square @ v, 20, k=3)
    symmetric = square + square.T
    with pytest.raises(ValueError, match="k must be between 1 and the dimension"):
        lanczos(lambda v: symmetric @ v, 20, k=21)
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(lambda v: symmetric @ v, 20, k=2, which="smallest")
    with pytest.raises(ValueError, match="start must be a vector of 20"):
        lanczos(lambda v: symmetric @ v, 20, k=2, start=torch.ones(19))
    with pytest.raises(ValueError, match="fewer than k"):
        lanczos(lambda v: symmetric @ v, 20, k=5, max_iterations=3)
    with pytest.raises(ValueError, match="matvec returned shape"):
        lanczos(lambda v: symmetric[:5] @ v, 20, k=2)


# -- preconditioners ---------------------------------------------------------------------------------------


def _dense_from_factors(preconditioner, layout):
    """``P`` from the factors by ``torch.kron`` in the [W b] row-major order, then permuted to ``layout``
    (a construction independent of ``KroneckerPreconditioner``'s own)."""
    p = torch.eye(layout.size, dtype=torch.float64)
    for block in preconditioner.blocks:
        n_out, n_in = block.shape
        # vec_row(G M A) = (G ⊗ Aᵀ) vec_row(M) for M = [W b] (n_out × (n_in + 1))
        kron = torch.kron(block.output_factor.double().contiguous(), block.input_factor.double().T.contiguous())
        positions = []
        for o in range(n_out):
            for i in range(n_in + 1):
                positions.append(block.weight.start + o * n_in + i if i < n_in else block.bias.start + o)
        index = torch.tensor(positions)
        p[index.unsqueeze(1), index.unsqueeze(0)] = kron
    return p


def _generalized_top(curvature, p, k):
    """Top-k eigenvalues of ``P⁻¹ C`` through a Cholesky factor of ``P`` (not the symmetric root)."""
    lower = torch.linalg.cholesky(p)
    middle = torch.linalg.solve_triangular(lower, torch.linalg.solve_triangular(lower, curvature, upper=False).T,
                                           upper=False)
    return top(torch.linalg.eigvalsh((middle + middle.T) / 2), k)


def _kfac_problem():
    model, x, y = small_problem(seed=5, n=30)
    optimizer = KFAC(model, lr=1.0, damping=0.1, momentum=0.0, running_average=0.0)
    torch.manual_seed(0)
    optimizer.update_statistics(x)
    return model, x, y, optimizer


def test_kfac_preconditioner_is_kfac_step_and_its_spectrum_matches_dense():
    model, x, y, optimizer = _kfac_problem()
    layout = C.parameter_layout(model)
    preconditioner = kfac_preconditioner(optimizer, layout)
    p = _dense_from_factors(preconditioner, layout)
    torch.testing.assert_close(preconditioner.dense(), p, rtol=1e-12, atol=1e-12)
    # K-FAC's own step (lr 1, no momentum) is −P⁻¹∇
    gradient = C.flat_gradient(model, SquaredError(), x, y)
    before = C.flat_parameters(model)
    optimizer.zero_grad()
    SquaredError()(model(x), y).backward()
    optimizer.step()
    step = C.flat_parameters(model) - before
    torch.testing.assert_close(step, -preconditioner.inverse(gradient), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(preconditioner.inverse(gradient), torch.linalg.solve(p, gradient), rtol=1e-9, atol=1e-11)
    # the preconditioned GN spectrum (at the parameters where the factors were measured)
    C.set_flat_parameters(model, before)
    gauss_newton = C.gauss_newton(model, SquaredError(), x, y)
    products = CurvatureProducts(model, SquaredError(), x, y)
    operator = preconditioned_operator(products.gauss_newton_vector_product, preconditioner)
    result = lanczos(operator, layout.size, k=5, tol=1e-12, max_iterations=layout.size)
    torch.testing.assert_close(result.eigenvalues, _generalized_top(gauss_newton, p, 5), rtol=1e-8, atol=1e-10)
    optimizer.remove_hooks()


def test_acp_preconditioner_is_acp_update_and_its_spectrum_matches_dense():
    model, x, y = small_problem(seed=6, n=30)
    alpha = 2.5
    optimizer = ACP(model, lr=1.0, damping=0.2, alpha=alpha)
    statistics = torch.randn(25, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    optimizer.update_statistics(statistics)
    layout = C.parameter_layout(model)
    # h̄: the mean of each layer's input on the training minibatch (ACP centres with it, eq. 6.3.3)
    means = []
    hooks = [layer.register_forward_hook(lambda m, a, o: means.append(a[0].detach().mean(dim=0)))
             for layer in optimizer.layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    preconditioner = acp_preconditioner(optimizer, layout, means)
    p = _dense_from_factors(preconditioner, layout)
    gradient = C.flat_gradient(model, SquaredError(), x, y)
    before = C.flat_parameters(model)
    optimizer.zero_grad()
    SquaredError()(model(x), y).backward()
    optimizer.step()
    step = C.flat_parameters(model) - before
    torch.testing.assert_close(step, -torch.linalg.solve(p, gradient), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(preconditioner.inverse(gradient), torch.linalg.solve(p, gradient), rtol=1e-9, atol=1e-11)
    C.set_flat_parameters(model, before)
    gauss_newton = C.gauss_newton(model, SquaredError(), x, y)
    products = CurvatureProducts(model, SquaredError(), x, y)
    operator = preconditioned_operator(products.gauss_newton_vector_product, preconditioner)
    result = lanczos(operator, layout.size, k=5, tol=1e-12, max_iterations=layout.size)
    torch.testing.assert_close(result.eigenvalues, _generalized_top(gauss_newton, p, 5), rtol=1e-8, atol=1e-10)
    optimizer.remove_hooks()


def test_preconditioners_refuse_missing_statistics_and_heuristic_alpha_without_alphas():
    model, x, y = small_problem()
    layout = C.parameter_layout(model)
    kfac = KFAC(model)
    with pytest.raises(ValueError, match="no factors yet"):
        kfac_preconditioner(kfac, layout)
    kfac.remove_hooks()
    acp = ACP(model, alpha=None)
    means = [torch.zeros(layer.in_features, dtype=torch.float64) for layer in acp.layers]
    with pytest.raises(ValueError, match="no covariance yet"):
        acp_preconditioner(acp, layout, means)
    acp.update_statistics(x)
    with pytest.raises(ValueError, match="heuristic"):
        acp_preconditioner(acp, layout, means)
    acp.remove_hooks()


def test_hutchinson_trace_exact_on_diagonal_and_unbiased_in_general():
    diagonal = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
    samples = hutchinson_trace(lambda v: diagonal @ v, 30, n_probes=3)
    assert torch.allclose(samples, torch.full((3,), float(diagonal.trace()), dtype=torch.float64))
    model, x, y = small_problem()
    gauss_newton = C.gauss_newton(model, SquaredError(), x, y)
    samples = hutchinson_trace(lambda v: gauss_newton @ v, gauss_newton.shape[0], n_probes=4000, seed=1)
    error = abs(float(samples.mean()) - float(gauss_newton.trace()))
    assert error < 4 * float(samples.std()) / 4000 ** 0.5  # within four standard errors
    with pytest.raises(ValueError, match="n_probes"):
        hutchinson_trace(lambda v: v, 3, n_probes=0)
