"""Shampoo (Gupta, Koren & Singer 2018) and SOAP (Vyas et al. 2024) for the book's MLPs.

Both precondition the gradient ``Γ = ∇_{[W b]} L`` (n_out × n_in+1, torch's row-major ``[W b]`` layout) of
each ``nn.Linear`` with two Kronecker factors built from past gradients, ``L = Σ Γ Γᵀ`` (n_out × n_out) and
``R = Σ Γᵀ Γ`` (n_in+1 × n_in+1): the same left/right structure as K-FAC's ``G`` and ``A`` (thesis §6.5.1),
but from minibatch gradients instead of per-example statistics of a sampled loss.

They are :class:`~fso_lib.optim.base.LayerwiseOptimizer` s: ``Γ = gᵀ [h 1]`` is formed from the captured layer
input ``h`` and pre-activation gradient ``g = ∂L/∂a`` (autograd's ``W.grad`` is not needed, as for K-FAC;
``weight_grads=True`` uses it instead). No statistics minibatch. Their per-layer state (``L``, ``R``, moments) is
committed only when the step is applied, so a step skipped as non-finite leaves it as it was (the roots or
eigenbases, refreshed before the step, are the exception). The refreshes (``eigh``, with a host read that refuses
non-finite factors) run eagerly in :meth:`_before_updates`; the steady-state step has no host read and compiles
(:meth:`~fso_lib.optim.base.LayerwiseOptimizer.compile_step`).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LayerwiseOptimizer
from .ekfac import symmetric_eigenbasis
from .low_rank import LowRankDirection

__all__ = ["Shampoo", "SOAP", "GRAFTINGS", "matrix_inverse_root"]

#: Shampoo's grafting options: the direction of Shampoo with the layer-wise norm of another method's step.
GRAFTINGS = ("none", "sgd", "adam")


def matrix_inverse_root(matrix: torch.Tensor, damping: float, root: int = 4, what: str = "matrix") -> torch.Tensor:
    """``(matrix + damping · I)^(−1/root)`` of a symmetric positive semi-definite matrix, by ``eigh``
    (eigenvalues clamped at 0 before the damping, against round-off)."""
    values, vectors = symmetric_eigenbasis(matrix, what)
    powers = (values.clamp_min(0.0) + damping).pow(-1.0 / root)
    return (vectors * powers) @ vectors.T


class _KroneckerStatistics(LayerwiseOptimizer):
    """What Shampoo and SOAP share: ``Γ`` from the captured statistics, the factors ``L``, ``R`` and the
    deferred commit of the per-layer state."""

    forms_weight_gradient = True

    def __init__(self, model: nn.Module, defaults: dict, factor_decay: float | None, check_finite: bool,
                 weight_grads: bool, check_every: int | None):
        if factor_decay is not None and not 0.0 <= float(factor_decay) < 1.0:
            raise ValueError(f"factor_decay must be None (sums, as in Shampoo) or in [0, 1), got {factor_decay}")
        super().__init__(model, defaults, check_finite=check_finite, weight_grads=weight_grads, check_every=check_every)
        self.factor_decay = None if factor_decay is None else float(factor_decay)
        self._pending = {}

    def _gradient(self, group: dict, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``Γ = ∇_{[W b]} L = gᵀ [h 1]`` (n_out × n_in+1)."""
        weight, bias = group["params"]
        if self.weight_grads:
            return torch.cat([weight.grad, bias.grad[:, None]], dim=1)
        return torch.cat([g.T @ h, g.sum(0)[:, None]], dim=1)

    def _minibatch_rows(self, h: torch.Tensor, g: torch.Tensor):
        """``(g, [h 1])`` when the layer is wider than the minibatch on both sides (``n < n_out`` and ``n < n_in + 1``)
        and autograd's gradient was not formed: then ``Γ = gᵀ [h 1]`` has rank ≤ n, and its products are cheaper
        through the n rows (:meth:`_gradient_products`) than through ``Γ``; else ``None``."""
        n, n_in = h.shape
        if self.weight_grads or not (n < g.shape[1] and n < n_in + 1):
            return None
        return g, torch.cat([h, h.new_ones(n, 1)], dim=1)

    @staticmethod
    def _gram_matrices(rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g gᵀ, ã ãᵀ)``: the n × n Gram matrices of the rows ``(g, ã)`` of ``Γ = gᵀ ã``."""
        g, augmented = rows
        return g @ g.T, augmented @ augmented.T

    @classmethod
    def _gradient_products(cls, rows, grams=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``Γ Γᵀ = gᵀ (ã ãᵀ) g`` and ``Γᵀ Γ = ãᵀ (g gᵀ) ã`` from the rows ``(g, ã)`` of ``Γ = gᵀ ã``, through the two
        n × n Gram matrices: ``n²(n_in+1) + n²·n_out`` plus ``n·n_out²`` or ``n·(n_in+1)²`` multiply-adds, against
        ``n_out²(n_in+1)`` and ``n_out(n_in+1)²`` from ``Γ`` (and ``n·n_out·(n_in+1)`` to form it)."""
        g, augmented = rows
        left_gram, right_gram = cls._gram_matrices(rows) if grams is None else grams
        return g.T @ (right_gram @ g), augmented.T @ (left_gram @ augmented)

    def _new_factors(self, state: dict, grad: torch.Tensor | None, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``L ← β L + (1 − β) Γ Γᵀ``, ``R ← β R + (1 − β) Γ ᵀ Γ`` (sums when ``factor_decay`` is None); not stored.
        ``rows``: :meth:`_minibatch_rows`, used instead of ``grad`` when given."""
        left, right = self._gradient_products(rows) if rows is not None else (grad @ grad.T, grad.T @ grad)
        return self._accumulate(state, left, right)

    def _accumulate(self, state: dict, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running factors with this minibatch's ``Γ Γᵀ`` and ``Γᵀ Γ`` folded in (not stored)."""
        if "L" not in state:
            return left, right
        beta = self.factor_decay
        if beta is None:
            return state["L"] + left, state["R"] + right
        return state["L"] * beta + left * (1 - beta), state["R"] * beta + right * (1 - beta)

    def _refresh_due(self, period: int) -> bool:
        return self.n_updates % period == 0 or "L" not in self.state[self.layers[0].weight]

    def _refresh_inputs(self):
        """``(k, group, state, L_new, R_new)`` of every layer, for a refresh in :meth:`_before_updates` (eager: the
        eigendecompositions and their host reads stay out of the compiled steady-state step)."""
        for k, group in enumerate(self.param_groups):
            h, g = self._captured(k)
            state = self.state[group["params"][0]]
            rows = self._minibatch_rows(h, g)
            grad = None if rows is not None else self._gradient(group, h, g)
            yield (k, group, state, *self._new_factors(state, grad, rows))

    def _apply(self, group, pair, skip):
        # commit this layer's new state (a skipped step keeps the old one), then the usual p ← p − lr · direction
        state = self.state[group["params"][0]]
        for key, value in self._pending.pop(group["layer"], {}).items():
            if skip is None or key not in state or not isinstance(value, torch.Tensor):
                state[key] = value
            else:
                state[key] = torch.where(skip, state[key], value)
        super()._apply(group, pair, skip)


class Shampoo(_KroneckerStatistics):
    """Shampoo for MLPs (Gupta, Koren & Singer 2018), one Kronecker-factored preconditioner per layer.

    Per layer and update, with ``Γ`` the gradient of ``[W b]``::

        L ← β L + (1 − β) Γ Γᵀ,   R ← β R + (1 − β) Γᵀ Γ        (factor_decay β; None: plain sums, as the paper)
        Δ = (L + εI)^(−1/4) Γ (R + εI)^(−1/4)                  (ε = damping)

    In the column-stacked ``vec`` of the thesis this is ``((R + εI) ⊗ (L + εI))^(−1/4) vec Γ``: the Kronecker
    product's fourth root, i.e. the square root of the inverse of a Kronecker approximation of the gradients'
    second moment ``Σ vec Γ vec Γᵀ`` (full-matrix AdaGrad's ``H^(−1/2)``; Gupta et al. bound that matrix by
    ``(L ⊗ R)^(1/2)`` up to a rank factor, hence the −1/4 on each side).

    * ``root_period``: the inverse fourth roots are recomputed (``eigh`` of each factor, including the current
      update's gradient) every that many updates; the factors themselves are updated at every step.
    * ``grafting``: ``"none"`` (the direction Δ itself), ``"sgd"`` (Δ rescaled to the layer-wise Frobenius norm of
      ``Γ``), or ``"adam"`` (Δ rescaled to the norm of ``Γ / (√v̂ + graft_eps)`` with ``v`` the exponential average
      of ``Γ²`` with weight ``graft_beta2`` and its bias correction: the diagonal second-moment normalization of
      Adam without its first moment, as grafting in distributed Shampoo uses it; momentum is applied afterwards).
      The norms are those of the whole layer, ``[W b]`` together.
    * ``momentum``: heavy-ball momentum on the (grafted) direction; the step is ``−lr · buffer``.

    Only the book's MLPs (``nn.Linear`` layers with bias, parameter-free activations); the factors and roots are
    in the state and round-trip through ``state_dict``.
    """

    saved_attributes = ("root_period",)

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-4, momentum: float = 0.9,
                 factor_decay: float | None = 0.95, root_period: int = 10, grafting: str = "none",
                 graft_beta2: float = 0.999, graft_eps: float = 1e-8, check_finite: bool = True,
                 weight_grads: bool = False, check_every: int | None = 1):
        if damping <= 0:
            raise ValueError(f"damping must be positive (it keeps (L + εI)^(-1/4) finite), got {damping}")
        if grafting not in GRAFTINGS:
            raise ValueError(f"grafting must be one of {GRAFTINGS}, got {grafting!r}")
        if int(root_period) < 1:
            raise ValueError(f"root_period must be at least 1, got {root_period}")
        if not 0.0 <= float(graft_beta2) < 1.0:
            raise ValueError(f"graft_beta2 must be in [0, 1), got {graft_beta2}")
        super().__init__(model, dict(lr=lr, damping=damping, momentum=momentum), factor_decay, check_finite,
                         weight_grads, check_every)
        self.root_period = int(root_period)
        self.grafting = grafting
        self.graft_beta2 = float(graft_beta2)
        self.graft_eps = float(graft_eps)

    def _before_updates(self):
        if not self._refresh_due(self.root_period):
            return
        for k, group, state, left, right in self._refresh_inputs():
            eps = group["damping"]
            state["L_root"] = matrix_inverse_root(left, eps, 4, f"left factor of layer {k}")
            state["R_root"] = matrix_inverse_root(right, eps, 4, f"right factor of layer {k}")

    def _layer_update(self, k, group, h, g):
        weight = group["params"][0]
        state = self.state[weight]
        n_in = h.shape[1]
        rows = self._minibatch_rows(h, g)
        if rows is not None:
            return self._layer_update_from_rows(group, state, rows, n_in)
        grad = self._gradient(group, h, g)
        left, right = self._new_factors(state, grad)
        pending = {"L": left, "R": right}
        direction = state["L_root"] @ grad @ state["R_root"]
        if self.grafting == "sgd":
            direction = direction * (torch.linalg.matrix_norm(grad) / torch.linalg.matrix_norm(direction).clamp_min(1e-30))
        elif self.grafting == "adam":
            target_norm, pending["graft_second_moment"], pending["graft_steps"] = self._adam_graft_norm(state, grad)
            direction = direction * (target_norm / torch.linalg.matrix_norm(direction).clamp_min(1e-30))
        self._pending[group["layer"]] = pending
        return direction[:, :n_in], direction[:, n_in]

    def _adam_graft_norm(self, state, grad):
        """Adam grafting: ``‖Γ / (√v̂ + graft_eps)‖_F`` with ``v`` the bias-corrected average of ``Γ²``; returns it with
        the new ``v`` and step count (committed with the step)."""
        beta2 = self.graft_beta2
        steps = state.get("graft_steps", torch.zeros((), dtype=grad.dtype, device=grad.device)) + 1
        second = grad.square() * (1 - beta2)
        if "graft_second_moment" in state:
            second = second + state["graft_second_moment"] * beta2
        corrected = second / (1 - beta2 ** steps)
        return torch.linalg.matrix_norm(grad / (corrected.sqrt() + self.graft_eps)), second, steps

    def _layer_update_from_rows(self, group, state, rows, n_in):
        """The same update for a layer wider than the minibatch: ``Δ = (g L_root)ᵀ (ã R_root)`` in the large-batch order
        (``n·n_out² + n·(n_in+1)²``, the last product left to the optimizer: a
        :class:`~fso_lib.optim.low_rank.LowRankDirection`), factors through the Gram matrices, and the grafting norms
        from n × n products: ``‖gᵀã‖²_F = Σ (g gᵀ) ∘ (ã ãᵀ)``. Adam grafting needs ``Γ²`` entry by entry: ``Γ`` is formed
        then (one product), the direction still is not."""
        g, augmented = rows
        left_gram, right_gram = grams = self._gram_matrices(rows)   # the grafting norms need them too
        left, right = self._accumulate(state, *self._gradient_products(rows, grams))
        pending = {"L": left, "R": right}
        left_rows, right_rows = g @ state["L_root"], augmented @ state["R_root"]   # Δ = left_rowsᵀ right_rows
        scale = None
        if self.grafting != "none":
            direction_norm = ((left_rows @ left_rows.T) * (right_rows @ right_rows.T)).sum().clamp_min(0.0).sqrt()
            if self.grafting == "sgd":
                target_norm = (left_gram * right_gram).sum().clamp_min(0.0).sqrt()
            else:
                grad = g.T @ augmented
                target_norm, pending["graft_second_moment"], pending["graft_steps"] = self._adam_graft_norm(state, grad)
            scale = target_norm / direction_norm.clamp_min(1e-30)
            right_rows = right_rows * scale
        self._pending[group["layer"]] = pending
        return LowRankDirection(left_rows, right_rows[:, :n_in]), left_rows.T @ right_rows[:, n_in]



