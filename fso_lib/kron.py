"""Kronecker products and the factored curvature block of one layer (thesis §6.3).

Conventions
-----------
The thesis stacks the *columns* of a matrix: ``vec(X) = [X[:, 0]; X[:, 1]; ...]``, and with it

* ``vec(A X B) = (Bᵀ ⊗ A) vec(X)``,
* ``(A ⊗ B)(C ⊗ D) = AC ⊗ BD`` and ``(A ⊗ B)⁻¹ = A⁻¹ ⊗ B⁻¹``,
* for ``a = W h + b``: ``a = (hᵀ ⊗ I) vec(W) + b``, so with ``θ = vec([W b])`` the Jacobian of the
  network output is ``J_θ = [hᵀ 1] ⊗ J_a`` (eq. 6.3.1) and the layer's GN/Fisher block is
  ``(1/n) Σ_i [h_i; 1][h_i; 1]ᵀ ⊗ J_{a_i}ᵀ D_i J_{a_i}`` (eq. 6.3.2), *input factor on the left*.

**Torch stores ``W`` (n_out × n_in) row-major**: ``W.flatten()`` is ``vec(Wᵀ)`` in the thesis's
convention. In the "augmented row-major" order ``[W b].flatten()`` the same block reads
``Σ_i B_i ⊗ A_i``: the factor order flips (gradient factor on the left). And torch's own parameter
layout, ``[W.flatten(); b]``, is a third order, a permutation of both; :func:`thesis_to_torch_permutation`
converts between the thesis order and it.

Every function here works in the thesis order unless its name says otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer_stats import LayerCapture, augmented_second_moment

#: The activation modules :func:`sequential_backward_factors` accepts: element-wise, so their Jacobian is diagonal.
ELEMENTWISE_ACTIVATIONS = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.Softplus, nn.Identity)

__all__ = [
    "vec",
    "unvec",
    "kron",
    "augment",
    "thesis_to_torch_permutation",
    "block_to_torch_order",
    "block_to_thesis_order",
    "per_example_parameter_jacobians",
    "preactivation_jacobians",
    "backward_factors",
    "sequential_backward_factors",
    "factored_block",
    "APPROXIMATIONS",
    "relative_error",
    "relative_errors_matrix_free",
]


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-stacking ``vec`` of the thesis (Fortran order)."""
    return x.transpose(-1, -2).reshape(*x.shape[:-2], -1)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`vec`: a (rows × cols) matrix whose columns are consecutive slices of ``v``."""
    return v.reshape(cols, rows).T


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A ⊗ B``: the block matrix whose block (i, j) is ``a_ij B``."""
    return torch.kron(a.contiguous(), b.contiguous())


def augment(h: torch.Tensor) -> torch.Tensor:
    """``[h, 1]``: append a column of ones to the (n, n_in) inputs, for the bias."""
    return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)


def thesis_to_torch_permutation(n_in: int, n_out: int) -> torch.Tensor:
    """Index ``p`` with ``θ_thesis = θ_torch[p]``.

    ``θ_thesis = vec([W b])`` (column-stacked, bias column last) and ``θ_torch = [W.flatten(); b]``
    (the order of ``torch.nn.utils.parameters_to_vector`` for one ``nn.Linear``).
    """
    rows = torch.arange(n_out).repeat(n_in + 1)  # thesis index c·n_out + r  →  (r, c)
    cols = torch.arange(n_in + 1).repeat_interleave(n_out)
    return torch.where(cols < n_in, rows * n_in + cols, n_out * n_in + rows)


