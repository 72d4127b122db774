"""EKFAC: K-FAC with its diagonal re-estimated in K-FAC's own eigenbasis (George et al. 2018), for MLPs.

The thesis stops at K-FAC and ACP (§6.5); its author's next paper showed that K-FAC's block ``A ⊗ G`` is a
diagonal matrix in the Kronecker-factored eigenbasis ``U_A ⊗ U_G`` whose diagonal (the products of the factors'
eigenvalues) is not the best one: the best diagonal in that basis is the second moment of the per-example
gradient's coordinates. :class:`EKFAC` keeps everything of :class:`~fso_lib.optim.kfac.KFAC` (the statistics
minibatch with sampled targets, the running averages of ``A`` and ``G``, momentum, ``kl_clip``) and replaces
the damped factored inverse by that diagonal, plus ``ε``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import DivergenceError
from .kfac import KFAC, kfac_product_order

__all__ = ["EKFAC", "symmetric_eigenbasis", "eigenbasis_second_moments"]


def symmetric_eigenbasis(matrix: torch.Tensor, what: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, eigenvectors)`` of a symmetric matrix by ``torch.linalg.eigh``; retried in float64 (and
    cast back) if the matrix's own precision fails to converge. Raises :class:`DivergenceError` for a
    non-finite matrix."""
    if not bool(torch.isfinite(matrix).all()):
        raise DivergenceError(f"The {what} contains inf or NaN: its eigenbasis cannot be computed.")
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(matrix.double())
        return values.to(matrix.dtype), vectors.to(matrix.dtype)