class SOAP(_KroneckerStatistics):
    """SOAP for MLPs (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's factors, one basis per layer.

    Per layer and update, with ``Γ`` the gradient of ``[W b]``, ``L``, ``R`` exponential averages of ``Γ Γᵀ`` and
    ``Γᵀ Γ`` (weight ``factor_decay``) and ``L = Q_L Λ_L Q_Lᵀ``, ``R = Q_R Λ_R Q_Rᵀ``::

        Γ' = Q_Lᵀ Γ Q_R
        m ← β₁ m + (1 − β₁) Γ',   v ← β₂ v + (1 − β₂) Γ'²          (Adam's moments, in the rotated coordinates)
        Δ = Q_L [ m̂ / (√v̂ + ε) ] Q_Rᵀ,  m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)      (ε = eps)

    and the step is ``−lr · Δ`` (no heavy ball: β₁ is the momentum). In the thesis's ``vec`` the rotation is
    ``Q = Q_R ⊗ Q_L``, the eigenbasis of Shampoo's ``R ⊗ L``; Adam's diagonal ``v`` there is the analogue of
    EKFAC's re-estimated diagonal, with minibatch gradients in place of per-example ones.

    ``eigenbasis_period``: ``Q_L``, ``Q_R`` recomputed by ``eigh`` (of the factors including the current
    gradient) every that many updates; the factors are updated every step. **Across a basis change**
    (``P_L = Q_L,newᵀ Q_L,old``, ``P_R`` alike): the first moment is linear in the gradients, so it is rotated
    exactly, ``m ← P_L m P_Rᵀ``; the second moment is not (the exact second moments in the new basis would need
    the full covariance, which SOAP never stores), so ``v`` is taken as the diagonal covariance ``diag(v)`` in
    the old basis and its diagonal in the new one is kept: ``v ← (P_L∘P_L) v (P_R∘P_R)ᵀ`` (``∘`` elementwise).
    That is exact when the old basis diagonalized the gradients' second moment, keeps ``v ≥ 0`` and its sum (the
    rows of ``P∘P`` sum to one), and reduces to "keep ``v``" when the basis did not move. The step count ``t`` of
    the bias corrections is not reset. (Vyas et al.'s code keeps ``v`` as is, reordered by the eigenvalue
    estimates; with ``eigh`` the order is that of the eigenvalues already.)

    **Round-off and ``eps``.** When a layer's gradients have a lower rank than ``L`` or ``R`` (fewer examples than
    units, or a layer wider than its inputs), the rotated gradient has coordinates that are zero in exact arithmetic
    but hold round-off (≈ 1e-7·‖Γ‖ in float32), and Adam's ``m̂/(√v̂ + ε)`` turns them into steps of size up to
    ``lr`` unless ``eps`` is well above that round-off. Plain Adam has no such coordinates (no rotation).
    """

    saved_attributes = ("eigenbasis_period",)

    def __init__(self, model: nn.Module, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, factor_decay: float = 0.95, eigenbasis_period: int = 10,
                 check_finite: bool = True, weight_grads: bool = False, check_every: int | None = 1):
        beta1, beta2 = (float(b) for b in betas)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if factor_decay is None:
            raise ValueError("SOAP averages its factors: factor_decay must be in [0, 1), not None")
        if int(eigenbasis_period) < 1:
            raise ValueError(f"eigenbasis_period must be at least 1, got {eigenbasis_period}")
        super().__init__(model, dict(lr=lr, betas=(beta1, beta2), eps=eps, momentum=0.0), factor_decay,
                         check_finite, weight_grads, check_every)
        self.eigenbasis_period = int(eigenbasis_period)

    def _before_updates(self):
        if not self._refresh_due(self.eigenbasis_period):
            return
        for k, group, state, left, right in self._refresh_inputs():
            _, new_left = symmetric_eigenbasis(left, f"left factor of layer {k}")
            _, new_right = symmetric_eigenbasis(right, f"right factor of layer {k}")
            if "exp_avg" in state:  # the moments, expressed in the new coordinates (a change of basis, no new data)
                turn_left, turn_right = new_left.T @ state["Q_L"], new_right.T @ state["Q_R"]
                state["exp_avg"] = turn_left @ state["exp_avg"] @ turn_right.T
                state["exp_avg_sq"] = turn_left.square() @ state["exp_avg_sq"] @ turn_right.square().T
            else:
                shape = (left.shape[0], right.shape[0])  # Γ's: n_out × n_in+1
                state["exp_avg"] = left.new_zeros(shape)
                state["exp_avg_sq"] = left.new_zeros(shape)
                state["step"] = left.new_zeros(())
            state["Q_L"], state["Q_R"] = new_left, new_right

    def _layer_update(self, k, group, h, g):
        weight = group["params"][0]
        state = self.state[weight]
        n_in = h.shape[1]
        beta1, beta2 = group["betas"]
        q_left, q_right = state["Q_L"], state["Q_R"]
        rows = self._minibatch_rows(h, g)
        if rows is None:
            grad = self._gradient(group, h, g)
            left, right = self._new_factors(state, grad)
            rotated = q_left.T @ grad @ q_right
        else:  # Γ never formed: its products through the n rows, its rotation as (g Q_L)ᵀ (ã Q_R)
            left, right = self._new_factors(state, None, rows)
            rotated = (rows[0] @ q_left).T @ (rows[1] @ q_right)
        pending = {"L": left, "R": right}
        steps = state["step"] + 1
        first = state["exp_avg"] * beta1 + rotated * (1 - beta1)
        second = state["exp_avg_sq"] * beta2 + rotated.square() * (1 - beta2)
        adam = (first / (1 - beta1 ** steps)) / ((second / (1 - beta2 ** steps)).sqrt() + group["eps"])
        direction = q_left @ adam @ q_right.T
        pending.update(exp_avg=first, exp_avg_sq=second, step=steps)
        self._pending[group["layer"]] = pending
        return direction[:, :n_in], direction[:, n_in]

