"""Exact curvature matrices of small networks, and their matrix-free products (thesis chapter 3).

For a network ``f(x, θ)`` and a loss ``l`` from :mod:`fso_lib.losses`, with ``J_i = ∂f(x_i, θ)/∂θ``:

=========================  ===========================================================  ===========
function                   matrix                                                       thesis
=========================  ===========================================================  ===========
:func:`hessian`            ``H = ∂²R/∂θ²``, ``R = (1/n) Σ_i l(f(x_i, θ), y_i)``          §3.1.4
:func:`gauss_newton`       ``G = (1/n) Σ_i J_iᵀ (∂²l/∂f²)_i J_i``                         §3.1.4
:func:`fisher`             ``F = (1/n) Σ_i J_iᵀ D(f(x_i)) J_i`` (true Fisher, ``y ~ p_θ``)   §3.2.3, B
:func:`empirical_fisher`   ``(1/n) Σ_i g_i g_iᵀ``, ``g_i = ∂l(f(x_i), y_i)/∂θ``             §3.2.4
:func:`residual`           ``H − G = (1/n) Σ_i Σ_j (∂l/∂f_j)_i ∇²_θ f_j(x_i)``               §3.1.4
=========================  ===========================================================  ===========

:func:`monte_carlo_fisher` estimates ``F`` by drawing targets from the model, the definition that the
closed form of :func:`fisher` replaces. :func:`block_diagonal` keeps the per-layer blocks (§3.1.5, §3.2.4).
:func:`hessian_vector_product`, :func:`gauss_newton_vector_product` and :func:`fisher_vector_product`
never form a matrix, for networks too large for the dense versions.

The output-space view of Gauss-Newton (§3.3.3): :func:`linearized_outputs` is the network replaced by its
first-order Taylor expansion ``f_i + J_i Δ``; :func:`linearized_risk` is the risk of that linear model, whose
Hessian in ``Δ`` at ``Δ = 0`` is ``G``; :func:`output_space_model` is its second-order expansion in the
outputs, ``(1/n) Σ_i l_i + (∂l/∂f)_i u_i + ½ u_iᵀ (∂²l/∂f²)_i u_i`` with ``u_i = J_i Δ``, equal to the
Gauss-Newton quadratic model ``R + ∇Rᵀ Δ + ½ Δᵀ G Δ``.

Supported models: an ``nn.Sequential`` (possibly nested) of ``nn.Linear`` layers and element-wise
activations (plus a final ``nn.Softmax`` for :class:`~fso_lib.losses.CrossEntropy`). Anything else raises
:class:`UnsupportedLayerError` naming the layer. Everything is computed with ``torch.func`` in the model's
dtype: use float64 when comparing matrices.

Parameter layout
----------------
Rows and columns follow ``model.named_parameters()`` (for ``mlp``: ``0.weight, 0.bias, 2.weight, ...``),
each tensor flattened row-major. A weight ``W`` of shape ``(out, in)`` therefore appears as ``vec(Wᵀ)``
in the column-stacking ``vec`` of the thesis (rows of ``W`` one after the other: entry ``W[o, i]`` sits at
offset ``o · in + i``). :class:`ParameterLayout` says which rows belong to which tensor and layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp

from .errors import UnsupportedLayerError
from .losses import Loss

__all__ = [
    "UnsupportedLayerError",
    "UnsupportedLossError",
    "SUPPORTED_ACTIVATIONS",
    "ParameterBlock",
    "ParameterLayout",
    "parameter_layout",
    "flat_parameters",
    "set_flat_parameters",
    "flat_gradient",
    "output_jacobian",
    "per_example_gradients",
    "hessian",
    "gauss_newton",
    "fisher",
    "monte_carlo_fisher",
    "empirical_fisher",
    "residual",
    "CURVATURE_KINDS",
    "curvature_matrix",
    "block_diagonal",
    "diagonal_blocks",
    "hessian_vector_product",
    "gauss_newton_vector_product",
    "fisher_vector_product",
    "linearized_outputs",
    "linearized_risk",
    "output_space_model",
]


class UnsupportedLossError(TypeError):
    """A loss is not one of :mod:`fso_lib.losses` (it must know its output Hessian and Fisher)."""


#: Element-wise activations (plus ``nn.Softmax``, applied per example) accepted between linear layers.
SUPPORTED_ACTIVATIONS = (
    nn.Identity, nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.ELU, nn.GELU, nn.SiLU, nn.Softmax,
)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(
            f"Exact curvature needs an nn.Sequential of nn.Linear layers and element-wise activations; "
            f"got a {type(model).__name__}."
        )

    def walk(module: nn.Sequential, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                walk(child, full + ".")
            elif isinstance(child, SUPPORTED_ACTIVATIONS):
                if isinstance(child, nn.Softmax) and child.dim not in (1, -1):
                    raise UnsupportedLayerError(
                        f"Layer '{full}' (Softmax(dim={child.dim})) mixes examples: use dim=-1 or dim=1."
                    )
            elif not isinstance(child, nn.Linear):
                raise UnsupportedLayerError(
                    f"Layer '{full}' ({type(child).__name__}) is not supported by the exact curvature code: "
                    f"use nn.Linear layers and element-wise activations "
                    f"({', '.join(c.__name__ for c in SUPPORTED_ACTIVATIONS)})."
                )

    walk(model, "")


def _check_loss(loss) -> None:
    if not isinstance(loss, Loss):
        raise UnsupportedLossError(
            f"{type(loss).__name__} is not a loss of fso_lib.losses: the curvature code needs its output "
            f"Hessian and Fisher matrix. Use SquaredError, BinaryCrossEntropy, CrossEntropy, "
            f"BinaryCrossEntropyWithLogits or CrossEntropyWithLogits."
        )


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} contains non-finite values (NaN or inf): every curvature matrix computed from "
                         f"it would be NaN. Check the minibatch (and the parameters) before computing curvature.")


def _check_inputs(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Clear errors before any differentiation: non-finite data or parameters, a target of the wrong
    shape, outputs outside the loss's domain (a probability loss given logits)."""
    _check_loss(loss)
    _check_finite(x, "The input x")
    if y is not None:
        _check_finite(y, "The target y")
    named = list(model.named_parameters())
    if named and not bool(torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).all()):  # one read
        for name, parameter in named:
            _check_finite(parameter.detach(), f"The model's parameter {name!r}")
    if x.dim() < 1 or (y is not None and y.dim() >= 1 and y.shape[0] != x.shape[0]):
        raise ValueError(f"x has {x.shape[0]} rows but the target y has shape {tuple(y.shape)}: expected one "
                         f"target row per example, i.e. y of shape ({x.shape[0]}, k) (or ({x.shape[0]},) class labels).")
    with torch.no_grad():
        output = model(x)
    output = output.unsqueeze(1) if output.dim() == 1 else output
    _check_finite(output, "The network's output")
    loss.check(output, y)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ParameterBlock:
    """The rows of one layer (all its parameter tensors) in the flat parameter vector."""

    layer_name: str
    layer_type: str
    parameter_names: tuple[str, ...]
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def size(self) -> int:
        return self.stop - self.start


