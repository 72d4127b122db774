"""K-FAC for MLPs (Martens & Grosse 2015; thesis §6.5.1), with Martens & Grosse's adaptive damping and
quadratic-model step (their §6.5 and §7) as options, and the thesis's amortization as a named configuration."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import DivergenceError, LayerwiseOptimizer, damped_inverse
from .low_rank import LowRankDirection
from .quadratic_model import STEP_RULES, QuadraticModelSteps

__all__ = ["KFAC", "SAMPLED_LOSSES", "STEP_RULES", "KFAC_THESIS_PROTOCOL", "THESIS_STATISTICS_MINIBATCH", "factored_damping",
           "kfac_product_order"]

#: The thesis's amortization for every chapter-6 method (§6.6.2): the factors are re-estimated and re-inverted
#: every 100 updates, each time from one separate statistics minibatch and with no running average (the factors
#: are those of that minibatch alone). Use as ``KFAC(model, lr=..., damping=..., **KFAC_THESIS_PROTOCOL)``;
#: the statistics minibatch is the harness's: the thesis's holds :data:`THESIS_STATISTICS_MINIBATCH` examples.
KFAC_THESIS_PROTOCOL = dict(statistics_period=100, inverse_period=100, running_average=0.0)
#: Examples in the thesis's statistics minibatch (and in its training minibatch), §6.6.2.
THESIS_STATISTICS_MINIBATCH = 200


def _squared_error_sample(output: torch.Tensor) -> torch.Tensor:
    # l = ‖f − y‖² (no 1/2) is −log N(y; f, ½ I) + const: sample y = f + N(0, ½)
    target = output.detach() + math.sqrt(0.5) * torch.randn_like(output)
    return (output - target).square().sum(dim=1).mean()


def _bernoulli_sample(output: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over units, targets ~ Bernoulli(output): ``output`` holds probabilities."""
    p = output.detach().clamp(1e-7, 1 - 1e-7)
    target = torch.bernoulli(p)
    out = output.clamp(1e-7, 1 - 1e-7)
    return -(target * out.log() + (1 - target) * (1 - out).log()).sum(dim=1).mean()


def _softmax_sample(output: torch.Tensor) -> torch.Tensor:
    """Multiclass cross-entropy, target ~ softmax(output): ``output`` holds logits (no softmax applied)."""
    target = torch.multinomial(torch.softmax(output.detach(), dim=1), 1).squeeze(1)
    return nn.functional.cross_entropy(output, target)


#: Losses K-FAC knows how to sample targets for: name → sampled loss (mean over examples) of the output.
#: ``"squared_error"``: any real outputs; ``"bernoulli"``: outputs are **probabilities** in [0, 1] (a sigmoid
#: output layer, as in the deep autoencoder); ``"softmax_cross_entropy"``: outputs are **logits**.
SAMPLED_LOSSES = {
    "squared_error": _squared_error_sample,
    "bernoulli": _bernoulli_sample,
    "softmax_cross_entropy": _softmax_sample,
}


