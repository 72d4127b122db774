"""The amortized covariance preconditioner, ACP (thesis §6.3.2 and §6.4.2, Algorithm 3)."""
from __future__ import annotations

import torch
from torch import nn

from .base import DivergenceError, LayerwiseOptimizer
from .inverse import INVERSE_FORMS, CovarianceInverse, apply_inverse
from .low_rank import LowRankDirection, largest_magnitude
from .quadratic_model import QuadraticModelSteps

__all__ = ["ACP", "BIAS_UPDATES", "acp_product_order", "centered_preconditioned_update"]

BIAS_UPDATES = {
    "derived": "Δb = (1/α) mean_i ∇_{a_i} l − ΔW h̄   (eq. 6.3.4)",
    "printed": "Δb = (1/α) mean_i ∇_{a_i} l          (Algorithm 3, line 13)",
}


class ACP(QuadraticModelSteps, LayerwiseOptimizer):
    """Amortized covariance preconditioner (Thesis §6.4.2, Algorithm 3; the update of eqs. 6.3.3–6.3.4).

    Each layer's block of the GN/Fisher matrix is approximated by ``A ⊗ αI`` (§6.3.2) plus Tikhonov
    damping ``ε I``, which amounts to the damped input covariance ``C + (ε/α) I``. The update is::

        ΔW = (1/α) · (1/n) Σ_i ∇_{a_i} l (h_i − h̄)ᵀ (C + (ε/α) I)⁻¹       (eq. 6.3.3)
        Δb = (1/α) · (1/n) Σ_i ∇_{a_i} l − ΔW h̄                          (eq. 6.3.4, bias_update="derived")
        W ← W − η ΔW,   b ← b − η Δb

    ``C`` is estimated from a separate statistics minibatch every ``amortization_period`` updates
    (:meth:`update_statistics`; if none was fed, the current training minibatch is used) and its damped
    inverse is cached; ``h̄`` is the mean of the current training minibatch.

    Hyperparameters
        ``lr``: the learning rate η (the thesis writes λ); ``damping``: the Tikhonov ε of §6.4.2 (the thesis's λ;
        the covariance is damped by ``damping / α``); ``alpha``: a fixed α, or ``None`` for the heuristic
        ``α = max_{i,j} (∇_{a_i} l)_j²`` (per layer and minibatch; the damping ``ε/α`` then uses the α
        of the minibatch on which the inverse is refreshed, so that it can be cached);
        ``amortization_period``: N; ``bias_update``: ``"derived"`` or ``"printed"`` (see
        :data:`BIAS_UPDATES`); ``momentum``: heavy-ball momentum on the update (0 in the thesis).

    Options (see :class:`~fso_lib.optim.base.LayerwiseOptimizer`): ``weight_grads`` (default False:
    autograd does not form ``W.grad``; the update is formed from the captured ``h`` and ``∂L/∂a``;
    ``materialize_grads()`` fills ``W.grad`` on demand), ``check_every`` (how often ``step()`` reads the
    non-finite flag), ``check_finite``.

    Product order: per layer the cheaper of two orders is used (:func:`acp_product_order`):
    ``"gradient"`` preconditions the averaged, centered gradient ``(gᵀ(h − h̄)) P`` (out·in² after the
    gradient; from autograd's ``∇_W − ∇_b h̄ᵀ`` when ``weight_grads``), ``"batch"`` ("large batch": cheaper
    when ``n_out > n``) computes ``gᵀ((h − h̄) P)``.

    Inverse form (``inverse_form``): ``"dense"`` forms ``P = (C + (ε/α) I)⁻¹``; ``"woodbury"`` applies it through
    the m × m Gram matrix of the m-example statistics minibatch (``C`` has rank < m), about half the
    multiply-adds for inputs wider than ≈ 2.4 m; ``"auto"`` (default) picks the cheaper per layer
    (:mod:`fso_lib.optim.inverse`).

    Martens & Grosse's options (:class:`~fso_lib.optim.quadratic_model.QuadraticModelSteps`, off by default):
    ``step_rule="quadratic_model"`` scales ACP's direction (and combines it with the previous step) by the
    minimizer of the exact-Fisher model of the minibatch, ignoring ``lr`` and ``momentum``;
    ``damping_adaptation`` moves ε by the Levenberg–Marquardt rule (it reaches the cached inverse at the next
    refresh, the model at once); ``loss`` names the training loss for the model's Fisher.
    """

    forms_weight_gradient = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        alpha: float | None = None,
        amortization_period: int = 100,
        bias_update: str = "derived",
        momentum: float = 0.0,
        check_finite: bool = True,
        weight_grads: bool = False,
        check_every: int | None = 1,
        inverse_form: str = "auto",
        loss="squared_error",
        step_rule: str = "fixed",
        damping_adaptation: bool = False,
        damping_adaptation_period: int = 5,
        damping_bounds: tuple[float, float] = (1e-6, 1e4),
        damped_rho: bool = False,
        quadratic_model_examples: int | None = None,
    ):
        if inverse_form not in INVERSE_FORMS:
            raise ValueError(f"inverse_form must be one of {INVERSE_FORMS}, got {inverse_form!r}")
        if bias_update not in BIAS_UPDATES:
            raise ValueError(f"bias_update must be one of {sorted(BIAS_UPDATES)}, got {bias_update!r}")
        if damping <= 0:
            raise ValueError("damping must be positive: the covariance of n examples has rank at most n − 1.")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be positive or None (heuristic), got {alpha}")
        if amortization_period < 1:
            raise ValueError("amortization_period must be at least 1")
        defaults = dict(lr=lr, damping=damping, alpha=alpha, bias_update=bias_update, momentum=momentum)
        super().__init__(model, defaults, check_finite=check_finite, weight_grads=weight_grads, check_every=check_every)
        self.amortization_period = int(amortization_period)
        self.inverse_form = inverse_form
        self._init_quadratic_model(loss, step_rule, damping_adaptation, damping_adaptation_period, damping_bounds,
                                   damped_rho, quadratic_model_examples)

    # -- statistics ----------------------------------------------------------------------------------
    def needs_statistics(self) -> bool:
        return self.n_updates % self.amortization_period == 0

    @torch.no_grad()
    def _collect_statistics(self, x):
        self.capture.clear()
        self.model(x)
        for layer, h in zip(self.layers, self.capture.inputs):
            self._store_covariance(self.state[layer.weight], h, self.n_updates)

    @staticmethod
    def _store_covariance(state, h, n_updates):
        mean = h.mean(dim=0)
        centered = h - mean
        state["covariance"] = centered.T @ centered / h.shape[0]
        state["statistics_centered"] = centered
        CovarianceInverse.clear_state(state)  # refreshed lazily at the next step, when α is known
        state["statistics_update"] = n_updates

    def _per_example_alpha(self, group, g):
        if group["alpha"] is not None:
            return group["alpha"]
        # g holds (1/n) ∇_{a_i} l; the heuristic uses the per-example gradients: α = (n · max |g|)²
        return (largest_magnitude(g) * g.shape[0]).square().clamp_min(torch.finfo(g.dtype).tiny)

    def _before_updates(self):
        """Statistics from the training minibatch when none was fed this period, and the inverses' refresh
        (with the heuristic α of this minibatch): the step's schedule, kept out of :meth:`_layer_update`."""
        due = self.n_updates % self.amortization_period == 0
        for k, group in enumerate(self.param_groups):
            state = self.state[group["params"][0]]
            if due and state.get("statistics_update") != self.n_updates:
                # no statistics minibatch fed for this period: use the training minibatch instead
                self._store_covariance(state, self._captured(k)[0], self.n_updates)
            if CovarianceInverse.from_state(state) is None:
                covariance = state["covariance"]
                if not bool(torch.isfinite(covariance).all()):  # one host read per refresh, not per step
                    raise DivergenceError(
                        f"ACP: the input covariance of layer {k} contains inf or NaN: the statistics minibatch "
                        "contained non-finite values (or the forward pass overflowed); the damping is not the cause."
                    )
                alpha = self._per_example_alpha(group, self._captured(k)[1])
                epsilon = group["damping"] / alpha  # a float, or a 0-dim tensor for the heuristic α (no host read)
                inverse = CovarianceInverse.from_centered(
                    state["statistics_centered"], epsilon, form=self.inverse_form,
                    what=f"input covariance of layer {k}", covariance=covariance)
                state.update(inverse.to_state())

    def _layer_update(self, k, group, h, g):
        weight, bias = group["params"]
        alpha = self._per_example_alpha(group, g)
        return centered_preconditioned_update(
            self.state[weight], h, g, h.mean(dim=0), bias.grad, weight.grad if self.weight_grads else None,
            scale=1.0 / alpha, derived_bias=group["bias_update"] == "derived")