class ParameterLayout:
    """Where each parameter tensor and each layer lives in the flat vector ``θ`` (module docstring).

    ``names``/``shapes`` follow ``model.named_parameters()``; ``slices[name]`` gives the rows of one tensor,
    ``blocks`` one :class:`ParameterBlock` per layer (the blocks of the block-diagonal approximation).
    """

    def __init__(self, named_shapes: Iterable[tuple[str, torch.Size]], layer_types: Mapping[str, str] | None = None):
        self.names: tuple[str, ...] = ()
        self.shapes: tuple[torch.Size, ...] = ()
        self.slices: dict[str, slice] = {}
        offset = 0
        names, shapes = [], []
        for name, shape in named_shapes:
            size = int(torch.Size(shape).numel())
            names.append(name)
            shapes.append(torch.Size(shape))
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.names, self.shapes, self.size = tuple(names), tuple(shapes), offset
        layer_types = dict(layer_types or {})
        blocks: list[ParameterBlock] = []
        for name in self.names:
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            sl = self.slices[name]
            if blocks and blocks[-1].layer_name == layer and blocks[-1].stop == sl.start:
                last = blocks[-1]
                blocks[-1] = ParameterBlock(layer, last.layer_type, last.parameter_names + (name,), last.start, sl.stop)
            else:
                blocks.append(ParameterBlock(layer, layer_types.get(layer, ""), (name,), sl.start, sl.stop))
        self.blocks: tuple[ParameterBlock, ...] = tuple(blocks)

    def __len__(self) -> int:
        return self.size

    def block_slices(self, by: str = "layer") -> list[slice]:
        """Row ranges of the diagonal blocks: one per layer (``by='layer'``) or per tensor (``'parameter'``)."""
        if by == "layer":
            return [b.slice for b in self.blocks]
        if by == "parameter":
            return [self.slices[n] for n in self.names]
        raise ValueError(f"by must be 'layer' or 'parameter', got {by!r}.")

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> torch.Tensor:
        """One vector from a ``{name: tensor}`` mapping (or a sequence in layout order), row-major."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[name] for name in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of a flat vector (views share memory with ``vector``)."""
        if vector.shape[-1] != self.size:
            raise ValueError(f"Expected a vector of {self.size} entries, got shape {tuple(vector.shape)}.")
        return {name: vector[self.slices[name]].view(shape) for name, shape in zip(self.names, self.shapes)}

    def describe(self) -> str:
        """A small table: tensor, shape, rows, layer."""
        lines = [f"{'tensor':<16}{'shape':<14}{'rows':<14}layer"]
        for name, shape in zip(self.names, self.shapes):
            sl = self.slices[name]
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            lines.append(f"{name:<16}{str(tuple(shape)):<14}{f'{sl.start}:{sl.stop}':<14}{layer}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ParameterLayout({len(self.names)} tensors, {len(self.blocks)} layers, {self.size} parameters)"


def parameter_layout(model: nn.Module) -> ParameterLayout:
    """The :class:`ParameterLayout` of ``model`` (torch parameter order, row-major tensors)."""
    types = {name: type(module).__name__ for name, module in model.named_modules()}
    return ParameterLayout(((n, p.shape) for n, p in model.named_parameters()), types)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """``θ`` as one detached vector in the :func:`parameter_layout` order."""
    return parameter_layout(model).flatten(dict(model.named_parameters())).detach().clone()


@torch.no_grad()
def set_flat_parameters(model: nn.Module, vector: torch.Tensor) -> None:
    """Write a flat vector back into the parameters of ``model``."""
    params = dict(model.named_parameters())
    for name, value in parameter_layout(model).unflatten(vector).items():
        params[name].copy_(value)


# ----------------------------------------------------------------------------- functional core


def _functional(model: nn.Module) -> tuple[ParameterLayout, torch.Tensor, Callable]:
    _check_model(model)
    layout = parameter_layout(model)
    theta = flat_parameters(model)

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, layout.unflatten(flat), (x,))
        return out.unsqueeze(1) if out.dim() == 1 else out

    return layout, theta, forward


