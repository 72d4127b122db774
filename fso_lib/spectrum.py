"""The top of a curvature spectrum without the matrix: Lanczos (thesis §3.1.2, §3.2; LeCun's 1/λ_max, §3.1.2).

A curvature matrix of the deep autoencoder has 2.8 M rows: it cannot be formed, but its product with a
vector can (:mod:`fso_lib.matrix_free`). The Lanczos method needs nothing else. From a start vector ``q₁``
it builds an orthonormal basis ``Q_m = [q₁ … q_m]`` of the Krylov space ``span(q₁, A q₁, …, A^{m−1} q₁)``
in which ``A`` is tridiagonal::

    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ,    T_m = tridiag(β, α, β),    α_j = q_jᵀ A q_j.

The eigenvalues ``θ_i`` of the small ``T_m`` (the Ritz values) approach the extreme eigenvalues of ``A``
first, and the residual of the Ritz pair ``(θ_i, y_i = Q_m s_i)`` is known without another product:
``‖A y_i − θ_i y_i‖ = |β_m| · |s_i[m]|`` (the last entry of the eigenvector ``s_i`` of ``T_m``). For a symmetric
``A`` each Ritz value lies within that residual of an eigenvalue, which is the convergence test used here.

Choices of :func:`lanczos`: every new vector is re-orthogonalized against the whole basis (twice; the plain
three-term recurrence loses orthogonality once a Ritz value converges and then reports it again as a "ghost"),
the basis and ``T_m`` are kept in float64 whatever the operator's dtype, the start vector is drawn from a
seeded generator (the same seed gives the same numbers), and when the Krylov space closes (``β ≈ 0``: an
invariant subspace was found) the iteration goes on from a fresh random vector orthogonal to the basis.

:class:`KroneckerPreconditioner` gives ``v ↦ P^{-1/2} v`` for a layer-wise Kronecker-factored ``P`` (K-FAC's
``A ⊗ G``, ACP's ``Ã ⊗ αI``, §6.3), so that the spectrum of ``P^{-1/2} G_GN P^{-1/2}`` — the curvature as the
preconditioned method sees it — is one more symmetric operator for :func:`lanczos`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .curvature import ParameterLayout
from .optim.kfac import factored_damping

__all__ = [
    "LanczosResult", "lanczos", "NonSymmetricOperatorError",
    "KroneckerBlock", "KroneckerPreconditioner", "preconditioned_operator",
    "kfac_preconditioner", "acp_preconditioner", "acp_input_factor", "layer_blocks", "read_spectrum_log",
    "hutchinson_trace",
]

WHICH = ("largest", "magnitude")


class NonSymmetricOperatorError(ValueError):
    """The operator given to :func:`lanczos` is not symmetric (``uᵀ A v ≠ vᵀ A u``)."""


@dataclass
class LanczosResult:
    """Ritz values (float64, in the order asked for: largest first, or largest ``|λ|`` first), their residual
    norms ``‖A y − θ y‖``, the Ritz vectors (columns, float64) when asked for, and how the run ended."""

    eigenvalues: torch.Tensor
    residual_norms: torch.Tensor
    eigenvectors: torch.Tensor | None
    n_products: int
    converged: bool
    alphas: torch.Tensor
    betas: torch.Tensor
    basis: torch.Tensor | None = None

    def tridiagonal(self) -> torch.Tensor:
        """``T_m`` (float64): ``alphas`` on the diagonal, ``betas[:-1]`` beside it."""
        return _tridiagonal(self.alphas.tolist(), self.betas.tolist())

    def as_dict(self) -> dict:
        """Plain numbers (for a JSON line)."""
        return {
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "residual_norms": [float(v) for v in self.residual_norms],
            "n_products": self.n_products,
            "converged": self.converged,
        }


def _ritz_order(values: torch.Tensor, which: str) -> torch.Tensor:
    key = values if which == "largest" else values.abs()
    return torch.argsort(key, descending=True)


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w`` minus its projection on the rows of ``basis`` (classical Gram–Schmidt, twice)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dimension: int,
    k: int = 5,
    max_iterations: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    which: str = "largest",
    return_eigenvectors: bool = False,
    start: torch.Tensor | None = None,
    check_symmetry: bool = True,
    symmetry_tol: float = 1e-3,
    operator_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    keep_basis: bool = False,
) -> LanczosResult:
    """The ``k`` largest eigenvalues (``which="largest"``) or the ``k`` largest in magnitude (``"magnitude"``)
    of the symmetric operator ``v ↦ matvec(v)`` on vectors of ``dimension`` entries.

    Stops when every one of the ``k`` wanted Ritz pairs has residual ``≤ tol · max(|θ|)`` (``converged``),
    after ``max_iterations`` Lanczos products (default ``min(dimension, max(3k, k + 30))``), or when the Krylov space is
    the whole space. ``start``: the first vector (e.g. the previous top Ritz vector, to follow a spectrum
    along training); else a normal vector from ``torch.Generator().manual_seed(seed)``. ``check_symmetry``
    spends one more product on the test ``|uᵀ A q₁ − q₁ᵀ A u| ≤ symmetry_tol · (‖A u‖ + ‖A q₁‖)`` with a second
    random unit ``u`` (``n_products`` counts it) and raises :class:`NonSymmetricOperatorError` when it fails. ``operator_dtype``: the dtype ``matvec``
    takes (e.g. float32 for a network in float32); the Lanczos vectors themselves stay float64.
    ``callback(n_products, ritz_values, residuals)`` is called after each product (for progress logs) with the
    wanted Ritz values so far. ``keep_basis``: return ``Q_m`` (rows ``q_1 … q_m``, float64) as ``basis``.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    dimension, k = int(dimension), int(k)
    if dimension < 1:
        raise ValueError(f"dimension must be positive, got {dimension}")
    if not 1 <= k <= dimension:
        raise ValueError(f"k = {k} eigenvalues were asked for an operator of dimension {dimension}: "
                         f"k must be between 1 and the dimension.")
    if max_iterations is None:
        max_iterations = min(dimension, max(3 * k, k + 30))
    max_iterations = min(int(max_iterations), dimension)
    if max_iterations < k:
        raise ValueError(f"max_iterations = {max_iterations} is fewer than k = {k}: Lanczos finds at most one "
                         "eigenvalue per iteration.")
    generator = torch.Generator().manual_seed(int(seed))
    if start is None:
        q = torch.randn(dimension, generator=generator, dtype=torch.float64)
    else:
        if start.shape != (dimension,):
            raise ValueError(f"start must be a vector of {dimension} entries, got shape {tuple(start.shape)}")
        q = start.detach().to(device="cpu", dtype=torch.float64).clone()
    device = torch.device(device) if device is not None else (start.device if start is not None else torch.device("cpu"))
    q = q.to(device)
    norm = torch.linalg.vector_norm(q)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError("the start vector must be finite and nonzero")
    q = q / norm

    def apply(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v if operator_dtype is None else v.to(operator_dtype))
        if out.shape != (dimension,):
            raise ValueError(f"matvec returned shape {tuple(out.shape)} for a vector of {dimension} entries")
        out = out.to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("matvec returned inf or NaN")
        return out

    basis = q.unsqueeze(0)  # rows q_1 … q_j (float64)
    alphas: list[float] = []
    betas: list[float] = []
    n_products = 0
    w = apply(q)
    n_products += 1
    if check_symmetry and dimension > 1:
        u = torch.randn(dimension, generator=generator, dtype=torch.float64).to(device)
        u = u / torch.linalg.vector_norm(u)
        au = apply(u)
        n_products += 1
        scale = float(torch.linalg.vector_norm(au) + torch.linalg.vector_norm(w))
        asymmetry = abs(float(u @ w) - float(q @ au))
        if scale > 0 and asymmetry > symmetry_tol * scale:
            raise NonSymmetricOperatorError(
                f"the operator is not symmetric: uᵀAq − qᵀAu = {asymmetry:.3g} for unit random u, q, against "
                f"‖Au‖ + ‖Aq‖ = {scale:.3g} (tolerance {symmetry_tol:g}). Lanczos needs a symmetric operator "
                "(a Hessian, a Gauss-Newton matrix, P^(-1/2) G P^(-1/2)), not e.g. P^(-1) G.")
    values = vectors = residuals = None
    converged = False
    while True:
        j = len(alphas)
        alpha = float(q @ w)
        alphas.append(alpha)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[-2]
        w = _orthogonalize(w, basis)
        beta = float(torch.linalg.vector_norm(w))
        betas.append(beta)
        t = _tridiagonal(alphas, betas)
        values, vectors = torch.linalg.eigh(t)
        order = _ritz_order(values, which)
        scale = float(values.abs().max()) if values.numel() else 0.0
        residuals = (beta * vectors[-1, :]).abs()
        wanted = order[: min(k, j + 1)]
        if callback is not None:
            callback(n_products, values[wanted], residuals[wanted])
        if j + 1 >= k and bool((residuals[wanted] <= tol * max(scale, 1e-300)).all()):
            converged = True
            break
        if j + 1 >= dimension:
            converged = True  # the whole space: the Ritz values are the eigenvalues
            break
        if j + 1 >= max_iterations:
            break
        if beta <= 1e-12 * max(scale, 1e-300):
            # invariant subspace found: continue from a random vector orthogonal to it (T splits into blocks)
            betas[-1] = 0.0
            fresh = torch.randn(dimension, generator=generator, dtype=torch.float64).to(device)
            fresh = _orthogonalize(fresh, basis)
            q = fresh / torch.linalg.vector_norm(fresh)
        else:
            q = w / beta
        basis = torch.cat([basis, q.unsqueeze(0)])
        w = apply(q)
        n_products += 1
    order = _ritz_order(values, which)[:k]
    if residuals is None or order.numel() < k:
        raise RuntimeError("Lanczos stopped before finding k Ritz values; raise max_iterations.")
    eigenvectors = None
    if return_eigenvectors:
        eigenvectors = basis.T @ vectors[:, order]
    # betas holds β_1 … β_m; the last one couples to the next (unbuilt) vector
    return LanczosResult(values[order].clone(), residuals[order].clone(), eigenvectors, n_products, converged,
                         torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64),
                         basis if keep_basis else None)