def centered_preconditioned_update(state, h, g, mean, bias_grad, weight_grad=None, scale=None, derived_bias=True):
    """``ΔW = scale · gᵀ(h − mean)(C + εI)⁻¹`` and ``Δb = scale · Σ_i g_i − ΔW mean`` (``derived_bias``) or
    ``scale · Σ_i g_i``, with the inverse kept in ``state`` (:func:`~fso_lib.optim.inverse.apply_inverse`): ACP's
    update (``mean`` = h̄ of the minibatch, ``scale`` = 1/α) and the implicit natural neural network's (``mean`` = the
    statistics minibatch's, ``scale`` = 1). The product order is :func:`acp_product_order`'s; ``weight_grad``:
    autograd's ``∇_W`` when it was formed (then ``Σ_i g_i (h_i − mean)ᵀ = ∇_W − ∇_b meanᵀ``), else ``None``.
    In the "batch" order ``ΔW`` is returned unformed, as the :class:`~fso_lib.optim.low_rank.LowRankDirection`
    ``gᵀ X``."""
    n, n_in = h.shape
    if acp_product_order(n, n_in, g.shape[1], weight_grad is not None) == "gradient":
        if weight_grad is not None:
            centered_grad = torch.addr(weight_grad, bias_grad, mean, alpha=-1.0)
        else:  # centre first: no cancellation between ∇_W and ∇_b meanᵀ
            centered_grad = g.T @ (h - mean)
        d_weight = apply_inverse(state, centered_grad, scale)  # out ≤ n here: the smaller array to scale
        weight_times_mean = d_weight @ mean if derived_bias else None
    else:
        preconditioned = apply_inverse(state, h - mean, scale)  # scale the n × in factor, not the out × in result
        # ΔW = gᵀ X, left unformed: the optimizer adds it to W (or to the momentum buffer) in one addmm_
        d_weight = LowRankDirection(g, preconditioned)
        # ΔW mean = gᵀ (X mean): two matrix-vector products on the n-row factors, not one on the out × in result
        weight_times_mean = g.T @ (preconditioned @ mean) if derived_bias else None
    d_bias = bias_grad if scale is None else bias_grad * scale
    if weight_times_mean is not None:
        d_bias = d_bias - weight_times_mean
    elif d_bias is bias_grad:
        d_bias = bias_grad.clone()  # never .grad itself: a skipped step masks the update in place
    return d_weight, d_bias


def acp_product_order(n: int, n_in: int, n_out: int, weight_grads: bool) -> str:
    """Which order ACP uses for ``gᵀ (h − h̄) P`` on a layer with a minibatch of ``n`` examples.

    ``"gradient"``: precondition the centered gradient, ``(gᵀh − ḡ h̄ᵀ) P`` — out·in² multiply-adds, plus
    n·in·out to form ``gᵀh`` unless autograd already did (``weight_grads``). ``"batch"`` (the large-batch
    order): ``gᵀ ((h − h̄) P)`` — n·in² + n·in·out. Without autograd's gradient, "gradient" wins iff
    ``n_out ≤ n``; with it, iff ``n_out · n_in ≤ n · (n_in + n_out)``.
    """
    if weight_grads:
        return "gradient" if n_out * n_in <= n * (n_in + n_out) else "batch"
    return "gradient" if n_out <= n else "batch"