def _risk(model, loss, x, y):
    _check_model(model)
    _check_inputs(model, loss, x, y)
    layout, theta, forward = _functional(model)
    return theta, (lambda flat: loss.value(forward(flat, x), y))


def flat_gradient(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇_θ R`` as a flat vector (the gradient of the empirical risk)."""
    theta, risk = _risk(model, loss, x, y)
    return torch.func.grad(risk)(theta)


def output_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J``: the Jacobian of every output of every example w.r.t. ``θ``, shape ``(n, k, P)``."""
    _, theta, forward = _functional(model)
    return jacrev(lambda flat: forward(flat, x))(theta)


def _outputs_and_jacobian(model, x):
    _, theta, forward = _functional(model)
    with torch.no_grad():
        outputs = forward(theta, x)
    return outputs, jacrev(lambda flat: forward(flat, x))(theta)


def per_example_gradients(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g_i = J_iᵀ (∂l/∂f)_i``: the gradient of each example's loss, shape ``(n, P)``."""
    _check_model(model)
    _check_inputs(model, loss, x, y)
    outputs, jac = _outputs_and_jacobian(model, x)
    return torch.einsum("nk,nkp->np", loss.output_gradient(outputs, y), jac)


def _sandwich(jac: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_i J_iᵀ M_i J_i``."""
    return torch.einsum("nkp,nkl,nlq->pq", jac, middle, jac) / jac.shape[0]


# ----------------------------------------------------------------------------- dense matrices


def hessian(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full Hessian ``∂²R/∂θ²`` of the empirical risk, ``(P, P)`` (thesis §3.1.4)."""
    theta, risk = _risk(model, loss, x, y)
    return torch.func.hessian(risk)(theta)


def gauss_newton(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Gauss-Newton matrix ``(1/n) Σ_i J_iᵀ (∂²l/∂f²)_i J_i`` (thesis §3.1.4, Table 3.I).

    It depends on where the network ends and the loss begins: with a probability loss after a
    sigmoid/softmax layer ``J`` is the Jacobian of the probabilities, with a logits loss that of the logits.
    """
    _check_model(model)
    _check_inputs(model, loss, x, y)
    outputs, jac = _outputs_and_jacobian(model, x)
    return _sandwich(jac, loss.output_hessian(outputs, y))


def fisher(model: nn.Module, loss: Loss, x: torch.Tensor) -> torch.Tensor:
    """The Fisher information ``(1/n) Σ_i J_iᵀ D(f(x_i)) J_i`` of ``p_θ(y|x)``, ``y`` drawn from the model.

    The expectation over ``y ~ p_θ(y|x_i)`` is taken in closed form (thesis §3.2.3, Table 3.II, appendix B);
    the one over ``x`` is the average over the rows of ``x``. No target is needed.
    """
    _check_model(model)
    _check_inputs(model, loss, x)
    outputs, jac = _outputs_and_jacobian(model, x)
    return _sandwich(jac, loss.fisher_output_matrix(outputs))


def monte_carlo_fisher(
    model: nn.Module, loss: Loss, x: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(1/(n S)) Σ_i Σ_s g_is g_isᵀ`` with targets ``y_is ~ p_θ(y|x_i)``: the definition of the Fisher (§3.2.1)."""
    _check_model(model)
    _check_inputs(model, loss, x)
    outputs, jac = _outputs_and_jacobian(model, x)
    n, k = outputs.shape
    total = torch.zeros(jac.shape[2], jac.shape[2], dtype=jac.dtype, device=jac.device)
    remaining = int(n_samples)
    while remaining > 0:  # draw the samples in chunks: one (chunk · n, P) matrix of gradients at a time
        chunk = min(remaining, max(1, 2 ** 20 // max(1, n * jac.shape[2])))
        repeated = outputs.repeat(chunk, 1)
        sampled = loss.sample_target(repeated, generator)
        scores = loss.output_gradient(repeated, sampled).view(chunk, n, k)
        grads = torch.einsum("snk,nkp->snp", scores, jac).reshape(chunk * n, -1)
        total += grads.T @ grads
        remaining -= chunk
    return total / (n * int(n_samples))


def empirical_fisher(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The empirical Fisher ``(1/n) Σ_i g_i g_iᵀ`` with the *dataset's* targets (thesis §3.2.4, §3.3.3)."""
    grads = per_example_gradients(model, loss, x, y)
    return grads.T @ grads / grads.shape[0]


def residual(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H − G``: the term of the Hessian that Gauss-Newton drops, ``(1/n) Σ_i Σ_j (∂l/∂f_j)_i ∇²f_j(x_i)``."""
    return hessian(model, loss, x, y) - gauss_newton(model, loss, x, y)


#: Names accepted by :func:`curvature_matrix`.
CURVATURE_KINDS = ("hessian", "gauss_newton", "fisher", "empirical_fisher", "residual")


def curvature_matrix(
    model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor | None = None,
    kind: str = "hessian", structure: str = "full",
) -> torch.Tensor:
    """One switch for every dense curvature matrix: ``kind`` in :data:`CURVATURE_KINDS`,
    ``structure`` ``'full'`` or ``'block_diagonal'`` (per layer, thesis §3.1.5)."""
    if kind == "fisher":
        matrix = fisher(model, loss, x)
    elif kind in CURVATURE_KINDS:
        if y is None:
            raise ValueError(f"kind={kind!r} needs targets y.")
        matrix = {"hessian": hessian, "gauss_newton": gauss_newton, "empirical_fisher": empirical_fisher,
                  "residual": residual}[kind](model, loss, x, y)
    else:
        raise ValueError(f"Unknown kind {kind!r}; choose one of {CURVATURE_KINDS}.")
    if structure == "full":
        return matrix
    if structure == "block_diagonal":
        return block_diagonal(matrix, parameter_layout(model))
    raise ValueError(f"structure must be 'full' or 'block_diagonal', got {structure!r}.")


# ----------------------------------------------------------------------------- block diagonal


def diagonal_blocks(matrix: torch.Tensor, layout: ParameterLayout, by: str = "layer") -> list[torch.Tensor]:
    """The square diagonal blocks of ``matrix``, one per layer (or per tensor with ``by='parameter'``)."""
    if matrix.shape != (layout.size, layout.size):
        raise ValueError(f"Expected a ({layout.size}, {layout.size}) matrix, got {tuple(matrix.shape)}.")
    return [matrix[sl, sl] for sl in layout.block_slices(by)]


def block_diagonal(matrix: torch.Tensor, layout: ParameterLayout, by: str = "layer") -> torch.Tensor:
    """``matrix`` with every entry outside the per-layer diagonal blocks set to zero (thesis §3.1.5, §3.2.4)."""
    out = torch.zeros_like(matrix)
    for sl, block in zip(layout.block_slices(by), diagonal_blocks(matrix, layout, by)):
        out[sl, sl] = block
    return out


# ----------------------------------------------------------------------------- matrix-free products


def _as_flat(vector, layout: ParameterLayout, like: torch.Tensor) -> torch.Tensor:
    if isinstance(vector, Mapping):
        vector = layout.flatten(vector)
    return vector.to(dtype=like.dtype, device=like.device)


def hessian_vector_product(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, vector) -> torch.Tensor:
    """``H v`` without forming ``H`` (forward-over-reverse differentiation; Pearlmutter's trick)."""
    theta, risk = _risk(model, loss, x, y)
    vector = _as_flat(vector, parameter_layout(model), theta)
    return jvp(torch.func.grad(risk), (theta,), (vector,))[1]


def _sandwich_product(model, x, vector, middle_product):
    layout, theta, forward = _functional(model)
    vector = _as_flat(vector, layout, theta)
    outputs, jv = jvp(lambda flat: forward(flat, x), (theta,), (vector,))
    _, pullback = vjp(lambda flat: forward(flat, x), theta)
    return pullback(middle_product(outputs.detach(), jv) / outputs.shape[0])[0]


def gauss_newton_vector_product(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, vector) -> torch.Tensor:
    """``G v = (1/n) Σ_i J_iᵀ (∂²l/∂f²)_i (J_i v)`` without forming ``G`` (Schraudolph 2002)."""
    _check_model(model)
    _check_inputs(model, loss, x, y)
    return _sandwich_product(model, x, vector, lambda f, jv: loss.output_hessian_product(f, y, jv))


def fisher_vector_product(model: nn.Module, loss: Loss, x: torch.Tensor, vector) -> torch.Tensor:
    """``F v = (1/n) Σ_i J_iᵀ D_i (J_i v)`` without forming ``F``."""
    _check_model(model)
    _check_inputs(model, loss, x)
    return _sandwich_product(model, x, vector, lambda f, jv: loss.fisher_output_product(f, jv))


# ----------------------------------------------------------------------------- output-space view (§3.3.3)


def linearized_outputs(model: nn.Module, x: torch.Tensor, delta) -> torch.Tensor:
    """``f(x_i, θ) + J_i Δ`` for every example, shape ``(n, k)``: the network linearized in its parameters
    at the current ``θ`` (thesis §3.3.3). One Jacobian-vector product, never ``J`` itself; differentiable
    with respect to ``delta``."""
    layout, theta, forward = _functional(model)
    delta = _as_flat(delta, layout, theta)
    outputs, change = jvp(lambda flat: forward(flat, x), (theta,), (delta,))
    return outputs + change


def linearized_risk(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, delta) -> torch.Tensor:
    """``R_lin(Δ) = (1/n) Σ_i l(f_i + J_i Δ, y_i)``: the loss of the linearized network (thesis §3.3.3).

    The loss is kept exact, only the network is linearized; its Hessian in ``Δ`` at ``Δ = 0`` is the
    Gauss-Newton matrix. A probability loss raises ``ValueError`` when ``Δ`` pushes a linearized
    probability out of ``(0, 1)``."""
    _check_model(model)
    _check_inputs(model, loss, x, y)
    return loss.value(linearized_outputs(model, x, delta), y)


def output_space_model(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, delta) -> torch.Tensor:
    """``(1/n) Σ_i [l_i + (∂l/∂f)_i u_i + ½ u_iᵀ (∂²l/∂f²)_i u_i]`` with ``u_i = J_i Δ``: the loss expanded
    to second order in the *outputs* around the linearized network's prediction (thesis §3.3.3).

    Its ``Δ``-quadratic form is ``½ Δᵀ G Δ = (1/(2n)) Σ_i ‖(∂²l/∂f²)_i^{1/2} J_i Δ‖²``: the output change
    ``J_i Δ`` measured in the metric of the loss, pulled back to the parameters."""
    _check_model(model)
    _check_inputs(model, loss, x, y)
    layout, theta, forward = _functional(model)
    delta = _as_flat(delta, layout, theta)
    outputs, change = jvp(lambda flat: forward(flat, x), (theta,), (delta,))
    outputs = outputs.detach()
    values = loss.per_example(outputs, y)
    slope = (loss.output_gradient(outputs, y) * change).sum(1)
    curvature = torch.einsum("nk,nkl,nl->n", change, loss.output_hessian(outputs, y), change)
    return (values + slope + 0.5 * curvature).mean()
