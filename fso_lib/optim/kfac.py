"""K-FAC for MLPs (Martens & Grosse 2015; thesis §6.5.1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import LayerwiseOptimizer, damped_inverse

__all__ = ["KFAC", "SAMPLED_LOSSES"]


def _squared_error_sample(output: torch.Tensor) -> torch.Tensor:
    # l = ‖f − y‖² (no 1/2) is −log N(y; f, ½ I) + const: sample y = f + N(0, ½)
    target = output.detach() + math.sqrt(0.5) * torch.randn_like(output)
    return (output - target).square().sum(dim=1).mean()


def _bernoulli_sample(output: torch.Tensor) -> torch.Tensor:
    # output holds probabilities (sigmoid already applied), loss = binary cross-entropy summed over units
    p = output.detach().clamp(1e-7, 1 - 1e-7)
    target = torch.bernoulli(p)
    out = output.clamp(1e-7, 1 - 1e-7)
    return -(target * out.log() + (1 - target) * (1 - out).log()).sum(dim=1).mean()


def _softmax_sample(output: torch.Tensor) -> torch.Tensor:
    # output holds logits, loss = multiclass cross-entropy
    target = torch.multinomial(torch.softmax(output.detach(), dim=1), 1).squeeze(1)
    return nn.functional.cross_entropy(output, target)


#: Losses K-FAC knows how to sample targets for: name → sampled loss (mean over examples) of the output.
SAMPLED_LOSSES = {
    "squared_error": _squared_error_sample,
    "bernoulli": _bernoulli_sample,
    "softmax_cross_entropy": _softmax_sample,
}


class KFAC(LayerwiseOptimizer):
    """Kronecker-factored approximate curvature for MLPs (Martens & Grosse 2015; Thesis §6.5.1).

    Each layer's block of the **Fisher of the model's predictive distribution** (the "true" Fisher,
    with targets *sampled from the model*, not the empirical Fisher of the training targets; for the
    squared error and the cross-entropies it is the Gauss-Newton matrix, §3.3.2) is approximated by
    a product of sums, ``E[ã ãᵀ] ⊗ E[g gᵀ]`` with ``ã = [h; 1]`` and ``g`` the per-example gradient of the
    sampled loss w.r.t. the pre-activation. In torch's ``[W b]`` row-major layout the update is::

        Δ[W b] = (G + (√λ/π) I)⁻¹ ∇_{[W b]} (A + π√λ I)⁻¹,   π = sqrt( (tr A / (n_in+1)) / (tr G / n_out) )

    (factored Tikhonov damping with Martens & Grosse's π correction, §6.3 of their paper).

    * ``update_statistics(x)`` (every ``statistics_period`` updates) runs a forward pass on ``x``,
      samples targets from the model's output distribution (``loss``: a name in
      :data:`SAMPLED_LOSSES` or a callable ``output -> sampled loss averaged over examples``), and
      backpropagates to the pre-activations only; ``A`` and ``G`` are running averages with weight
      ``running_average`` on the past.
    * The damped inverses are recomputed every ``inverse_period`` updates (amortized inversion).
    * ``momentum``: heavy-ball momentum on the preconditioned step; ``kl_clip``: if set, the step is
      scaled so that ``lr² · Σ ⟨Δ, ∇⟩ ≤ kl_clip`` (a trust region that keeps low damping stable).
    """

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
    ):
        if damping <= 0:
            raise ValueError("damping must be positive")
        if isinstance(loss, str):
            if loss not in SAMPLED_LOSSES:
                raise ValueError(f"Unknown loss {loss!r}; choose one of {sorted(SAMPLED_LOSSES)} or pass a callable.")
            loss = SAMPLED_LOSSES[loss]
        elif hasattr(loss, "sample_target"):
            loss_object = loss
            loss = lambda output: loss_object(output, loss_object.sample_target(output.detach()))  # noqa: E731
        if not callable(loss):
            raise TypeError("loss must be a name, a callable output -> sampled loss, or an object with sample_target")
        super().__init__(model, dict(lr=lr, damping=damping, momentum=momentum), check_finite=check_finite)
        self.sampled_loss = loss
        self.statistics_period = int(statistics_period)
        self.inverse_period = int(inverse_period)
        self.running_average = float(running_average)
        self.kl_clip = kl_clip
        if self.statistics_period < 1 or self.inverse_period < 1:
            raise ValueError("statistics_period and inverse_period must be at least 1")

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
            with torch.enable_grad():
                output = self.model(x)
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
            per_example = g * n  # the sampled loss is a mean over examples
            ones = torch.ones(n, 1, dtype=h.dtype, device=h.device)
            augmented = torch.cat([h, ones], dim=1)
            a_new = augmented.T @ augmented / n
            g_new = per_example.T @ per_example / n
            if "A" not in state:
                state["A"], state["G"] = a_new, g_new
            else:
                state["A"].mul_(rho).add_(a_new, alpha=1 - rho)
                state["G"].mul_(rho).add_(g_new, alpha=1 - rho)
            state["factor_updates"] = state.get("factor_updates", 0) + 1

    def _refresh_inverses(self):
        for k, (group, layer) in enumerate(zip(self.param_groups, self.layers)):
            state = self.state[layer.weight]
            a, g = state["A"], state["G"]
            gamma = math.sqrt(group["damping"])
            pi = math.sqrt((float(a.diagonal().mean())) / max(float(g.diagonal().mean()), 1e-30))
            pi = min(max(pi, 1e-8), 1e8)
            state["A_inverse"] = damped_inverse(a, pi * gamma, what=f"input factor of layer {k}")
            state["G_inverse"] = damped_inverse(g, gamma / pi, what=f"gradient factor of layer {k}")

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
        cost_gradient = n_out * n_out * (n_in + 1) + n_out * (n_in + 1) ** 2
        cost_batch = n * n_out * n_out + n * (n_in + 1) ** 2 + n * n_out * (n_in + 1)
        if cost_gradient <= cost_batch:
            grad = torch.cat([weight.grad, bias.grad[:, None]], dim=1)
            direction = g_inv @ grad @ a_inv
        else:
            # (g G⁻¹)ᵀ ([h 1] A⁻¹), with [h 1] A⁻¹ = h A⁻¹[:n_in] + A⁻¹[n_in]
            right = torch.addmm(a_inv[n_in], h, a_inv[:n_in])
            direction = (g @ g_inv).T @ right
        return direction[:, :n_in], direction[:, n_in]

    def _scale_updates(self, updates):
        if self.kl_clip is None:
            return updates
        lr = self.param_groups[0]["lr"]
        quadratic = sum(
            (dw * group["params"][0].grad).sum() + (db * group["params"][1].grad).sum()
            for group, (dw, db) in zip(self.param_groups, updates)
        )
        quadratic = float(quadratic) * lr * lr
        if quadratic > self.kl_clip:
            scale = math.sqrt(self.kl_clip / quadratic)
            updates = [(dw * scale, db * scale) for dw, db in updates]
        return updates

    def state_dict(self):
        sd = super().state_dict()
        sd["statistics_period"] = self.statistics_period
        sd["inverse_period"] = self.inverse_period
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.statistics_period = int(state_dict.pop("statistics_period", self.statistics_period))
        self.inverse_period = int(state_dict.pop("inverse_period", self.inverse_period))
        super().load_state_dict(state_dict)