def hutchinson_trace(matvec: Callable[[torch.Tensor], torch.Tensor], dimension: int, n_probes: int = 10, seed: int = 0,
                     operator_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``n_probes`` unbiased samples ``vᵀ A v`` of ``tr A`` with Rademacher vectors ``v`` (entries ±1, seeded;
    Hutchinson 1990): their mean estimates the trace, their spread its error. Exact for a diagonal ``A``. With
    the top eigenvalue from :func:`lanczos`, ``λ_max / (tr A / dimension)`` says how far the top stands above the
    average eigenvalue: what a top-k alone cannot tell."""
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be positive, got {n_probes}")
    generator = torch.Generator().manual_seed(int(seed))
    samples = []
    for _ in range(int(n_probes)):
        v = torch.randint(0, 2, (int(dimension),), generator=generator, dtype=torch.float64) * 2 - 1
        out = matvec(v if operator_dtype is None else v.to(operator_dtype)).to(torch.float64).cpu()
        samples.append(float(v @ out))
    return torch.tensor(samples, dtype=torch.float64)


# -- Kronecker-factored preconditioners ----------------------------------------------------------------------


@dataclass
class KroneckerBlock:
    """One layer's ``P_l = input_factor ⊗ output_factor`` acting on ``M = [W b]`` (n_out × (n_in + 1)) as
    ``M ↦ output_factor · M · input_factor``. ``bias`` is False for a layer without a bias (then the factor is
    n_in × n_in)."""

    weight: slice
    bias: slice | None
    shape: tuple[int, int]
    input_factor: torch.Tensor
    output_factor: torch.Tensor


def _inverse_sqrt(matrix: torch.Tensor, what: str) -> torch.Tensor:
    matrix = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    if float(values.min()) <= 0:
        raise ValueError(f"{what} is not positive definite (smallest eigenvalue {float(values.min()):.3g}): "
                         "a preconditioner needs damping.")
    return (vectors * values.rsqrt()) @ vectors.T


class KroneckerPreconditioner:
    """``v ↦ P^{-1/2} v`` (and ``P^{-1} v``) for a block-diagonal ``P`` with one Kronecker block per layer
    (thesis §6.3): on layer ``l``, ``[W b] ↦ Gₗ^{-1/2} [W b] Aₗ^{-1/2}``. Parameters outside every block (none for
    the book's MLPs) are left unchanged. The inverse square roots are formed once, in float64, by ``eigh``."""

    def __init__(self, blocks: Sequence[KroneckerBlock], dimension: int):
        self.blocks = list(blocks)
        self.dimension = int(dimension)
        self._roots = [(_inverse_sqrt(b.input_factor, f"input factor of layer {i}"),
                        _inverse_sqrt(b.output_factor, f"output factor of layer {i}")) for i, b in enumerate(self.blocks)]

    def _apply(self, vector: torch.Tensor, power: int) -> torch.Tensor:
        if vector.shape != (self.dimension,):
            raise ValueError(f"expected a vector of {self.dimension} entries, got shape {tuple(vector.shape)}")
        out = vector.clone()
        for block, (root_in, root_out) in zip(self.blocks, self._roots):
            n_out, n_in = block.shape
            parts = [vector[block.weight].reshape(n_out, n_in)]
            if block.bias is not None:
                parts.append(vector[block.bias].reshape(n_out, 1))
            matrix = torch.cat(parts, dim=1).to(torch.float64)
            for _ in range(power):
                matrix = root_out @ matrix @ root_in
            matrix = matrix.to(vector.dtype)
            out[block.weight] = matrix[:, :n_in].reshape(-1)
            if block.bias is not None:
                out[block.bias] = matrix[:, n_in]
        return out

    def inverse_sqrt(self, vector: torch.Tensor) -> torch.Tensor:
        """``P^{-1/2} v``."""
        return self._apply(vector, 1)

    def inverse(self, vector: torch.Tensor) -> torch.Tensor:
        """``P^{-1} v`` (the preconditioned direction a method steps along)."""
        return self._apply(vector, 2)

    def dense(self) -> torch.Tensor:
        """The matrix ``P`` itself (float64; for tests on small networks only)."""
        p = torch.eye(self.dimension, dtype=torch.float64)
        for block in self.blocks:
            n_out, n_in = block.shape
            rows = [block.weight.start + o * n_in + i for o in range(n_out) for i in range(n_in)]
            columns = [(o, i) for o in range(n_out) for i in range(n_in)]
            if block.bias is not None:
                rows += [block.bias.start + o for o in range(n_out)]
                columns += [(o, n_in) for o in range(n_out)]
            a, g = block.input_factor.to(torch.float64), block.output_factor.to(torch.float64)
            index = torch.tensor(rows)
            out_index = torch.tensor([c[0] for c in columns])
            in_index = torch.tensor([c[1] for c in columns])
            sub = g[out_index][:, out_index] * a[in_index][:, in_index]
            p[index.unsqueeze(1), index.unsqueeze(0)] = sub
        return p


def preconditioned_operator(matvec: Callable[[torch.Tensor], torch.Tensor],
                            preconditioner: KroneckerPreconditioner) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ P^{-1/2} C P^{-1/2} v`` for the curvature product ``matvec`` (``C v``): symmetric when ``C`` is,
    with the eigenvalues of ``P^{-1} C`` (the curvature seen by the preconditioned method)."""
    def product(vector: torch.Tensor) -> torch.Tensor:
        return preconditioner.inverse_sqrt(matvec(preconditioner.inverse_sqrt(vector)))
    return product


def layer_blocks(model: nn.Module, layout: ParameterLayout, layers: Sequence[nn.Module]) -> list[tuple[slice, slice | None, tuple[int, int]]]:
    """``(weight rows, bias rows, (n_out, n_in))`` of each ``nn.Linear`` in ``layers`` within ``layout``."""
    names = {module: name for name, module in model.named_modules()}
    out = []
    for layer in layers:
        if layer not in names:
            raise ValueError("a layer of the optimizer is not a module of the model given")
        prefix = names[layer] + "." if names[layer] else ""
        weight = layout.slices[prefix + "weight"]
        bias = layout.slices.get(prefix + "bias") if layer.bias is not None else None
        out.append((weight, bias, tuple(layer.weight.shape)))
    return out


def kfac_preconditioner(optimizer, layout: ParameterLayout, damping: float | None = None) -> KroneckerPreconditioner:
    """K-FAC's damped curvature ``(A + πγ I) ⊗ (G + (γ/π) I)`` per layer, ``γ = √ε``, ``π`` as in
    :class:`fso_lib.optim.KFAC` (Martens & Grosse 2015, §6.3), from the factors ``A = E[ã ãᵀ]``, ``G = E[g gᵀ]``
    that the optimizer keeps in its state after :meth:`update_statistics`. ``damping``: ε (default: the
    optimizer's current one)."""
    blocks = []
    for (weight, bias, shape), layer, group in zip(layer_blocks(optimizer.model, layout, optimizer.layers),
                                                   optimizer.layers, optimizer.param_groups):
        state = optimizer.state[layer.weight]
        if "A" not in state:
            raise ValueError("the K-FAC optimizer has no factors yet: call update_statistics(x) first")
        a, g = state["A"].to(torch.float64), state["G"].to(torch.float64)
        input_shift, gradient_shift = factored_damping(a, g, group["damping"] if damping is None else damping)
        eye_a = torch.eye(a.shape[0], dtype=torch.float64)
        eye_g = torch.eye(g.shape[0], dtype=torch.float64)
        blocks.append(KroneckerBlock(weight, bias, shape, a + input_shift * eye_a, g + gradient_shift * eye_g))
    return KroneckerPreconditioner(blocks, layout.size)


def acp_input_factor(covariance: torch.Tensor, mean: torch.Tensor, damping_over_alpha: float) -> torch.Tensor:
    """ACP's input-side factor on ``ã = [h; 1]`` (§6.3.2): ``[[C + δI + h̄h̄ᵀ, h̄], [h̄ᵀ, 1]]`` with ``δ = ε/α``.

    Its inverse is ``[[P, −P h̄], [−h̄ᵀP, 1 + h̄ᵀ P h̄]]`` with ``P = (C + δI)⁻¹``, so that
    ``(1/α) [∇_W, ∇_b] · inverse`` is ACP's update ``ΔW = (1/α)(∇_W − ∇_b h̄ᵀ) P``, ``Δb = (1/α)∇_b − ΔW h̄``
    (eqs. 6.3.3–6.3.4): the ACP block of the curvature is ``α · this ⊗ I``."""
    covariance = covariance.to(torch.float64)
    mean = mean.to(torch.float64).reshape(-1)
    n_in = covariance.shape[0]
    out = torch.empty(n_in + 1, n_in + 1, dtype=torch.float64)
    out[:n_in, :n_in] = covariance + damping_over_alpha * torch.eye(n_in, dtype=torch.float64) + torch.outer(mean, mean)
    out[:n_in, n_in] = mean
    out[n_in, :n_in] = mean
    out[n_in, n_in] = 1.0
    return out


def acp_preconditioner(optimizer, layout: ParameterLayout, means: Sequence[torch.Tensor],
                       alphas: Sequence[float] | None = None) -> KroneckerPreconditioner:
    """ACP's curvature ``α Ã_δ ⊗ I`` per layer (:func:`acp_input_factor`; thesis §6.3.2, §6.4.2) from the input
    covariance ``C`` the optimizer keeps in its state after :meth:`update_statistics`, its damping ε, and per
    layer the input mean ``h̄`` and the scale ``α`` (the optimizer's fixed α when it has one; for the heuristic α
    the caller passes ``alphas``, e.g. ``max_{i,j} (∂l_i/∂a_j)²`` on the minibatch whose curvature is studied:
    the optimizer does not keep the α of its last minibatch)."""
    blocks = []
    layers = optimizer.layers
    if len(means) != len(layers):
        raise ValueError(f"one input mean per layer: {len(layers)} layers, {len(means)} means")
    for k, ((weight, bias, shape), layer, group) in enumerate(zip(layer_blocks(optimizer.model, layout, layers),
                                                                  layers, optimizer.param_groups)):
        state = optimizer.state[layer.weight]
        if "covariance" not in state:
            raise ValueError("the ACP optimizer has no covariance yet: call update_statistics(x) first")
        alpha = group["alpha"] if alphas is None else alphas[k]
        if alpha is None:
            raise ValueError("this ACP uses the heuristic α: pass alphas (one per layer)")
        alpha = float(alpha)
        epsilon = float(group["damping"])
        if bias is None:
            raise ValueError("ACP's block needs a bias (the centering moves it)")
        input_factor = alpha * acp_input_factor(state["covariance"], means[k], epsilon / alpha)
        output_factor = torch.eye(shape[0], dtype=torch.float64)
        blocks.append(KroneckerBlock(weight, bias, shape, input_factor, output_factor))
    return KroneckerPreconditioner(blocks, layout.size)


# -- reading scripts/autoencoder_spectrum.py's log ----------------------------------------------------------------


def read_spectrum_log(path: str | Path) -> dict:
    """The records of ``spectrum.jsonl`` (scripts/autoencoder_spectrum.py), grouped: ``header`` (the last one),
    ``training[(method, update, matrix)]``, ``eos[lr]`` (the measurements of the finished attempt, by step; an
    attempt that a restart abandoned is dropped), ``eos_diverged`` (lrs whose run diverged),
    ``preconditioned[operator]``, ``trace[operator]`` (Hutchinson samples), ``training_config[method]``."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = {"header": None, "training": {}, "eos": {}, "eos_diverged": set(), "preconditioned": {}, "trace": {},
           "training_config": {}}
    finished = {r["lr"]: r["attempt"] for r in records if r.get("kind") == "eos_done"}
    for r in records:
        kind = r.get("kind")
        if kind == "header":
            out["header"] = r
        elif kind == "training":
            out["training"][(r["method"], r["update"], r["matrix"])] = r
        elif kind == "training_config":
            out["training_config"][r["method"]] = r
        elif kind == "eos" and finished.get(r["lr"]) == r["attempt"]:
            out["eos"].setdefault(r["lr"], []).append(r)
        elif kind == "eos_diverged" and finished.get(r["lr"]) == r["attempt"]:
            out["eos_diverged"].add(r["lr"])
        elif kind == "preconditioned":
            out["preconditioned"][r["operator"]] = r
        elif kind == "trace":
            out["trace"][r["operator"]] = r
    for lr in out["eos"]:
        out["eos"][lr].sort(key=lambda r: r["step"])
    return out
