"""The exact-Fisher quadratic model of the loss on one minibatch (Martens & Grosse 2015, §6.4–§7; thesis §3.2, §6.5.1).

K-FAC proposes a direction from its *approximate* Fisher; Martens & Grosse judge and scale it with the
*exact* Fisher ``F`` of the current minibatch, through the quadratic model of the change of the loss

    M(δ) − M(0) = ½ δᵀ (F + ε I) δ + ∇ᵀδ,      F = (1/n) Σ_i J_iᵀ D_i J_i,

where ``J_i = ∂f(x_i)/∂θ`` is the Jacobian of the network's output for example ``i``, ``D_i`` the Fisher of the
predictive distribution in output space (:mod:`fso_lib.losses`, thesis Table 3.II), ``∇`` the minibatch
gradient and ``ε`` the damping (``ε = 0``: the undamped model).

Only quadratic forms ``uᵀ F v = (1/n) Σ_i (J_i u)ᵀ D_i (J_i v)`` are needed, so every direction costs one
forward-mode Jacobian-vector product (``torch.func.jvp``) and no backward pass; the directions of one
update share one call (``vmap`` over the tangents). :meth:`MinibatchQuadraticModel.fisher_vector_product`
(a JVP then a VJP) gives the full product ``F v`` for checks.

On top of these Gram matrices: :func:`model_change` (``M`` at ``δ = Σ_j c_j v_j``), :func:`minimizing_coefficients`
(the ``c`` that minimizes it: Martens & Grosse's §7 choice of learning rate and momentum, on the device, no
host read), :func:`reduction_ratio` (``ρ``) and :func:`levenberg_marquardt_damping` (their §6.5 rule).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from ..losses import Loss
from .low_rank import as_dense

__all__ = [
    "OUTPUT_FISHER_PRODUCTS",
    "output_fisher_product",
    "MinibatchQuadraticModel",
    "model_change",
    "minimizing_coefficients",
    "reduction_ratio",
    "levenberg_marquardt_damping",
    "QuadraticModelSteps",
    "STEP_RULES",
]


def _squared_error_fisher(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    # l = ‖f − y‖² is −log N(y; f, ½ I) + const: D = 2 I
    return 2.0 * vectors


def _bernoulli_fisher(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    # outputs are probabilities p: D = diag(1 / (p (1 − p))), p clamped as the K-FAC sampler does
    p = output.clamp(1e-7, 1 - 1e-7)
    return vectors / (p * (1 - p))


def _softmax_fisher(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    # outputs are logits z, p = softmax(z): D = diag(p) − p pᵀ
    p = torch.softmax(output, dim=-1)
    return p * vectors - p * (p * vectors).sum(dim=-1, keepdim=True)


#: Output-space Fisher products ``D_i v_i`` for the losses K-FAC samples (the names of ``SAMPLED_LOSSES``).
OUTPUT_FISHER_PRODUCTS = {
    "squared_error": _squared_error_fisher,
    "bernoulli": _bernoulli_fisher,
    "softmax_cross_entropy": _softmax_fisher,
}


def output_fisher_product(loss):
    """``(output, vectors) -> D v`` for ``loss``: a name of :data:`OUTPUT_FISHER_PRODUCTS` or a
    :class:`fso_lib.losses.Loss` (its ``fisher_output_product``). Anything else raises ``TypeError``."""
    if isinstance(loss, str):
        try:
            return OUTPUT_FISHER_PRODUCTS[loss]
        except KeyError:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {sorted(OUTPUT_FISHER_PRODUCTS)}.") from None
    if isinstance(loss, Loss):
        return loss.fisher_output_product
    raise TypeError("The exact-Fisher quadratic model needs the output Fisher D of the loss: pass a loss name "
                    f"({sorted(OUTPUT_FISHER_PRODUCTS)}) or a fso_lib.losses.Loss, not {type(loss).__name__}.")


@contextlib.contextmanager
def _forward_mode_quietly():
    """torch loads its forward-mode decompositions through ``torch.jit.script`` on the first JVP, which warns
    that ``torch.jit.script`` is deprecated: a message about torch's internals, not about this code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        yield