def block_to_torch_order(block: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """Reorder a (thesis-order) layer block to torch's ``[W.flatten(); b]`` order."""
    inverse = torch.argsort(thesis_to_torch_permutation(n_in, n_out))
    return block[inverse][:, inverse]


def block_to_thesis_order(block: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """Reorder a layer block from torch's ``[W.flatten(); b]`` order to the thesis's ``vec([W b])``."""
    p = thesis_to_torch_permutation(n_in, n_out)
    return block[p][:, p]


def per_example_parameter_jacobians(h: torch.Tensor, jac_a: torch.Tensor) -> torch.Tensor:
    """``J_θ(x_i) = [h_iᵀ 1] ⊗ J_{a_i}`` for every example (eq. 6.3.1), thesis order.

    ``h``: (n, n_in) inputs of the layer; ``jac_a``: (n, d, n_out) Jacobians of the d network outputs
    w.r.t. the layer's pre-activations. Returns (n, d, (n_in+1)·n_out).
    """
    ha = augment(h)
    # (hᵀ ⊗ J)[k, c·n_out + r] = h_c J[k, r]
    return torch.einsum("nc,nkr->nkcr", ha, jac_a).reshape(h.shape[0], jac_a.shape[1], -1)


def preactivation_jacobians(model: nn.Module, x: torch.Tensor):
    """Inputs ``h`` and Jacobians ``J_a`` of the network output w.r.t. each layer's pre-activation.

    Returns ``(output, inputs, jacobians)``: ``inputs[l]`` is (n, n_in_l) and ``jacobians[l]`` is
    (n, d, n_out_l), with d the number of network outputs. One backward pass per output unit:
    meant for the small networks of the notebooks and tests. The parameters' ``.grad`` are left as they
    were before the call (the backward passes would otherwise add to them).
    """
    saved_grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved_grads:
        p.grad = None
    try:
        output, inputs, rows = _capture_jacobian_rows(model, x)
    finally:
        for p, grad in saved_grads:
            p.grad = grad
    # examples are independent, so ∂(Σ_i f_k(x_i))/∂a_i = ∂f_k(x_i)/∂a_i
    jacobians = [torch.stack(r, dim=1) for r in rows]
    return output.detach(), inputs, jacobians


def _capture_jacobian_rows(model: nn.Module, x: torch.Tensor):
    with LayerCapture(model) as capture:
        output = model(x)
        d = output.shape[1]
        rows = [[] for _ in capture.layers]
        for k in range(d):
            capture.grads = [None] * len(capture.layers)
            output[:, k].sum().backward(retain_graph=k < d - 1)
            for l, g in enumerate(capture.grads):
                rows[l].append(g)
        inputs = list(capture.inputs)
    return output, inputs, rows


def backward_factors(jac_a: torch.Tensor, output_hessians: torch.Tensor | None = None) -> torch.Tensor:
    """``B_i = J_{a_i}ᵀ D_i J_{a_i}`` for every example: (n, n_out, n_out).

    ``output_hessians`` is (n, d, d) (the loss's Hessian w.r.t. the network output, or the Fisher's
    D matrix); ``None`` means ``D_i = I``.
    """
    if output_hessians is None:
        return torch.einsum("nkr,nks->nrs", jac_a, jac_a)
    return torch.einsum("nkr,nkl,nls->nrs", jac_a, output_hessians, jac_a)


def sequential_backward_factors(model: nn.Sequential, x: torch.Tensor, loss, target: torch.Tensor,
                                dtype: torch.dtype = torch.float64):
    """The exact ``B_i = J_{a_i}ᵀ D_i J_{a_i}`` of every linear layer of an MLP, by the backward recursion (§6.3).

    ``model`` is an ``nn.Sequential`` of ``nn.Linear`` layers and element-wise activations (the book's MLPs);
    ``D_i = loss.output_hessian(f(x_i), y_i)`` is the loss's Hessian w.r.t. the network output (``2I`` for the
    book's squared error ``‖f − y‖²``). With ``Φ'_l = diag(φ_l'(a_l))`` (the activations that follow layer ``l``,
    composed) and ``a_{l+1} = W_{l+1} φ_l(a_l) + b_{l+1}``, the chain rule ``J_{a_l} = J_{a_{l+1}} W_{l+1} Φ'_l``
    gives, per example,

    ``B_L = Φ'_L D Φ'_L``,   ``B_l = Φ'_l W_{l+1}ᵀ B_{l+1} W_{l+1} Φ'_l``,

    so no Jacobian (d × n_out per example) is formed: one (n_out × n_out) matrix per example and layer.
    A generator, last layer first: yields ``(index, h, b)`` with ``index`` the layer's position among the linear
    layers, ``h`` its inputs (n, n_in) and ``b`` (n, n_out, n_out), all in ``dtype``; only the current layer's and
    the next one's factors are held. The forward pass uses the parameters directly (no module hooks run), without
    autograd. Meant for networks whose widest layer fits n × n_out² numbers in memory.
    """
    inputs, weights, slopes = [], [], []
    h = x.detach().to(dtype)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                weight = module.weight.detach().to(dtype)
                bias = None if module.bias is None else module.bias.detach().to(dtype)
                inputs.append(h)
                weights.append(weight)
                h = torch.nn.functional.linear(h, weight, bias)
                slopes.append(torch.ones_like(h))
            elif isinstance(module, ELEMENTWISE_ACTIVATIONS):
                if not weights:
                    raise ValueError("sequential_backward_factors: the network must start with an nn.Linear layer.")
                # φ'(a) of an element-wise function: its Jacobian-vector product with a vector of ones
                _, slope = torch.func.jvp(module.forward, (h,), (torch.ones_like(h),))
                slopes[-1] = slopes[-1] * slope
                h = module.forward(h)
            else:
                raise ValueError(f"sequential_backward_factors: {type(module).__name__} is neither nn.Linear nor one of "
                                 f"the element-wise activations {[c.__name__ for c in ELEMENTWISE_ACTIVATIONS]}.")
        output_hessians = loss.output_hessian(h, target.detach().to(dtype))          # (n, d, d)
        last = len(weights) - 1
        b = slopes[last][:, :, None] * output_hessians * slopes[last][:, None, :]
        del output_hessians
        for index in range(last, -1, -1):
            if index < last:
                w = weights[index + 1]                                                # (n_out_{l+1}, n_out_l)
                b = torch.matmul(torch.matmul(w.T, b), w)
                b = slopes[index][:, :, None] * b * slopes[index][:, None, :]
            yield index, inputs[index], b


#: The approximations of a layer's block that chapter 6 compares; the argument ``kind`` of :func:`factored_block`.
APPROXIMATIONS = {
    "sum_of_kronecker": "(1/n) Σ_i A_i ⊗ B_i, eq. 6.3.2 (exact for the block)",
    "kfac": "(1/n Σ_i A_i) ⊗ (1/n Σ_i B_i), K-FAC's product of sums (§6.5.1)",
    "acp": "(1/n Σ_i A_i) ⊗ α I, the covariance-only factor of ACP (§6.3.2)",
    "ekfac": "K-FAC's eigenbasis U_Ā ⊗ U_B̄ with the exact block's diagonal in it (George et al. 2018)",
}


def factored_block(h: torch.Tensor, b_factors: torch.Tensor, kind: str = "sum_of_kronecker", alpha: float | None = None) -> torch.Tensor:
    """A layer's GN/Fisher block or one of its factored approximations, in thesis order.

    ``h`` (n, n_in) are the layer inputs, ``b_factors`` (n, n_out, n_out) the backward factors
    ``B_i`` of :func:`backward_factors`, and ``A_i = [h_i; 1][h_i; 1]ᵀ``. ``kind`` is one of
    :data:`APPROXIMATIONS`. For ``"acp"``, ``alpha`` defaults to ``tr(B̄) / n_out`` with ``B̄`` the mean
    of the ``B_i``: the α for which the ACP block has the trace of the *K-FAC* block ``Ā ⊗ B̄``. The
    exact block's trace, ``(1/n) Σ_i tr(A_i) tr(B_i)``, differs from it unless ``tr(B_i)`` does not
    depend on ``i``.

    ``"ekfac"``: with ``Ā = U_A Λ_A U_Aᵀ`` and ``B̄ = U_B Λ_B U_Bᵀ`` (the K-FAC factors), the block
    ``Q diag(s) Qᵀ``, ``Q = U_A ⊗ U_B``, ``s = diag(Qᵀ F Q)`` with ``F`` the exact block: the matrix diagonal in
    K-FAC's eigenbasis that is closest to ``F`` in Frobenius norm. Computed from the per-example factors,
    ``s[j, k] = (1/n) Σ_i (U_Aᵀ a_i)_j² (U_Bᵀ B_i U_B)_kk``, without forming ``F``.
    """
    if h.dim() != 2:
        raise ValueError(f"h must hold the layer inputs as an (n, n_in) matrix; got shape {tuple(h.shape)}.")
    n = h.shape[0]
    if b_factors.dim() != 3 or b_factors.shape[0] != n or b_factors.shape[1] != b_factors.shape[2]:
        raise ValueError(f"b_factors must be (n, n_out, n_out) with n = {n}, the rows of h (one backward factor "
                         f"per example); got shape {tuple(b_factors.shape)}.")
    if kind == "sum_of_kronecker":
        ha = augment(h)
        # Σ_i (a_i a_iᵀ) ⊗ B_i  with entries [c·o + r, c'·o + r'] = a_c a_c' B[r, r']
        block = torch.einsum("nc,nd,nrs->crds", ha, ha, b_factors) / n
        size = ha.shape[1] * b_factors.shape[1]
        return block.reshape(size, size)
    a_factor = augmented_second_moment(h)
    if kind == "kfac":
        return kron(a_factor, b_factors.mean(dim=0))
    if kind == "acp":
        if alpha is None:
            alpha = float(torch.diagonal(b_factors, dim1=1, dim2=2).mean())
        eye = torch.eye(b_factors.shape[1], dtype=h.dtype, device=h.device)
        return kron(a_factor, alpha * eye)
    if kind == "ekfac":
        _, u_a = torch.linalg.eigh(a_factor)
        _, u_b = torch.linalg.eigh(b_factors.mean(dim=0))
        projected_inputs = (augment(h) @ u_a).square()                                 # (n, n_in+1)
        projected_backward = torch.einsum("rk,nrs,sk->nk", u_b, b_factors, u_b)      # (n, n_out)
        scales = projected_inputs.T @ projected_backward / n                          # s[j, k], thesis order j·n_out + k
        basis = kron(u_a, u_b)
        return (basis * scales.reshape(-1)) @ basis.T
    raise ValueError(f"Unknown approximation {kind!r}; choose one of {sorted(APPROXIMATIONS)}.")


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F``."""
    return float(torch.linalg.matrix_norm(approx - exact) / torch.linalg.matrix_norm(exact))


def relative_errors_matrix_free(h: torch.Tensor, b_factors: torch.Tensor, alpha: float | None = None,
                                with_exact_norm: bool = False) -> dict[str, float]:
    """``‖approx − F‖_F / ‖F‖_F`` for the ``"kfac"``, ``"acp"`` and ``"ekfac"`` blocks of :func:`factored_block`,
    without forming any (n_in+1)·n_out square matrix: for layers whose block is too large to store.

    With ``F = (1/n) Σ_i a_i a_iᵀ ⊗ B_i``: ``‖F‖² = (1/n²) Σ_ij (a_iᵀa_j)² ⟨B_i, B_j⟩``, ``⟨F, Ā ⊗ M⟩ =
    (1/n) Σ_i (a_iᵀ Ā a_i) ⟨B_i, M⟩``, ``‖Ā ⊗ M‖² = ‖Ā‖² ‖M‖²``; for EKFAC's ``D = Q diag(s) Qᵀ`` with
    ``s = diag(Qᵀ F Q)``, ``⟨F, D⟩ = ‖D‖² = ‖s‖²``, so ``‖F − D‖² = ‖F‖² − ‖s‖²`` (Pythagoras). ``alpha`` as in
    :func:`factored_block`. Costs O(n² (n_in + n_out²)) for the Gram matrices. ``with_exact_norm`` adds the key
    ``"exact_norm"``: ``‖F‖_F`` itself."""
    n, n_out = b_factors.shape[0], b_factors.shape[1]
    ha = augment(h)
    a_factor, b_mean = ha.T @ ha / n, b_factors.mean(dim=0)
    b_flat = b_factors.reshape(n, -1)
    exact_sq = float(((ha @ ha.T).square() * (b_flat @ b_flat.T)).sum()) / n ** 2
    quadratic = torch.einsum("ni,ij,nj->n", ha, a_factor, ha)            # a_iᵀ Ā a_i
    a_norm_sq = float(a_factor.square().sum())
    if alpha is None:
        alpha = float(torch.diagonal(b_factors, dim1=1, dim2=2).mean())
    kfac_dot = float((quadratic * (b_flat @ b_mean.reshape(-1))).mean())
    acp_dot = alpha * float((quadratic * torch.diagonal(b_factors, dim1=1, dim2=2).sum(1)).mean())
    errors_sq = {
        "kfac": exact_sq - 2 * kfac_dot + a_norm_sq * float(b_mean.square().sum()),
        "acp": exact_sq - 2 * acp_dot + a_norm_sq * alpha ** 2 * n_out,
    }
    _, u_a = torch.linalg.eigh(a_factor)
    _, u_b = torch.linalg.eigh(b_mean)
    scales = (ha @ u_a).square().T @ torch.einsum("rk,nrs,sk->nk", u_b, b_factors, u_b) / n
    errors_sq["ekfac"] = exact_sq - float(scales.square().sum())
    errors = {kind: max(value, 0.0) ** 0.5 / exact_sq ** 0.5 for kind, value in errors_sq.items()}
    if with_exact_norm:
        errors["exact_norm"] = exact_sq ** 0.5
    return errors
