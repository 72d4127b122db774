"""What the chapter-6 optimizers share: per-layer parameter groups, hooks, the statistics minibatch,
divergence checks kept on the device, and a state_dict that resumes exactly (thesis §6.4)."""
from __future__ import annotations

import torch
from torch import nn

from ..layer_stats import LayerCapture, supported_linear_layers
from .low_rank import LowRankDirection, finiteness_probe

__all__ = ["DivergenceError", "LayerwiseOptimizer", "damped_inverse", "needs_statistics", "check_divergence"]


class DivergenceError(FloatingPointError):
    """A step produced a non-finite loss or update; the parameters were left as they were before it."""


def needs_statistics(optimizer) -> bool:
    """True when ``optimizer`` wants :meth:`update_statistics` called before its next update (False for torch's)."""
    method = getattr(optimizer, "needs_statistics", None)
    return bool(method()) if callable(method) else False


def check_divergence(optimizer) -> None:
    """Raise :class:`DivergenceError` if a :class:`LayerwiseOptimizer` skipped a non-finite update since the
    last check (one host read); a no-op for torch's optimizers, which have no such flag."""
    method = getattr(optimizer, "check_divergence", None)
    if callable(method):
        method()


def damped_inverse(matrix: torch.Tensor, damping, what: str = "matrix", float64_matrix=None) -> torch.Tensor:
    """``(matrix + damping · I)⁻¹`` for a symmetric positive semi-definite ``matrix``, by Cholesky.

    ``damping`` is a float or a 0-dim tensor. Tries the matrix's own precision first and float64 only if
    that factorization fails; raises :class:`DivergenceError` if even float64 finds the damped matrix not
    positive definite. Reads the factorization's status on the host (called once per refresh, not per step).

    ``float64_matrix``: a function that forms ``matrix`` again in float64 from its factors (e.g. ``S Sᵀ`` from
    ``S``), used by the float64 retry. A float32 product ``S Sᵀ`` can have negative eigenvalues of the order of its
    rounding error, larger than a small damping; casting it to float64 keeps them, forming it in float64 does not.
    """
    damped = matrix.clone()
    damped.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(chol)
        if bool(torch.isfinite(inverse).all()):
            return inverse
    if float64_matrix is not None:
        damped = float64_matrix()
        damped.diagonal().add_(damping.double() if torch.is_tensor(damping) else damping)
    damped64 = damped.double()
    chol, info = torch.linalg.cholesky_ex(damped64)
    if int(info) != 0 or not bool(torch.isfinite(damped64).all()):
        raise DivergenceError(
            f"The damped {what} is not positive definite even in float64 (damping {float(damping):.3g}); "
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
    passes and return the loss.

    **Weight gradients** (``weight_grads``). The update of each layer is formed from the captured inputs
    ``h`` and pre-activation gradients ``∂L/∂a``, so autograd's weight gradient ``(∂L/∂a)ᵀ h`` (one GEMM
    per layer) is not needed. With ``weight_grads=False`` (the default for the optimizers that form
    their own update: ACP, K-FAC, centered GD) the optimizer switches ``requires_grad`` off on the
    weights it preconditions; the biases keep it, so ``loss.backward()`` still produces every
    pre-activation gradient, and ``W.grad`` stays ``None``. To get ``W.grad`` anyway:

    * ``weight_grads=True`` in the constructor: autograd forms it as usual (one extra GEMM per layer and
      update), and the update is computed from it exactly as before; or
    * ``opt.materialize_grads()`` after ``loss.backward()`` and before ``opt.step()``: writes
      ``W.grad = (∂L/∂a)ᵀ h`` (and leaves ``b.grad``) from the captured statistics, on demand.

    :meth:`remove_hooks` gives the weights their ``requires_grad`` back.

    **Non-finite updates** (``check_every``). A step never reads a value back to the host. If the loss
    returned by the closure or any update is not finite, the step changes nothing (parameters and
    momentum buffers are kept, by a device-side ``torch.where``-style mask) and sets the 0-dim bool
    tensor :attr:`diverged`; from then on every step is skipped the same way until the flag is checked.
    :meth:`check_divergence` reads the flag (one host synchronization) and raises
    :class:`DivergenceError` naming the first bad update, then clears it. ``check_every=1`` (default)
    checks inside every ``step()`` (the behaviour of a plain training loop: the step that diverged
    raises); ``check_every=K`` checks every K steps; ``check_every=None`` never checks inside ``step()``:
    the caller calls ``opt.check_divergence()`` (or reads ``opt.diverged``) at evaluation time.
    A step that checks reads the flag before applying anything and then needs no mask; the other steps
    pay one elementwise pass over the updates for the mask. ``check_finite=False`` removes the test.
    """

    capture_inputs = True
    capture_grads = True
    #: whether this optimizer can form its update without autograd's weight gradient
    forms_weight_gradient = False

    def __init__(self, model: nn.Module, defaults: dict, check_finite: bool = True, weight_grads: bool = True,
                 check_every: int | None = 1):
        if check_every is not None and int(check_every) < 1:
            raise ValueError(f"check_every must be a positive number of steps or None, got {check_every}")
        self.model = model
        self.layers = self._find_layers(model)
        groups = [{"params": self._layer_params(layer), "layer": k} for k, layer in enumerate(self.layers)]
        super().__init__(groups, defaults)
        self.check_finite = check_finite
        self.check_every = None if check_every is None else int(check_every)
        self.weight_grads = bool(weight_grads) or not self.forms_weight_gradient
        # The update counter lives in a dict: torch.compile (dynamo) replays mutations of a dict held by an
        # optimizer but drops those of a plain int attribute, which froze the statistics/inverse schedule of a
        # compiled step (see the ``n_updates`` property).
        self._schedule = {"n_updates": 0}
        self.capture = LayerCapture(model, inputs=self.capture_inputs, grads=self.capture_grads, layers=self.layers)
        self._frozen_weights = []
        if not self.weight_grads:
            for group in self.param_groups:
                weight = group["params"][0]
                if weight.requires_grad:
                    weight.requires_grad_(False)
                    self._frozen_weights.append(weight)
        device = self.param_groups[0]["params"][0].device
        self._diverged = torch.zeros((), dtype=torch.bool, device=device)
        self._divergence_update = torch.full((), -1, dtype=torch.int64, device=device)
        self._divergence_loss = torch.full((), float("nan"), device=device)
        self._divergence_in_loss = torch.zeros((), dtype=torch.bool, device=device)
        self._device_updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def n_updates(self) -> int:
        """Number of ``step()`` calls so far (drives the statistics and inversion schedules)."""
        return self._schedule["n_updates"]

    @n_updates.setter
    def n_updates(self, value: int) -> None:
        self._schedule["n_updates"] = int(value)

    # -- hooks for subclasses ---------------------------------------------------------------------
    def _find_layers(self, model: nn.Module) -> list[nn.Module]:
        return supported_linear_layers(model)

    def _layer_params(self, layer: nn.Module) -> list[torch.Tensor]:
        return [layer.weight, layer.bias]

    def _layer_update(self, k: int, group: dict, h, g):
        """Return the descent directions (dW, db) of layer ``k``; the step is ``−lr · direction``.
        ``dW`` may be a :class:`~fso_lib.optim.low_rank.LowRankDirection` (applied without being formed).
        The optimizer may modify the returned tensors in place (a skipped, non-finite step zeroes them).
        Every subclass defines it."""
        raise TypeError(f"{type(self).__name__} does not define _layer_update.")

    def _before_updates(self) -> None:
        """Called once per step before the layer updates (e.g. refresh amortized inverses)."""

    def _scale_updates(self, updates):
        return updates

    # -- gradients from the captured statistics ---------------------------------------------------------
    def _weight_gradient(self, group: dict, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``∇_W L``: autograd's ``.grad`` when it was formed, else ``gᵀ h`` from the captured statistics."""
        weight = group["params"][0]
        if self.weight_grads:
            return weight.grad
        return g.T @ h

    def materialize_grads(self) -> None:
        """Fill ``W.grad`` of every layer with ``(∂L/∂a)ᵀ h`` from the statistics captured by the last
        forward/backward pass (call it after ``loss.backward()`` and before ``step()``). A no-op when
        autograd already forms the weight gradients (``weight_grads=True``)."""
        if self.weight_grads:
            return
        for k, group in enumerate(self.param_groups):
            h, g = self._captured(k)
            group["params"][0].grad = g.T @ h

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

    @property
    def diverged(self) -> torch.Tensor:
        """0-dim bool tensor on the parameters' device: True when a non-finite loss or update was skipped
        since the last :meth:`check_divergence`. Reading it with ``bool()`` synchronizes with the device."""
        return self._diverged

    def check_divergence(self) -> None:
        """Raise :class:`DivergenceError` if a non-finite loss or update was skipped since the last check,
        and clear the flag (one host read). The parameters are those from before the first bad update."""
        if not bool(self._diverged):
            return
        update = int(self._divergence_update)
        in_loss = bool(self._divergence_in_loss)
        loss = float(self._divergence_loss)
        self._diverged.fill_(False)
        self._divergence_in_loss.fill_(False)
        self._divergence_update.fill_(-1)
        if in_loss:
            raise DivergenceError(
                f"{type(self).__name__}: the loss is {loss} at update {update}; the parameters were not changed. "
                "Try a smaller learning rate or a larger damping."
            )
        raise DivergenceError(
            f"{type(self).__name__}: the update at step {update} is not finite (inf or NaN, or large enough to "
            "overflow); "
            "the parameters were not changed. Try a smaller learning rate, a larger damping, "
            "or clipping the step (e.g. K-FAC's kl_clip)."
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_updates()  # schedules, statistics and inverse refreshes: Python control flow, host reads allowed
        check_now = self.check_finite and self.check_every is not None and (self.n_updates + 1) % self.check_every == 0
        if check_now:
            # the flag is read now anyway: raise before touching anything, else apply without the mask
            updates = self._scaled_updates()
            self._record_non_finite(updates, loss)
            self.check_divergence()
            for group, pair in zip(self.param_groups, updates):
                self._apply(group, pair, None)
            self._device_updates.add_(1)
        else:
            (self._compiled_update or self._masked_update)(loss)
        self.n_updates += 1
        self.capture.clear()
        return loss

    def _scaled_updates(self):
        updates = []
        for k, group in enumerate(self.param_groups):
            h, g = self._captured(k)
            updates.append(self._layer_update(k, group, h, g))
        return self._scale_updates(updates)

    def _record_non_finite(self, updates, loss) -> torch.Tensor:
        """Fold "this update or loss is not finite" into the device flags; return the flag (no host read)."""
        total = torch.stack([finiteness_probe(u) for pair in updates for u in pair]).sum()
        bad_update = ~torch.isfinite(total)
        if loss is not None:
            loss_t = torch.as_tensor(loss, device=self._diverged.device).detach().float().reshape(())
            bad_loss = ~torch.isfinite(loss_t)
        else:
            loss_t, bad_loss = None, torch.zeros_like(bad_update)
        bad = bad_update | bad_loss
        first = bad & ~self._diverged
        self._divergence_update.copy_(torch.where(first, self._device_updates, self._divergence_update))
        self._divergence_in_loss.copy_(torch.where(first, bad_loss, self._divergence_in_loss))
        if loss_t is not None:
            self._divergence_loss.copy_(torch.where(first, loss_t, self._divergence_loss))
        self._diverged.logical_or_(bad)
        return self._diverged

    def _masked_update(self, loss) -> None:
        """The steady-state part of a step: the layer updates, the non-finite flag, and the masked application.
        Pure tensor code (no host read, no branch on the update counter): :meth:`compile_step` compiles it."""
        updates = self._scaled_updates()
        skip = self._record_non_finite(updates, loss) if self.check_finite else None
        for group, pair in zip(self.param_groups, updates):
            self._apply(group, pair, skip)
        self._device_updates.add_(1)

    _compiled_update = None

    def compile_step(self, **options) -> "LayerwiseOptimizer":
        """Compile the steady-state part of :meth:`step` with ``torch.compile(**options)`` (e.g.
        ``mode="reduce-overhead"`` for CUDA graphs on a GPU; on a CPU inductor needs a C++ compiler).

        The schedule (statistics, inverse refreshes, with their host reads) stays eager in
        :meth:`_before_updates`; the compiled part holds the layer updates, the device-side non-finite flag and
        the masked application, so that it sees the same code every update and is compiled once. Steps that
        read the flag (``check_every``) run eagerly; use ``check_every=None`` (and :meth:`check_divergence` at
        evaluation time) to compile every step. Returns the optimizer."""
        reason = self._not_compilable()
        if reason:
            raise ValueError(f"{type(self).__name__}.compile_step: {reason}")
        self._compiled_update = torch.compile(self._masked_update, **options)
        return self

    def _not_compilable(self) -> str | None:
        """Why this configuration's steady-state step cannot be compiled, or ``None``."""
        return None

    def _apply(self, group: dict, pair, skip) -> None:
        """``p ← p − lr · direction`` (heavy ball: ``buf ← momentum · buf + direction``, ``p ← p − lr · buf``);
        when the 0-dim bool ``skip`` is True the parameters and buffers stay as they are (no host read)."""
        lr, momentum = group["lr"], group.get("momentum", 0.0)
        for p, direction in zip(group["params"], pair):
            if isinstance(direction, LowRankDirection):
                self._apply_low_rank(p, direction, lr, momentum, skip)
                continue
            if skip is not None:
                direction.masked_fill_(skip, 0.0)
            if momentum:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = direction.clone()
                elif skip is None:
                    torch.add(direction, buf, alpha=momentum, out=buf)  # buf ← momentum·buf + direction, one pass
                else:
                    # buf ← direction + factor · buf in one pass (factor = 1 and direction = 0 on a skipped step)
                    factor = torch.where(skip, self._scalar(1.0, buf), self._scalar(momentum, buf))
                    torch.addcmul(direction, buf, factor, out=buf)
                self._step_along(p, buf, lr, skip)
            else:
                p.add_(direction, alpha=-lr)

    def _apply_low_rank(self, p, direction: LowRankDirection, lr: float, momentum: float, skip) -> None:
        """:meth:`_apply` for a direction kept as ``leftᵀ right``: the product goes straight into ``p`` (or into
        the momentum buffer, ``buf ← μ·buf + leftᵀright`` in one ``addmm_``); the update is never formed."""
        if skip is not None:
            direction = direction.masked(skip)  # a skipped step adds leftᵀright = 0
        left_t, right = direction.left.T, direction.right
        if not momentum:
            p.addmm_(left_t, right, alpha=-lr)
            return
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = left_t @ right
        elif skip is None:
            buf.addmm_(left_t, right, beta=momentum)
        else:
            buf.mul_(torch.where(skip, self._scalar(1.0, buf), self._scalar(momentum, buf))).addmm_(left_t, right)
        self._step_along(p, buf, lr, skip)

    def _step_along(self, p, buf, lr: float, skip) -> None:
        """``p ← p − lr · buf`` (the heavy-ball buffer), or nothing when the 0-dim bool ``skip`` is True (no host read)."""
        if skip is None:
            p.add_(buf, alpha=-lr)
        else:
            p.addcmul_(buf, torch.where(skip, self._scalar(0.0, p), self._scalar(-lr, p)))

    def _scalar(self, value: float, like: torch.Tensor) -> torch.Tensor:
        """A cached 0-dim tensor holding ``value`` in ``like``'s dtype and device (no copy per step)."""
        key = (float(value), like.dtype, like.device)
        cache = self.__dict__.setdefault("_scalars", {})
        if key not in cache:
            cache[key] = torch.full((), value, dtype=like.dtype, device=like.device)
        return cache[key]

    # -- saving -----------------------------------------------------------------------------------
    #: numbers a subclass keeps as attributes and saves beside torch's state (schedule periods, logged values); the
    #: names of every class of the MRO are saved
    saved_attributes: tuple = ()

    def _saved_attribute_names(self) -> list[str]:
        return [name for cls in type(self).__mro__ for name in cls.__dict__.get("saved_attributes", ())]

    def state_dict(self):
        sd = super().state_dict()
        sd["n_updates"] = self.n_updates
        for name in self._saved_attribute_names():
            sd[name] = getattr(self, name)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.n_updates = int(state_dict.pop("n_updates", 0))
        self._device_updates.fill_(self.n_updates)
        for name in self._saved_attribute_names():
            if name in state_dict:
                setattr(self, name, type(getattr(self, name))(state_dict.pop(name)))
        super().load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        """Take this optimizer's hooks off the model (it can no longer step) and give the weights their
        ``requires_grad`` back."""
        self.capture.remove()
        for weight in self._frozen_weights:
            weight.requires_grad_(True)
        self._frozen_weights = []