class KFAC(QuadraticModelSteps, LayerwiseOptimizer):
    """Kronecker-factored approximate curvature for MLPs (Martens & Grosse 2015; Thesis §6.5.1).

    Each layer's block of the **Fisher of the model's predictive distribution** (the "true" Fisher,
    with targets *sampled from the model*, not the empirical Fisher of the training targets; for the
    squared error and the cross-entropies it is the Gauss-Newton matrix, §3.3.2) is approximated by
    a product of sums, ``E[ã ãᵀ] ⊗ E[g gᵀ]`` with ``ã = [h; 1]`` and ``g`` the per-example gradient of the
    sampled loss w.r.t. the pre-activation. In torch's ``[W b]`` row-major layout the update is::

        Δ[W b] = (G + (γ/π) I)⁻¹ ∇_{[W b]} (A + π γ I)⁻¹,   γ = √ε,   π = sqrt( (tr A / (n_in+1)) / (tr G / n_out) )

    (``ε`` = ``damping``; factored Tikhonov damping with Martens & Grosse's π correction, §6.3 of their paper).

    * ``loss`` names the model's predictive distribution, i.e. the training loss:
      ``"squared_error"`` (default, ``mean_i ‖f_i − y_i‖²``, any real outputs); ``"bernoulli"`` (binary
      cross-entropy: the model's outputs must be **probabilities** in [0, 1], e.g. a sigmoid output layer;
      outputs outside [0, 1] raise a ``ValueError`` at the next inversion); ``"softmax_cross_entropy"``
      (multiclass cross-entropy: the outputs must be **logits**, before any softmax); or a callable
      ``output -> sampled loss averaged over examples``, or an object with ``sample_target``.
    * ``update_statistics(x)`` (every ``statistics_period`` updates) runs a forward pass on ``x``,
      samples targets from the model's output distribution, and
      backpropagates to the pre-activations only; ``A`` and ``G`` are running averages with weight
      ``running_average`` on the past.
    * The damped inverses are recomputed every ``inverse_period`` updates (amortized inversion).
    * ``momentum``: heavy-ball momentum on the preconditioned step; ``kl_clip``: if set, the step is
      scaled so that ``lr² · Σ ⟨Δ, ∇⟩ ≤ kl_clip`` (a trust region that keeps low damping stable),
      computed on the device (no host read).
    * Options of :class:`~fso_lib.optim.base.LayerwiseOptimizer`: ``weight_grads`` (default False: the
      update is formed from the captured ``h`` and ``∂L/∂a`` without autograd's ``W.grad``;
      ``materialize_grads()`` fills it on demand), ``check_every``, ``check_finite``.
    * Product order: per layer the cheapest association of ``G⁻¹ gᵀ [h 1] A⁻¹`` is used
      (:func:`kfac_product_order`); the "large-batch" one, ``(g G⁻¹)ᵀ ([h 1] A⁻¹)``, when ``n`` is small
      against both factor sizes; its weight direction is then never formed
      (:class:`~fso_lib.optim.low_rank.LowRankDirection`: one ``addmm_`` into ``W`` or the momentum buffer).
    * A statistics minibatch with inf/NaN (or outputs outside [0, 1] for ``"bernoulli"``) is recorded on
      the device and reported at the next inversion with an error that says so.

    **K-FAC as Martens & Grosse run it** (both options off by default: the plain K-FAC above). Both use the
    *exact* Fisher ``F`` of the current training minibatch through the quadratic model
    ``M(δ) − M(0) = ½ δᵀ(F + εI)δ + ∇ᵀδ`` (:mod:`fso_lib.optim.quadratic_model`; ``F``-products by forward-mode
    JVPs of the model on the minibatch, whose inputs are read from the first layer's captured input: the model
    must start with its first ``nn.Linear``, as the book's MLPs do; ``loss`` must be a name or a
    :class:`fso_lib.losses.Loss`, which give the output Fisher ``D``).

    * ``step_rule="quadratic_model"`` (§7): the update is ``δ = α Δ + μ δ₀`` with ``Δ = −F̆⁻¹∇`` the K-FAC
      direction, ``δ₀`` the previous update, and ``(α, μ)`` the minimizer of ``M`` (a 2×2 linear system solved on
      the device: no host read; first update, or after ``δ₀`` is lost: ``μ = 0``, ``α`` the line minimizer).
      ``lr`` and ``momentum`` are **ignored** (kept in the parameter groups, unused). ``kl_clip``, if set, then
      scales the step so that ``δᵀFδ ≤ kl_clip`` with the exact ``F`` (for the fixed rule it bounds
      ``lr²·⟨Δ, ∇⟩``, the approximate-Fisher norm ``(lr Δ)ᵀF̆(lr Δ)`` of the preconditioned step). Cost per
      update: one JVP through the model for each of the two directions (sharing the primal pass), the weight
      gradient ``gᵀh`` (one GEMM per layer) and a few inner products.
    * ``damping_adaptation=True`` (§6.5, Levenberg–Marquardt): every ``damping_adaptation_period`` (T₁) updates,
      ``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))`` on that update's minibatch; ``ρ > 3/4`` ⇒ ``ε ← ω₁ε``,
      ``ρ < 1/4`` ⇒ ``ε ← ε/ω₁``, ``ω₁ = (19/20)^T₁`` (a model that predicted no decrease, or a non-finite ρ,
      counts as ``ρ < 1/4``), clamped to ``damping_bounds`` (default ``(1e-6, 1e4)``: the lower bound keeps
      ``γ = √ε ≥ 10⁻³`` so the damped factors stay invertible in float32, the upper one stops a run of bad
      minibatches from freezing training). Every parameter group's damping is scaled alike. The new ``ε``
      enters the quadratic model at once and the factored damping ``γ = √ε`` at the next inversion (every
      ``inverse_period`` updates): with the fixed rule that is the only way ε reaches the steps, so with
      ``inverse_period = 100`` and T₁ = 5 it moves 20 times without feedback between two inversions (a
      shorter ``inverse_period`` lets it act sooner); the quadratic-model rule feels it at once. ``M`` in ``ρ``
      is the undamped model (``F`` alone) unless ``damped_rho=True`` (``F + εI``). A step skipped as non-finite
      measures nothing.
      **Interface**: ``L(θ+δ)`` needs the training loss, which the optimizer does not know. Call
      ``opt.step(minibatch_loss=fn, loss=L)`` where ``fn()`` returns the training loss of this update's
      minibatch at the current parameters (forward pass only; the optimizer calls it under ``torch.no_grad()``
      with its hooks off, once after the update on the ρ updates), and ``loss`` is ``L(θ)`` from the training
      forward pass (if omitted, ``fn()`` is also called before the update). A torch-style ``closure`` works
      too (its return value is ``L(θ)``). :func:`fso_lib.training.training_step` does this for any optimizer
      whose :attr:`wants_minibatch_loss` is true. Cost: one forward pass and one host read per T₁ updates
      (plus, with the fixed rule, a copy of the parameters and one JVP).
    * ``quadratic_model_examples``: ``F`` of the model from the first that many examples of the minibatch
      (default ``None``: all; the gradient term always uses the whole minibatch). The two JVPs of the
      quadratic-model rule cost about six forward passes over those examples (one GEMM per layer for the primal
      pass, two per layer and direction for the tangents; measured ≈ 6× on the deep autoencoder), so a quarter
      of the minibatch cuts that by about four, at the price of a noisier ``F``.

    Logged, for a harness: :attr:`damping` (group 0's current ε), :attr:`last_rho` (float, NaN before the first
    measurement), :attr:`last_step_coefficients` (``[α, μ]`` on the device, quadratic-model rule) and
    :attr:`last_model_change` (``M(δ) − M(0)`` of the last measured or quadratic-model step, on the device).
    ``state_dict()`` keeps the adapted damping (in the parameter groups), ``δ₀`` and ``last_rho``.
    """

    forms_weight_gradient = True
    saved_attributes = ("statistics_period", "inverse_period")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-2,
        momentum: float = 0.9,
        loss="squared_error",
        statistics_period: int = 10,
        inverse_period: int = 100,
        running_average: float = 0.95,
        kl_clip: float | None = None,
        check_finite: bool = True,
        weight_grads: bool = False,
        check_every: int | None = 1,
        damping_adaptation: bool = False,
        damping_adaptation_period: int = 5,
        damping_bounds: tuple[float, float] = (1e-6, 1e4),
        step_rule: str = "fixed",
        damped_rho: bool = False,
        quadratic_model_examples: int | None = None,
    ):
        if damping <= 0:
            raise ValueError("damping must be positive")
        fisher_loss = loss  # the name or Loss object: the quadratic model's output Fisher (QuadraticModelSteps)
        self.loss_name = loss if isinstance(loss, str) else None
        if isinstance(loss, str):
            if loss not in SAMPLED_LOSSES:
                raise ValueError(f"Unknown loss {loss!r}; choose one of {sorted(SAMPLED_LOSSES)} or pass a callable.")
            loss = SAMPLED_LOSSES[loss]
        elif hasattr(loss, "sample_target"):
            loss_object = loss
            loss = lambda output: loss_object(output, loss_object.sample_target(output.detach()))  # noqa: E731
        if not callable(loss):
            raise TypeError("loss must be a name, a callable output -> sampled loss, or an object with sample_target")
        super().__init__(model, dict(lr=lr, damping=damping, momentum=momentum), check_finite=check_finite,
                         weight_grads=weight_grads, check_every=check_every)
        device = self._diverged.device
        self._statistics_input_nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._statistics_output_out_of_range = torch.zeros((), dtype=torch.bool, device=device)
        self.sampled_loss = loss
        self.statistics_period = int(statistics_period)
        self.inverse_period = int(inverse_period)
        self.running_average = float(running_average)
        self.kl_clip = kl_clip
        if self.statistics_period < 1 or self.inverse_period < 1:
            raise ValueError("statistics_period and inverse_period must be at least 1")
        self._init_quadratic_model(fisher_loss, step_rule, damping_adaptation, damping_adaptation_period, damping_bounds,
                                   damped_rho, quadratic_model_examples)

    def needs_statistics(self) -> bool:
        return self.n_updates % self.statistics_period == 0

    def _collect_statistics(self, x):
        inputs, preactivations = {}, {}

        def record(k):
            def hook(module, args, out):
                inputs[k], preactivations[k] = args[0].detach(), out
            return hook

        handles = [layer.register_forward_hook(record(k)) for k, layer in enumerate(self.layers)]
        self.capture.enabled = False
        try:
            self._statistics_input_nonfinite.logical_or_(~torch.isfinite(x).all())
            with torch.enable_grad():
                output = self.model(x)
                if self.loss_name == "bernoulli":
                    detached = output.detach()
                    self._statistics_output_out_of_range.logical_or_(((detached < 0) | (detached > 1)).any())
                sampled = self.sampled_loss(output)
                # backpropagate to the pre-activations only: no weight gradient is formed or stored
                grads = torch.autograd.grad(sampled, [preactivations[k] for k in range(len(self.layers))])
        finally:
            for handle in handles:
                handle.remove()
            self.capture.enabled = True
        self._update_factors([inputs[k] for k in range(len(self.layers))], grads)

    @torch.no_grad()
    def _update_factors(self, inputs, grads):
        rho = self.running_average
        for layer, h, g in zip(self.layers, inputs, grads):
            state = self.state[layer.weight]
            n = h.shape[0]
            ones = torch.ones(n, 1, dtype=h.dtype, device=h.device)
            augmented = torch.cat([h, ones], dim=1)
            # Ā = [h 1]ᵀ[h 1] / n and Ḡ = (n g)ᵀ(n g) / n = n gᵀg (g holds the gradients of a mean over examples);
            # the running average ρ·old + (1 − ρ)·new in the same matrix product (no temporary, no extra pass)
            if "A" not in state:
                state["A"] = torch.mm(augmented.T, augmented).div_(n)
                state["G"] = torch.mm(g.T, g).mul_(n)
            else:
                state["A"].addmm_(augmented.T, augmented, beta=rho, alpha=(1 - rho) / n)
                state["G"].addmm_(g.T, g, beta=rho, alpha=(1 - rho) * n)
            state["factor_updates"] = state.get("factor_updates", 0) + 1

    def _check_statistics(self):
        """One host read per inversion: refuse non-finite factors and out-of-range Bernoulli outputs with
        an error that names the cause (not the damping)."""
        finite = torch.stack([torch.isfinite(self.state[layer.weight]["A"]).all()
                              & torch.isfinite(self.state[layer.weight]["G"]).all() for layer in self.layers])
        flags = torch.stack([finite.all(), self._statistics_input_nonfinite, self._statistics_output_out_of_range]).tolist()
        if flags[2]:
            raise ValueError(
                "KFAC(loss='bernoulli') expects the model's outputs to be probabilities in [0, 1] (a sigmoid "
                "output layer), but the statistics minibatch gave outputs outside [0, 1]. Add a sigmoid to the "
                "model, or use loss='squared_error' / 'softmax_cross_entropy' (logits) to match the training loss."
            )
        if not flags[0]:
            bad = [k for k, ok in enumerate(finite.tolist()) if not ok]
            cause = ("a statistics minibatch contained non-finite values (inf or NaN)" if flags[1]
                     else "the statistics pass produced non-finite values (the network's activations or "
                          "gradients overflowed: the parameters may have blown up)")
            raise DivergenceError(
                f"KFAC: the curvature factors of layer(s) {bad} contain inf or NaN: {cause}. "
                "The factors are running averages, so they stay non-finite; the damping is not the cause."
            )

    def _refresh_inverses(self):
        self._check_statistics()
        for k, (group, layer) in enumerate(zip(self.param_groups, self.layers)):
            state = self.state[layer.weight]
            a, g = state["A"], state["G"]
            input_shift, gradient_shift = factored_damping(a, g, group["damping"])
            state["A_inverse"] = damped_inverse(a, input_shift, what=f"input factor of layer {k}")
            state["G_inverse"] = damped_inverse(g, gradient_shift, what=f"gradient factor of layer {k}")

    def _before_updates(self):
        first = self.state[self.layers[0].weight]
        if "A" not in first:
            raise RuntimeError("KFAC has no curvature factors yet: call update_statistics(x) before the first step().")
        if self.n_updates % self.inverse_period == 0 or "A_inverse" not in first:
            self._refresh_inverses()

    def _layer_update(self, k, group, h, g):
        weight, bias = group["params"]
        state = self.state[weight]
        a_inv, g_inv = state["A_inverse"], state["G_inverse"]
        n, n_in = h.shape
        n_out = g.shape[1]
        left, right = kfac_product_order(n, n_in, n_out, self.weight_grads)
        if left == "gradient" and right == "gradient":
            grad = torch.cat([self._weight_gradient(group, h, g), bias.grad[:, None]], dim=1)
            direction = g_inv @ grad @ a_inv
            if self.kl_clip is not None and self.step_rule == "fixed":
                state["kl_term"] = (direction * grad).sum()
            return direction[:, :n_in], direction[:, n_in]
        g_g = g @ g_inv if left == "batch" else None
        if left == "batch" and right == "batch":
            # ΔW = (g G⁻¹)ᵀ ([h 1] A⁻¹)[:, :n_in], left unformed (the optimizer adds it in one addmm_), and Δb from the
            # last column; both column blocks formed apart so that the right factor is a contiguous n × n_in array
            right_weight = torch.addmm(a_inv[n_in, :n_in], h, a_inv[:n_in, :n_in])
            right_bias = torch.addmv(a_inv[n_in, n_in], h, a_inv[:n_in, n_in])
            if self.kl_clip is not None and self.step_rule == "fixed":
                # Σ_i g_iᵀ (ΔW h_i + Δb) = Σ_{j,i} (g_j G⁻¹ · g_i) ([h_j 1] A⁻¹ [h_i; 1]): two n × n products
                state["kl_term"] = ((g_g @ g.T) * torch.addmm(right_bias[:, None], right_weight, h.T)).sum()
            return LowRankDirection(g_g, right_weight), g_g.T @ right_bias
        # [h 1] A⁻¹ = h A⁻¹[:n_in] + A⁻¹[n_in]
        h_a = torch.addmm(a_inv[n_in], h, a_inv[:n_in]) if right == "batch" else None
        if left == "batch":      # ((g G⁻¹)ᵀ [h 1]) A⁻¹
            direction = torch.cat([g_g.T @ h, g_g.sum(0)[:, None]], dim=1) @ a_inv
        else:                      # G⁻¹ (gᵀ ([h 1] A⁻¹))
            direction = g_inv @ (g.T @ h_a)
        if self.kl_clip is not None and self.step_rule == "fixed":
            # ⟨Δ, gᵀ[h 1]⟩ = Σ_i g_iᵀ Δ [h_i; 1], without forming the weight gradient
            state["kl_term"] = (g * (torch.addmm(direction[:, n_in], h, direction[:, :n_in].T))).sum()
        return direction[:, :n_in], direction[:, n_in]

    def _scale_updates(self, updates):
        if self.step_rule == "quadratic_model":
            return self._quadratic_model_updates(updates)
        if self.kl_clip is None:
            return updates
        lr = self.param_groups[0]["lr"]
        quadratic = torch.stack([self.state[layer.weight]["kl_term"] for layer in self.layers]).sum() * (lr * lr)
        # scale = sqrt(kl_clip / quadratic) when quadratic > kl_clip, else 1, on the device
        scale = torch.where(quadratic > self.kl_clip, (self.kl_clip / quadratic).sqrt(), torch.ones_like(quadratic))
        return [(dw * scale, db * scale) for dw, db in updates]



