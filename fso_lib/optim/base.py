"""What the chapter-6 optimizers share: per-layer parameter groups, hooks, the statistics minibatch,
divergence checks and a state_dict that resumes exactly (thesis §6.4)."""
from __future__ import annotations

import torch
from torch import nn

from ..layer_stats import LayerCapture, supported_linear_layers

__all__ = ["DivergenceError", "LayerwiseOptimizer", "damped_inverse", "needs_statistics"]


class DivergenceError(FloatingPointError):
    """A step produced a non-finite loss or update; the parameters were left as they were before it."""


def needs_statistics(optimizer) -> bool:
    """True when ``optimizer`` wants :meth:`update_statistics` called before its next update (False for torch's)."""
    method = getattr(optimizer, "needs_statistics", None)
    return bool(method()) if callable(method) else False


def damped_inverse(matrix: torch.Tensor, damping: float, what: str = "matrix") -> torch.Tensor:
    """``(matrix + damping · I)⁻¹`` for a symmetric positive semi-definite ``matrix``, by Cholesky.

    Tries the matrix's own precision first and float64 only if that factorization fails; raises
    :class:`DivergenceError` if even float64 finds the damped matrix not positive definite.
    """
    damped = matrix.clone()
    damped.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(chol)
        if bool(torch.isfinite(inverse).all()):
            return inverse
    damped64 = damped.double()
    chol, info = torch.linalg.cholesky_ex(damped64)
    if int(info) != 0 or not bool(torch.isfinite(damped64).all()):
        raise DivergenceError(
            f"The damped {what} is not positive definite even in float64 (damping {damping:.3g}); "
            "its entries may have blown up. Try a larger damping or a smaller learning rate."
        )
    return torch.cholesky_inverse(chol).to(matrix.dtype)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base class: one parameter group ``{'params': [W, b]}`` per ``nn.Linear`` of ``model``.

    Subclasses implement :meth:`_layer_update` and, when they use a separate statistics minibatch,
    :meth:`_collect_statistics` and :meth:`needs_statistics`. Per update, a harness does::

        if opt.needs_statistics():
            opt.update_statistics(x_stats)      # forward pass on a separate minibatch
        opt.zero_grad()
        loss = loss_fn(model(x), y)             # the model's forward hooks record the layer inputs
        loss.backward()                         # ... and the pre-activation gradients
        opt.step()

    ``step(closure)`` also works: the closure must zero the gradients, run the forward and backward
    passes and return the loss. A non-finite loss or update raises :class:`DivergenceError`
    before any parameter changes.
    """

    capture_inputs = True
    capture_grads = True

    def __init__(self, model: nn.Module, defaults: dict, check_finite: bool = True):
        self.model = model
        self.layers = self._find_layers(model)
        groups = [{"params": self._layer_params(layer), "layer": k} for k, layer in enumerate(self.layers)]
        super().__init__(groups, defaults)
        self.check_finite = check_finite
        self.n_updates = 0
        self.capture = LayerCapture(model, inputs=self.capture_inputs, grads=self.capture_grads, layers=self.layers)

    # -- hooks for subclasses ---------------------------------------------------------------------
    def _find_layers(self, model: nn.Module) -> list[nn.Module]:
        return supported_linear_layers(model)

    def _layer_params(self, layer: nn.Module) -> list[torch.Tensor]:
        return [layer.weight, layer.bias]

    def _layer_update(self, k: int, group: dict, h, g):
        """Return the descent directions (dW, db) of layer ``k``; the step is ``−lr · direction``.
        Every subclass defines it."""
        raise TypeError(f"{type(self).__name__} does not define _layer_update.")

    def _before_updates(self) -> None:
        """Called once per step before the layer updates (e.g. refresh amortized inverses)."""

    def _scale_updates(self, updates):
        return updates

    # -- statistics minibatch -------------------------------------------------------------------------
    def needs_statistics(self) -> bool:
        """True when the next update wants a statistics minibatch (:meth:`update_statistics`)."""
        return False

    def update_statistics(self, x: torch.Tensor) -> None:
        """Feed a separate minibatch of inputs ``x`` to (re-)estimate the layer statistics."""
        saved_inputs, saved_grads = list(self.capture.inputs), list(self.capture.grads)
        try:
            self._collect_statistics(x)
        finally:
            self.capture.inputs, self.capture.grads = saved_inputs, saved_grads

    def _collect_statistics(self, x: torch.Tensor) -> None:
        raise TypeError(f"{type(self).__name__} uses no statistics minibatch: do not call update_statistics on it.")

    # -- the update ---------------------------------------------------------------------------------
    def _captured(self, k: int):
        h = self.capture.inputs[k] if self.capture_inputs else None
        g = self.capture.grads[k] if self.capture_grads else None
        if (self.capture_inputs and h is None) or (self.capture_grads and g is None):
            raise RuntimeError(
                f"{type(self).__name__}: layer {k} has no captured {'input' if h is None else 'gradient'}. "
                "Run the forward pass through the model and loss.backward() before step() (once per step)."
            )
        if h is not None and g is not None and h.shape[0] != g.shape[0]:
            raise RuntimeError(
                f"{type(self).__name__}: layer {k} saw inputs of {h.shape[0]} examples but gradients of {g.shape[0]}; "
                "call update_statistics() before the training forward pass, not between it and step()."
            )
        return h, g

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if self.check_finite and loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                raise DivergenceError(
                    f"{type(self).__name__}: the loss is {float(loss)} at update {self.n_updates}; "
                    "try a smaller learning rate or a larger damping."
                )
        self._before_updates()
        updates = []
        for k, group in enumerate(self.param_groups):
            h, g = self._captured(k)
            updates.append(self._layer_update(k, group, h, g))
        updates = self._scale_updates(updates)
        if self.check_finite:
            total = torch.stack([u.sum() for pair in updates for u in pair]).sum()
            if not bool(torch.isfinite(total)):
                raise DivergenceError(
                    f"{type(self).__name__}: the update at step {self.n_updates} is not finite (inf or NaN); "
                    "the parameters were not changed. Try a smaller learning rate, a larger damping, "
                    "or clipping the step (e.g. K-FAC's kl_clip)."
                )
        for group, pair in zip(self.param_groups, updates):
            self._apply(group, pair)
        self.n_updates += 1
        self.capture.clear()
        return loss

    def _apply(self, group: dict, pair) -> None:
        lr, momentum = group["lr"], group.get("momentum", 0.0)
        for p, direction in zip(group["params"], pair):
            if momentum:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = direction.clone()
                else:
                    buf.mul_(momentum).add_(direction)
                direction = buf
            p.add_(direction, alpha=-lr)

    # -- saving -----------------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["n_updates"] = self.n_updates
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.n_updates = int(state_dict.pop("n_updates", 0))
        super().load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        """Take this optimizer's hooks off the model (it can no longer step)."""
        self.capture.remove()