def eigenbasis_second_moments(h_augmented: torch.Tensor, per_example_g: torch.Tensor, u_a: torch.Tensor,
                              u_g: torch.Tensor) -> torch.Tensor:
    """``S[i, j] = (1/n) Σ_n (U_Gᵀ g_n)_i² (U_Aᵀ ã_n)_j²``: the second moments of the per-example gradients
    ``g_n ã_nᵀ`` in the basis ``U_A ⊗ U_G``, as an (n_out × n_in+1) matrix in torch's ``[W b]`` layout.

    The per-example gradient of a linear layer is the outer product ``g_n ã_nᵀ``; its coordinates in the
    basis are ``U_Gᵀ g_n ã_nᵀ U_A``, again an outer product, so their squares are the outer product of the
    squared projections and the mean over examples is one GEMM. No per-example gradient is formed."""
    projected_g = (per_example_g @ u_g).square()
    projected_h = (h_augmented @ u_a).square()
    return projected_g.T @ projected_h / h_augmented.shape[0]


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC (George, Laurent, Bouthillier, Ballas & Vincent 2018), for MLPs.

    With K-FAC's factors ``A = E[ã ãᵀ]`` (``ã = [h; 1]``) and ``G = E[g gᵀ]`` (``g``: per-example gradient of the
    sampled loss w.r.t. the pre-activation) and their eigendecompositions ``A = U_A Λ_A U_Aᵀ``,
    ``G = U_G Λ_G U_Gᵀ``, K-FAC's block is ``A ⊗ G = (U_A ⊗ U_G)(Λ_A ⊗ Λ_G)(U_A ⊗ U_G)ᵀ``: a diagonal in the
    Kronecker-factored eigenbasis. EKFAC keeps the basis and replaces ``Λ_A ⊗ Λ_G`` by
    ``S = E[((U_A ⊗ U_G)ᵀ vec(g ãᵀ))²]``, the diagonal that is closest to the Fisher block in Frobenius norm
    among the matrices diagonal in that basis (:func:`eigenbasis_second_moments`). In torch's ``[W b]`` layout::

        Δ[W b] = U_G [ (U_Gᵀ ∇_{[W b]} U_A) / (S + ε) ] U_Aᵀ        (division elementwise, ε = damping)

    Schedules (counted in updates):

    * ``statistics_period``: a statistics pass (as K-FAC's: a separate minibatch, targets sampled from the
      model, see :class:`KFAC`); every pass updates the running averages of ``A`` and ``G``.
    * ``eigenbasis_period``: ``U_A``, ``U_G`` recomputed by ``eigh`` of the current ``A`` and ``G`` (the role of
      K-FAC's ``inverse_period``; it is stored as ``inverse_period``).
    * ``scale_period``: ``S`` re-estimated from the captured ``h`` and sampled-target ``∂L/∂a`` of a statistics
      pass, in the current basis, and folded into a running average with K-FAC's ``running_average`` weight.
      After a basis change the old ``S`` is in the old coordinates: it is discarded, not averaged (the new
      estimate starts afresh). A statistics pass is requested whenever one of the three schedules is due
      (:meth:`needs_statistics`); if the harness gave none at a basis change, ``S`` falls back to K-FAC's
      ``Λ_G ⊗ Λ_A`` in the new basis until the next scale estimate.

    ``damping`` ``ε`` is added to ``S`` (plain Tikhonov damping in the eigenbasis: ``(block + εI)⁻¹``); it enters
    at the next basis or scale refresh. ``momentum``, ``kl_clip`` (``lr²·⟨Δ, ∇⟩ ≤ kl_clip``, computed as
    ``Σ (U_Gᵀ∇U_A)² / (S + ε)``), ``loss`` (the sampled losses of :data:`~fso_lib.optim.kfac.SAMPLED_LOSSES`),
    ``weight_grads``, ``check_every`` and ``check_finite`` are K-FAC's. The projection ``U_Gᵀ gᵀ [h 1] U_A`` is
    associated like K-FAC's ``G⁻¹ gᵀ [h 1] A⁻¹`` (:func:`~fso_lib.optim.kfac.kfac_product_order`); the
    inverse projection is formed on the (n_out × n_in+1) matrix. Martens & Grosse's options of K-FAC
    (``step_rule="quadratic_model"``, ``damping_adaptation``, ...) are passed to it unchanged; the quadratic-model
    step, ρ and the damping it moves are checked for EKFAC too (``tests/test_quadratic_model_steps.py``).

    Cost per refresh: two ``eigh`` per layer (``(n_in+1)³ + n_out³``), against K-FAC's two Cholesky inverses;
    per scale estimate, two projections and one GEMM on the statistics minibatch; per update, K-FAC's cost plus
    one elementwise division.
    """

    saved_attributes = ("scale_period",)

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3, momentum: float = 0.9,
                 loss="squared_error", statistics_period: int = 10, eigenbasis_period: int = 100,
                 scale_period: int = 10, running_average: float = 0.95, **kfac_options):
        if "inverse_period" in kfac_options:
            raise TypeError("EKFAC has no inverse_period: its eigenbasis is refreshed every eigenbasis_period updates.")
        if int(scale_period) < 1 or int(eigenbasis_period) < 1:
            raise ValueError(f"scale_period and eigenbasis_period must be at least 1, got {scale_period} and {eigenbasis_period}")
        super().__init__(model, lr=lr, damping=damping, momentum=momentum, loss=loss,
                         statistics_period=statistics_period, inverse_period=eigenbasis_period,
                         running_average=running_average, **kfac_options)
        self.scale_period = int(scale_period)
        self._scale_batch = None  # (inputs, per-example gradients) of the last statistics pass, until a step uses it

    @property
    def eigenbasis_period(self) -> int:
        return self.inverse_period

    def needs_statistics(self) -> bool:
        n = self.n_updates
        return (n % self.statistics_period == 0 or n % self.scale_period == 0 or n % self.inverse_period == 0
                or "U_A" not in self.state[self.layers[0].weight])

    @torch.no_grad()
    def _update_factors(self, inputs, grads):
        super()._update_factors(inputs, grads)
        # kept (references, no copy) for the scale estimate of the next step; the sampled loss is a mean over
        # examples, so the per-example gradient is n · ∂L/∂a
        self._scale_batch = [(h, g * h.shape[0]) for h, g in zip(inputs, grads)]

    def _before_updates(self):
        first = self.state[self.layers[0].weight]
        if "A" not in first:
            raise RuntimeError("EKFAC has no curvature factors yet: call update_statistics(x) before the first step().")
        n = self.n_updates
        new_basis = n % self.inverse_period == 0 or "U_A" not in first
        if new_basis:
            self._refresh_eigenbasis()
        if new_basis or n % self.scale_period == 0 or "scale" not in first:
            self._refresh_scales(reset=new_basis)

    def _refresh_eigenbasis(self):
        self._check_statistics()
        for k, layer in enumerate(self.layers):
            state = self.state[layer.weight]
            state["eigenvalues_A"], state["U_A"] = symmetric_eigenbasis(state["A"], f"input factor of layer {k}")
            state["eigenvalues_G"], state["U_G"] = symmetric_eigenbasis(state["G"], f"gradient factor of layer {k}")

    @torch.no_grad()
    def _refresh_scales(self, reset: bool):
        batch, self._scale_batch = self._scale_batch, None
        rho = self.running_average
        for k, (group, layer) in enumerate(zip(self.param_groups, self.layers)):
            state = self.state[layer.weight]
            if batch is None:
                if not reset and "scale" in state:
                    estimate = state["scale"]
                else:  # no statistics pass at this basis change: K-FAC's products of eigenvalues
                    estimate = torch.outer(state["eigenvalues_G"], state["eigenvalues_A"]).clamp_min(0.0)
                    state["scale_estimates"] = 0
            else:
                h, per_example_g = batch[k]
                ones = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
                estimate = eigenbasis_second_moments(torch.cat([h, ones], dim=1), per_example_g,
                                                     state["U_A"], state["U_G"])
                if not reset and state.get("scale_estimates", 0) > 0:
                    estimate = state["scale"].mul(rho).add_(estimate, alpha=1 - rho)
                    state["scale_estimates"] += 1
                else:
                    state["scale_estimates"] = 1
            state["scale"] = estimate
            state["inverse_scale"] = 1.0 / (estimate + group["damping"])

    def _layer_update(self, k, group, h, g):
        weight, bias = group["params"]
        state = self.state[weight]
        u_a, u_g, inverse_scale = state["U_A"], state["U_G"], state["inverse_scale"]
        n, n_in = h.shape
        n_out = g.shape[1]
        left, right = kfac_product_order(n, n_in, n_out, self.weight_grads)
        if left == "gradient" and right == "gradient":
            grad = torch.cat([self._weight_gradient(group, h, g), bias.grad[:, None]], dim=1)
            projected = u_g.T @ grad @ u_a
        else:
            # [h 1] U_A = h U_A[:n_in] + U_A[n_in]
            h_u = torch.addmm(u_a[n_in], h, u_a[:n_in]) if right == "batch" else None
            g_u = g @ u_g if left == "batch" else None
            if left == "batch" and right == "batch":
                projected = g_u.T @ h_u
            elif left == "batch":      # ((g U_G)ᵀ [h 1]) U_A
                projected = torch.cat([g_u.T @ h, g_u.sum(0)[:, None]], dim=1) @ u_a
            else:                      # U_Gᵀ (gᵀ ([h 1] U_A))
                projected = u_g.T @ (g.T @ h_u)
        scaled = projected * inverse_scale
        if self.kl_clip is not None and self.step_rule == "fixed":
            # ⟨Δ, ∇⟩ is basis-independent: Σ projected² / (S + ε)
            state["kl_term"] = (scaled * projected).sum()
        direction = u_g @ scaled @ u_a.T
        return direction[:, :n_in], direction[:, n_in]

    def load_state_dict(self, state_dict):
        self._scale_batch = None  # a statistics pass of before the save is not this run's
        super().load_state_dict(state_dict)