def factored_damping(input_factor: torch.Tensor, gradient_factor: torch.Tensor, damping) -> tuple:
    """Martens & Grosse's factored Tikhonov damping (their §6.3): the shifts ``(π γ, γ / π)`` added to the diagonals
    of ``A`` and ``G``, with ``γ = √ε`` and ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (clamped to [1e-8, 1e8]),
    as 0-dim tensors on the factors' device (no host read)."""
    gamma = math.sqrt(float(damping))
    pi = (input_factor.diagonal().mean() / gradient_factor.diagonal().mean().clamp_min(1e-30)).sqrt().clamp(1e-8, 1e8)
    return pi * gamma, gamma / pi


def kfac_product_order(n: int, n_in: int, n_out: int, weight_grads: bool) -> tuple[str, str]:
    """How K-FAC associates ``G⁻¹ gᵀ [h 1] A⁻¹`` for a layer with a minibatch of ``n`` examples.

    Returns ``(left, right)``: ``left = "batch"`` applies ``G⁻¹`` to the n rows of ``g`` (n·out²) rather
    than to the formed (out × in+1) product (out²·(in+1)); ``right = "batch"`` applies ``A⁻¹`` to the n
    rows of ``[h 1]`` (n·(in+1)²) rather than to the product (out·(in+1)²). With autograd's gradient
    available (``weight_grads``) the choice is between the two pure orders, as before: "gradient" on both
    sides (``G⁻¹ ∇ A⁻¹``) or "batch" on both (``(g G⁻¹)ᵀ ([h 1] A⁻¹)``, the large-batch order). Without
    it every product forms the n·out·(in+1) term anyway, and each side is chosen on its own.
    """
    m = n_in + 1
    if weight_grads:
        cost_gradient = n_out * n_out * m + n_out * m * m
        cost_batch = n * n_out * n_out + n * m * m + n * n_out * m
        return ("gradient", "gradient") if cost_gradient <= cost_batch else ("batch", "batch")
    left = "gradient" if n_out * m <= n * n_out else "batch"   # out²·m vs n·out²  ⇔  m ≤ n
    right = "gradient" if n_out <= n else "batch"            # out·m² vs n·m²    ⇔  out ≤ n
    return left, right