class MinibatchQuadraticModel:
    """``M(δ) − M(0) = ½ δᵀ(F + εI)δ + ∇ᵀδ`` of ``model`` on the minibatch ``inputs`` (Martens & Grosse §6.4).

    ``gradient`` and every direction are dicts ``parameter name → tensor`` over the same names (a subset
    of ``model.named_parameters()``; the other parameters are held fixed). ``parameters`` gives the point
    ``θ`` (default: the model's current values). ``loss`` names the output Fisher ``D``
    (:func:`output_fisher_product`). Forward hooks of ``model`` fire during the JVPs: switch off any that
    must not see these passes.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, gradient: Mapping[str, torch.Tensor], loss="squared_error",
                 parameters: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self.inputs = inputs
        self.gradient = dict(gradient)
        self.names = list(self.gradient)
        if parameters is None:
            named = dict(model.named_parameters())
            parameters = {name: named[name].detach() for name in self.names}
        self.parameters = {name: parameters[name] for name in self.names}
        self.fisher_product = output_fisher_product(loss)

    def _forward(self, parameters):
        out = functional_call(self.model, parameters, (self.inputs,))
        return out.unsqueeze(1) if out.dim() == 1 else out

    def _stack(self, directions):
        return {name: torch.stack([d[name] for d in directions]) for name in self.names}

    def output_jvps(self, directions: Sequence[Mapping[str, torch.Tensor]], stacked=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, Jv)``: the outputs ``(n, k)`` at ``θ`` and ``J v_j`` for each direction, ``(m, n, k)``."""
        stacked = self._stack(directions) if stacked is None else stacked
        with torch.no_grad(), _forward_mode_quietly():
            output, products = vmap(lambda tangent: jvp(self._forward, (self.parameters,), (tangent,)),
                                    out_dims=(None, 0))(stacked)
        return output, products

    def fisher_gram(self, directions: Sequence[Mapping[str, torch.Tensor]], stacked=None) -> torch.Tensor:
        """``[v_aᵀ F v_b]``, ``(m, m)``, from one JVP per direction."""
        output, products = self.output_jvps(directions, stacked)
        weighted = torch.stack([self.fisher_product(output, p) for p in products])
        return torch.einsum("ank,bnk->ab", products, weighted) / output.shape[0]

    def euclidean_gram(self, directions: Sequence[Mapping[str, torch.Tensor]],
                       weights: Mapping[str, float] | None = None, stacked=None) -> torch.Tensor:
        """``[Σ_p w_p ⟨v_a[p], v_b[p]⟩]``, ``(m, m)``: the damping's part of the Gram matrix (``w_p = 1`` by default)."""
        stacked = self._stack(directions) if stacked is None else stacked
        total = 0
        for name in self.names:
            flat = stacked[name].reshape(len(directions), -1)
            total = total + (weights or {}).get(name, 1.0) * (flat @ flat.T)
        return total

    def gradient_dots(self, directions: Sequence[Mapping[str, torch.Tensor]], stacked=None) -> torch.Tensor:
        """``[∇ᵀ v_j]``, ``(m,)``."""
        stacked = self._stack(directions) if stacked is None else stacked
        return sum(stacked[name].reshape(len(directions), -1) @ self.gradient[name].reshape(-1) for name in self.names)

    def gram_matrices(self, directions: Sequence[Mapping[str, torch.Tensor]],
                      weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(G_F, G_I, b)``: :meth:`fisher_gram`, :meth:`euclidean_gram` and :meth:`gradient_dots` of the same
        directions, stacked once."""
        stacked = self._stack(directions)
        return (self.fisher_gram(directions, stacked), self.euclidean_gram(directions, weights, stacked),
                self.gradient_dots(directions, stacked))

    def change(self, delta: Mapping[str, torch.Tensor], damping: float = 0.0) -> torch.Tensor:
        """``M(δ) − M(0) = ½ δᵀ(F + εI)δ + ∇ᵀδ`` (0-dim tensor)."""
        gram = self.fisher_gram([delta]) + damping * self.euclidean_gram([delta])
        return 0.5 * gram[0, 0] + self.gradient_dots([delta])[0]

    def fisher_vector_product(self, vector: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``F v = (1/n) Σ_i J_iᵀ D_i J_i v`` as a dict (a JVP, then a VJP)."""
        with _forward_mode_quietly():
            output, forward_product = jvp(self._forward, (self.parameters,), ({n: vector[n] for n in self.names},))
        _, pullback = vjp(self._forward, self.parameters)
        return pullback(self.fisher_product(output.detach(), forward_product) / output.shape[0])[0]


def model_change(coefficients: torch.Tensor, fisher_gram: torch.Tensor, euclidean_gram: torch.Tensor,
                 gradient_dots: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """``M(δ) − M(0)`` at ``δ = Σ_j c_j v_j`` from the Gram matrices of the ``v_j``: ``½ cᵀ(G_F + ε G_I)c + bᵀc``."""
    gram = fisher_gram + damping * euclidean_gram
    return 0.5 * coefficients @ gram @ coefficients + gradient_dots @ coefficients


def minimizing_coefficients(fisher_gram: torch.Tensor, euclidean_gram: torch.Tensor, gradient_dots: torch.Tensor,
                            damping: float) -> torch.Tensor:
    """The ``c`` minimizing ``M(Σ_j c_j v_j)`` for one or two directions: ``(G_F + ε G_I) c = −b``.

    With two directions ``(Δ, δ₀)`` this is Martens & Grosse's §7 choice ``δ = α Δ + μ δ₀`` (learning rate α,
    momentum μ). Solved in closed form on the device (no host read); when the two directions are parallel to
    working precision (``det ≤ 10⁻¹⁰ · Q₀₀ Q₁₁``) the second coefficient is 0 and the first is the line minimizer
    ``−b₀ / Q₀₀``; a zero first direction gives 0.
    """
    gram = fisher_gram + damping * euclidean_gram
    q00 = gram[0, 0]
    safe_q00 = torch.where(q00 > 0, q00, torch.ones_like(q00))
    alpha_line = torch.where(q00 > 0, -gradient_dots[0] / safe_q00, torch.zeros_like(q00))
    if gram.shape[0] == 1:
        return alpha_line.reshape(1)
    q01, q11 = gram[0, 1], gram[1, 1]
    det = q00 * q11 - q01 * q01
    solvable = det > 1e-10 * q00 * q11
    safe_det = torch.where(solvable, det, torch.ones_like(det))
    b0, b1 = gradient_dots[0], gradient_dots[1]
    alpha = torch.where(solvable, (-b0 * q11 + b1 * q01) / safe_det, alpha_line)
    mu = torch.where(solvable, (-b1 * q00 + b0 * q01) / safe_det, torch.zeros_like(det))
    return torch.stack([alpha, mu])


def reduction_ratio(loss_before, loss_after, predicted_change) -> torch.Tensor:
    """``ρ = (L(θ + δ) − L(θ)) / (M(δ) − M(0))``: how much of the predicted decrease the step delivered."""
    return (torch.as_tensor(loss_after) - torch.as_tensor(loss_before)) / torch.as_tensor(predicted_change)


def levenberg_marquardt_damping(damping: float, rho: float, period: int, bounds: tuple[float, float],
                                predicted_decrease: bool = True) -> float:
    """Martens & Grosse's §6.5 rule, applied every ``period`` (T₁) updates with ``ω₁ = (19/20)^T₁``:
    ``ρ > 3/4`` ⇒ ``ε ← ω₁ ε``; ``ρ < 1/4`` ⇒ ``ε ← ε / ω₁``; otherwise unchanged; then clamped to ``bounds``.

    A model that predicted no decrease (``predicted_decrease=False``) or a non-finite ``ρ`` counts as ``ρ < 1/4``.
    """
    omega = (19.0 / 20.0) ** period
    if not predicted_decrease or not math.isfinite(rho):
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    elif rho < 0.25:
        damping = damping / omega
    low, high = bounds
    return min(max(damping, low), high)


#: ``"fixed"``: the step is ``−lr · Δ`` (heavy-ball momentum where the optimizer has it); ``"quadratic_model"``:
#: ``δ = α Δ + μ δ₀`` with ``(α, μ)`` minimizing the exact-Fisher model (Martens & Grosse §7).
STEP_RULES = ("fixed", "quadratic_model")


def _first_leaf(module: nn.Module) -> nn.Module:
    """The module that ``module``'s forward pass (of an ``nn.Sequential``) applies first."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return module


class QuadraticModelSteps:
    """Martens & Grosse's use of the exact-Fisher model, for any :class:`~fso_lib.optim.base.LayerwiseOptimizer`
    whose update is formed from the captured layer inputs and pre-activation gradients (K-FAC, ACP, the implicit
    natural neural network). Mixed in before the base class; the subclass calls :meth:`_init_quadratic_model`
    at the end of its constructor.

    * ``step_rule="quadratic_model"`` (their §7): the step is ``δ = α Δ + μ δ₀`` with ``Δ = −P⁻¹∇`` the optimizer's
      own preconditioned direction, ``δ₀`` the previous step, ``(α, μ)`` the minimizer of
      ``M(δ) − M(0) = ½ δᵀ(F + εI)δ + ∇ᵀδ`` on the current minibatch (a 2×2 system solved on the device; the first
      step, or one after ``δ₀`` was lost: ``μ = 0`` and ``α`` the line minimizer). ``lr`` and ``momentum`` are
      then ignored. ``ε`` is each parameter group's ``damping`` (for ACP and the natural neural network, the same
      Tikhonov ε that their blocks carry).
    * ``damping_adaptation=True`` (their §6.5, Levenberg–Marquardt): every ``damping_adaptation_period`` (T₁)
      updates, the reduction ratio ``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))`` on that update's minibatch moves ε by
      ``ω₁ = (19/20)^T₁`` (up when ``ρ < 1/4``, down when ``ρ > 3/4``), within ``damping_bounds``. ``M`` is the
      undamped model unless ``damped_rho``. The new ε enters the model at once and the optimizer's own
      preconditioner at its next refresh. :meth:`step` then needs ``minibatch_loss`` (see
      :meth:`fso_lib.optim.KFAC.step`; :func:`fso_lib.training.training_step` passes it).
    * ``quadratic_model_examples``: estimate ``F`` on the first that many examples of the minibatch.
    * ``loss``: the output Fisher ``D`` of the model's predictive distribution (a name of
      :data:`OUTPUT_FISHER_PRODUCTS` or a :class:`fso_lib.losses.Loss`), used only by these options.

    The model needs the network's input, read from the first ``nn.Linear``'s captured input: the model must start
    with that layer. Logged: :attr:`last_rho`, :attr:`last_step_coefficients` (``[α, μ]``, device),
    :attr:`last_model_change` (device). ``state_dict`` keeps ``δ₀``, ``last_rho`` and the adapted damping.
    """

    step_rule = "fixed"
    saved_attributes = ("last_rho",)  # saved by LayerwiseOptimizer.state_dict
    damping_adaptation = False
    last_rho = float("nan")
    last_step_coefficients = None
    last_model_change = None
    kl_clip = None

    def _init_quadratic_model(self, loss="squared_error", step_rule: str = "fixed", damping_adaptation: bool = False,
                              damping_adaptation_period: int = 5, damping_bounds: tuple = (1e-6, 1e4),
                              damped_rho: bool = False, quadratic_model_examples: int | None = None) -> None:
        try:
            self._set_quadratic_model_options(loss, step_rule, damping_adaptation, damping_adaptation_period,
                                              damping_bounds, damped_rho, quadratic_model_examples)
        except ValueError:
            self.remove_hooks()  # a refused configuration leaves the model as it found it
            raise

    def _set_quadratic_model_options(self, loss, step_rule, damping_adaptation, damping_adaptation_period,
                                     damping_bounds, damped_rho, quadratic_model_examples) -> None:
        name = type(self).__name__
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
        if int(damping_adaptation_period) < 1:
            raise ValueError("damping_adaptation_period must be at least 1")
        low, high = (float(b) for b in damping_bounds)
        if not 0 < low <= high:
            raise ValueError(f"damping_bounds must be (low, high) with 0 < low <= high, got {damping_bounds}")
        if quadratic_model_examples is not None and int(quadratic_model_examples) < 1:
            raise ValueError(f"quadratic_model_examples must be a positive number of examples or None, got {quadratic_model_examples}")
        self.step_rule = step_rule
        self.damping_adaptation = bool(damping_adaptation)
        self.damping_adaptation_period = int(damping_adaptation_period)
        self.damping_bounds = (low, high)
        self.damped_rho = bool(damped_rho)
        self.quadratic_model_examples = None if quadratic_model_examples is None else int(quadratic_model_examples)
        self.fisher_loss = loss
        names = {p: n for n, p in self.model.named_parameters()}
        self._parameter_names = [[names[p] for p in group["params"]] for group in self.param_groups]
        if not self.uses_quadratic_model:
            return
        try:
            output_fisher_product(loss)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: damping_adaptation and step_rule='quadratic_model' need the exact Fisher: {exc}") from None
        if not (self.capture_inputs and self.capture_grads):
            raise ValueError(f"{name}: damping_adaptation and step_rule='quadratic_model' need the captured layer inputs "
                             "and gradients (for the natural neural network: whitened_layers=False).")
        if _first_leaf(self.model) is not self.layers[0]:
            raise ValueError(
                f"{name}: damping_adaptation and step_rule='quadratic_model' read the network input from the first "
                "nn.Linear's captured input: the model must start with that layer (e.g. an nn.Sequential whose "
                "first module is the first nn.Linear)."
            )

    @property
    def uses_quadratic_model(self) -> bool:
        return self.damping_adaptation or self.step_rule == "quadratic_model"

    @property
    def damping(self) -> float:
        """The current damping ε of the first parameter group (adapted when ``damping_adaptation``)."""
        return self.param_groups[0]["damping"]

    @property
    def wants_minibatch_loss(self) -> bool:
        """True when :meth:`step` needs ``minibatch_loss`` (damping adaptation measures ``L(θ+δ)``)."""
        return self.damping_adaptation

    def _not_compilable(self):
        if self.step_rule == "quadratic_model":
            return ("the quadratic-model step rule differentiates the network (forward-mode products) inside the step; "
                    "compile the fixed rule only")
        return super()._not_compilable()

    @contextlib.contextmanager
    def _hooks_off(self):
        enabled = self.capture.enabled
        self.capture.enabled = False
        try:
            yield
        finally:
            self.capture.enabled = enabled

    def _evaluate_loss(self, minibatch_loss) -> torch.Tensor:
        with self._hooks_off(), torch.no_grad():
            value = minibatch_loss()
        return torch.as_tensor(value).detach().reshape(())

    def _current_quadratic_model(self, parameters=None) -> MinibatchQuadraticModel:
        """The model ``M`` on the minibatch of this update (captured inputs and gradients), at the current θ."""
        gradient = {}
        for k, (group, (name_w, name_b)) in enumerate(zip(self.param_groups, self._parameter_names)):
            h, g = self._captured(k)
            gradient[name_w] = self._weight_gradient(group, h, g)
            gradient[name_b] = g.sum(0)
        inputs = self._captured(0)[0]
        if self.quadratic_model_examples is not None:
            inputs = inputs[:self.quadratic_model_examples]
        return MinibatchQuadraticModel(self.model, inputs, gradient, self.fisher_loss, parameters=parameters)

    def _damping_weights(self) -> dict[str, float]:
        return {name: group["damping"] for group, names in zip(self.param_groups, self._parameter_names) for name in names}

    def _scale_updates(self, updates):
        if self.step_rule == "quadratic_model":
            return self._quadratic_model_updates(updates)
        return super()._scale_updates(updates)

    def _quadratic_model_updates(self, updates):
        """``δ = α Δ + μ δ₀`` with ``(α, μ)`` minimizing the exact-Fisher model (Martens & Grosse §7), on the device.

        The model is minimized over the coefficients of the layer directions ``d = −Δ`` as returned (no negated
        copy), so the coefficient found for ``d`` is ``−α``. With ``kl_clip`` (K-FAC) the step is then scaled so
        that ``δᵀFδ ≤ kl_clip``."""
        direction, previous = {}, {}
        for group, names, pair in zip(self.param_groups, self._parameter_names, updates):
            for p, name, layer_direction in zip(group["params"], names, pair):
                direction[name] = as_dense(layer_direction)  # the JVPs and δ₀ need it formed
                if "previous_update" in self.state[p]:
                    previous[name] = self.state[p]["previous_update"]
        directions = [direction] + ([previous] if len(previous) == len(direction) else [])
        model = self._current_quadratic_model()
        with self._hooks_off():
            fisher_gram, euclidean_gram, gradient_dots = model.gram_matrices(directions, self._damping_weights())
        coefficients = minimizing_coefficients(fisher_gram, euclidean_gram, gradient_dots, damping=1.0)
        if self.kl_clip is not None:
            fisher_norm = coefficients @ fisher_gram @ coefficients
            clip = torch.where(fisher_norm > self.kl_clip, (self.kl_clip / fisher_norm).sqrt(), torch.ones_like(fisher_norm))
            coefficients = coefficients * clip
        self.last_model_change = model_change(coefficients, fisher_gram, euclidean_gram, gradient_dots,
                                              damping=1.0 if self.damped_rho else 0.0)
        mu = coefficients[1] if len(directions) == 2 else torch.zeros_like(coefficients[0])
        self.last_step_coefficients = torch.stack([-coefficients[0], mu])  # [α, μ] of δ = αΔ + μδ₀
        steps = []
        for names in self._parameter_names:
            pair = []
            for name in names:
                delta = direction[name] * coefficients[0]
                if len(directions) == 2:
                    delta = torch.addcmul(delta, previous[name], coefficients[1])
                pair.append(delta)
            steps.append(tuple(pair))
        return steps

    def _apply(self, group, pair, skip):
        if self.step_rule != "quadratic_model":
            return super()._apply(group, pair, skip)
        # the quadratic-model rule: ``pair`` holds δ itself; remember it as the next update's δ₀
        for p, delta in zip(group["params"], pair):
            state = self.state[p]
            if skip is not None:
                delta.masked_fill_(skip, 0.0)
            p.add_(delta)
            if skip is None or "previous_update" not in state:
                state["previous_update"] = delta
            else:
                state["previous_update"] = torch.where(skip, state["previous_update"], delta)

    def _forget_previous_step(self) -> None:
        """Drop ``δ₀`` (after a change of coordinates, where the old step no longer means the same)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop("previous_update", None)

    @torch.no_grad()
    def step(self, closure=None, minibatch_loss=None, loss=None):
        """One update. ``closure``: torch's (zero the gradients, forward, backward, return the loss).
        ``minibatch_loss`` (a function returning this update's minibatch loss at the current parameters, forward
        only) and ``loss`` (``L(θ)`` of the training forward pass): needed with ``damping_adaptation`` only."""
        if not self.uses_quadratic_model:
            return super().step(closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measure = self.damping_adaptation and (self.n_updates + 1) % self.damping_adaptation_period == 0
        loss_before = before = model = None
        if measure:
            if minibatch_loss is None:
                raise ValueError(
                    f"{type(self).__name__}(damping_adaptation=True) measures the loss after its update: call "
                    "opt.step(minibatch_loss=lambda: loss_fn(model(x), y), loss=loss) (fso_lib.training.training_step does)."
                )
            loss_before = self._evaluate_loss(minibatch_loss) if loss is None else torch.as_tensor(loss).detach().reshape(())
            if self.step_rule == "fixed":
                before = {name: p.detach().clone() for group, names in zip(self.param_groups, self._parameter_names)
                          for p, name in zip(group["params"], names)}
                model = self._current_quadratic_model(parameters=before)
        result = super().step(None if loss is None else (lambda: loss))
        if measure:
            self._adapt_damping(minibatch_loss, loss_before, before, model)
        return result

    def _adapt_damping(self, minibatch_loss, loss_before, before, model) -> None:
        """Levenberg–Marquardt (Martens & Grosse §6.5): ρ on this update's minibatch, then ε scaled by ω₁^±1."""
        if bool(self._diverged):  # the update was skipped as non-finite: nothing was measured
            self.last_rho = float("nan")
            return
        if self.step_rule == "fixed":
            delta = {name: p.detach() - before[name] for group, names in zip(self.param_groups, self._parameter_names)
                     for p, name in zip(group["params"], names)}
            with self._hooks_off():
                fisher_gram, euclidean_gram, gradient_dots = model.gram_matrices([delta], self._damping_weights())
            one = torch.ones(1, dtype=fisher_gram.dtype, device=fisher_gram.device)
            self.last_model_change = model_change(one, fisher_gram, euclidean_gram, gradient_dots,
                                                  damping=1.0 if self.damped_rho else 0.0)
        loss_after = self._evaluate_loss(minibatch_loss)
        predicted = self.last_model_change.to(loss_after.dtype)
        rho, predicted_value = torch.stack([reduction_ratio(loss_before.to(loss_after.dtype), loss_after, predicted),
                                            predicted]).tolist()  # the one host read of the measurement
        self.last_rho = rho
        for group in self.param_groups:
            group["damping"] = levenberg_marquardt_damping(group["damping"], rho, self.damping_adaptation_period,
                                                           self.damping_bounds, predicted_decrease=predicted_value < 0)

