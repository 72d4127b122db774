"""Loss functions that know their own derivatives (thesis §1.2.1, §3.1.4, §3.2.3, appendices A and B).

Each loss ``l(f, y)`` is a small object with

* ``per_example(output, target)``: ``l(f(x_i), y_i)`` for each row, shape ``(n,)``;
* ``value(output, target)``: the empirical risk, the mean of ``per_example`` over the ``n`` rows;
* ``output_gradient(output, target)``: ``∂l/∂f`` of each example (not divided by ``n``), shape ``(n, k)``;
* ``output_hessian(output, target)``: ``∂²l/∂f²`` of each example, shape ``(n, k, k)`` (thesis Table 3.I);
* ``fisher_output_matrix(output)``: the matrix ``D`` of the Fisher ``Jᵀ D J`` (thesis Table 3.II), ``(n, k, k)``;
* ``sample_target(output, generator)``: a target drawn from the model's predictive distribution ``p(y|x)``.

Every loss here is a negative log-likelihood, ``l(f, y) = -log p(y | f) + const``; that is what lets
``fisher_output_matrix`` be computed in closed form (appendix B) and ``sample_target`` exist.

Conventions
-----------
* ``output`` has shape ``(n, k)``: ``n`` examples, ``k`` outputs; a 1-D output is read as ``(n, 1)``.
* Sums run over the ``k`` outputs of one example, means over the ``n`` examples.
* :class:`SquaredError` is ``scale · ‖f − y‖²``. The thesis (§1.2.1, appendix A.1) uses ``scale = 1``,
  whose output Hessian is ``2 I``; the ``I`` of Tables 3.I and 3.II is the one of ``scale = 1/2``.
  It is the negative log-likelihood of a Gaussian ``N(f, σ² I)`` with ``σ² = 1 / (2 · scale)``, so its
  Fisher matrix ``D = I / σ² = 2 · scale · I`` always equals its output Hessian.
* Probability forms (:class:`BinaryCrossEntropy`, :class:`CrossEntropy`) take the network's probabilities
  (after a sigmoid / softmax layer), as the thesis does. The logits forms fold the sigmoid / softmax into
  the loss: ``BinaryCrossEntropyWithLogits()(z, y) == BinaryCrossEntropy()(sigmoid(z), y)`` and
  ``CrossEntropyWithLogits()(z, y) == CrossEntropy()(softmax(z), y)``; they are numerically sound for
  large logits and their output Hessian equals their Fisher ``D`` (*canonical* link, thesis §3.3.2).
* Targets must match the output: ``(n, k)`` like the output (a 1-D ``(n,)`` target only when ``k = 1``).
  Class targets of the multiclass losses are either integer labels of shape ``(n,)`` or float
  probability rows ``(n, k)`` (one-hot or soft). Any other shape (``(1, k)``, float ``(n,)``, integer
  ``(n, 1)``, a different number of rows) raises ``ValueError`` naming the expected shape: broadcasting
  would otherwise give a silently wrong value and curvature.
* The probability forms check that the output is a probability (:class:`BinaryCrossEntropy`: every
  entry in ``(0, 1)``; :class:`CrossEntropy`: entries in ``(0, 1]``, rows summing to 1, the tolerance
  ``10·sqrt(eps)`` of the dtype) and raise ``ValueError`` otherwise: their formulas mean nothing
  outside, and the Fisher of a negative "probability" has negative eigenvalues. The check is skipped
  inside ``torch.func`` transforms (where it cannot run); :mod:`fso_lib.curvature` runs it before.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

__all__ = [
    "Loss",
    "SquaredError",
    "BinaryCrossEntropy",
    "CrossEntropy",
    "BinaryCrossEntropyWithLogits",
    "CrossEntropyWithLogits",
    "LOSSES",
    "get_loss",
]


def _as_matrix(output: torch.Tensor) -> torch.Tensor:
    if output.dim() == 1:
        return output.unsqueeze(1)
    if output.dim() != 2:
        raise ValueError(f"Expected an output of shape (n, k), got {tuple(output.shape)}.")
    return output


def _diag(values: torch.Tensor) -> torch.Tensor:
    """A batch of diagonal matrices ``(n, k, k)`` from rows ``(n, k)``."""
    return torch.diag_embed(values)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _matching_target(target: torch.Tensor, output: torch.Tensor, loss_name: str) -> torch.Tensor:
    """The target as a float ``(n, k)`` matrix of the output's shape; any other shape is refused."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{loss_name}: the target must be a tensor, got {type(target).__name__}.")
    n, k = output.shape
    if target.dim() == 1 and k == 1:
        target = target.unsqueeze(1)
    if tuple(target.shape) != (n, k):
        hint = ""
        if target.dim() == 1:
            hint = " A 1-D target is read as a column only when the output has one column (k = 1)."
        elif target.dim() == 2 and target.shape[0] != n:
            hint = f" The target has {target.shape[0]} rows for {n} outputs: one target row per example."
        raise ValueError(f"{loss_name}: expected a target of shape (n, k) = ({n}, {k}), the output's shape; "
                         f"got {_shape(target)}.{hint}")
    return target.to(output.dtype)


def _class_targets(target: torch.Tensor, output: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Integer labels ``(n,)`` become one-hot rows; float probability rows ``(n, k)`` pass through.

    Everything else is refused: float labels ``(n,)`` or integer ``(n, 1)`` columns would broadcast.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{loss_name}: the target must be a tensor, got {type(target).__name__}.")
    n, k = output.shape
    if not torch.is_floating_point(target):
        if target.dtype == torch.bool or target.dim() != 1 or target.shape[0] != n:
            raise ValueError(
                f"{loss_name}: integer class labels must have shape (n,) = ({n},); got {target.dtype} "
                f"{_shape(target)}. Probability (one-hot or soft) rows must be a float tensor of shape ({n}, {k})."
            )
        return F.one_hot(target.long(), k).to(output.dtype)
    if tuple(target.shape) != (n, k):
        raise ValueError(
            f"{loss_name}: a float target must hold probability rows of shape (n, k) = ({n}, {k}); got "
            f"{_shape(target)}. Class labels must be an integer tensor of shape ({n},)."
        )
    return target.to(output.dtype)


def _vectors(vectors: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """One vector per example, ``(n, k)`` like the output (a product never broadcasts one row to all)."""
    vectors, shape = _as_matrix(vectors), tuple(_as_matrix(output).shape)
    if tuple(vectors.shape) != shape:
        raise ValueError(f"Expected one vector per example, of shape (n, k) = {shape}; got {tuple(vectors.shape)}.")
    return vectors


def _inside_transform(t: torch.Tensor) -> bool:
    """True inside ``torch.func`` transforms, where data-dependent checks cannot run."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _check_probabilities(output: torch.Tensor, loss_name: str, simplex: bool) -> torch.Tensor:
    """Refuse outputs that are not probabilities (one host synchronization; skipped inside ``torch.func``).

    Binary outputs must lie in the open interval ``(0, 1)``; class probabilities in ``(0, 1]`` with rows
    summing to 1 (a saturated softmax row may hold an exact 1).
    """
    if _inside_transform(output):
        return output
    values = output.detach()
    inside = (values > 0) & ((values <= 1) if simplex else (values < 1))
    if not bool(inside.all()):
        if not bool(torch.isfinite(values).all()):
            found = "non-finite values"
        else:
            found = f"values in [{float(values.min()):.4g}, {float(values.max()):.4g}]"
        interval, logits = ("(0, 1]", "CrossEntropyWithLogits") if simplex else ("(0, 1)", "BinaryCrossEntropyWithLogits")
        raise ValueError(f"{loss_name} takes probabilities, every output in {interval}; got {found}. "
                         f"For logits (before the {'softmax' if simplex else 'sigmoid'}) use {logits}.")
    if simplex:
        tolerance = 10 * torch.finfo(values.dtype).eps ** 0.5
        worst = float((values.sum(dim=1) - 1).abs().max())
        if worst > tolerance:
            raise ValueError(f"{loss_name} takes rows of class probabilities (after a softmax) that sum to 1; a row "
                             f"is off by {worst:.3g}. For logits use CrossEntropyWithLogits.")
    return output


class Loss(ABC):
    """Base class: a per-example negative log-likelihood ``l(f, y)`` of the network output ``f``."""

    #: A short name used in figure legends and widget menus.
    name = "loss"
    #: True when ``∂²l/∂f² == D`` for every target, so that Gauss-Newton equals the Fisher (thesis §3.3.2).
    canonical = False

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.value(output, target)

    def value(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The empirical risk ``(1/n) Σ_i l(f_i, y_i)`` (thesis §1.2)."""
        return self.per_example(output, target).mean()

    @abstractmethod
    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Implemented by each loss."""

    @abstractmethod
    def output_gradient(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Implemented by each loss."""

    @abstractmethod
    def output_hessian(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Implemented by each loss."""

    @abstractmethod
    def fisher_output_matrix(self, output: torch.Tensor) -> torch.Tensor:
        """Implemented by each loss."""

    @abstractmethod
    def sample_target(self, output: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Implemented by each loss."""

    def output_hessian_product(self, output: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``(∂²l/∂f²)_i v_i`` for each row ``v_i`` of ``vectors`` ``(n, k)``, without the ``(n, k, k)`` tensor."""
        return torch.einsum("nkl,nl->nk", self.output_hessian(output, target), _vectors(vectors, output))

    def fisher_output_product(self, output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``D_i v_i`` for each row ``v_i`` of ``vectors`` ``(n, k)``, without the ``(n, k, k)`` tensor."""
        return torch.einsum("nkl,nl->nk", self.fisher_output_matrix(output), _vectors(vectors, output))

    def target_matrix(self, target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The target as a float ``(n, k)`` matrix matching ``output`` (``ValueError`` for any other shape)."""
        return _matching_target(target, _as_matrix(output), type(self).__name__)

    def check_output(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` as an ``(n, k)`` matrix, after checking it lies where the loss is defined."""
        return _as_matrix(output)

    def check(self, output: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` if ``output`` (and ``target``, if given) are not valid for this loss."""
        output = self.check_output(output)
        if target is not None:
            self.target_matrix(target, output)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquaredError(Loss):
    """``l(f, y) = scale · ‖f − y‖²`` (thesis §1.2.1 and appendix A.1 use ``scale = 1``).

    Gradient ``2 · scale · (f − y)``; output Hessian ``2 · scale · I`` (Table 3.I writes ``I``: that is
    ``scale = 1/2``). Gaussian likelihood ``N(f, σ² I)`` with ``σ² = 1/(2 · scale)`` (appendix B.1), hence
    ``D = I/σ² = 2 · scale · I`` and Gauss-Newton == Fisher.
    """

    name = "squared error"
    canonical = True

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        self.scale = float(scale)

    @property
    def variance(self) -> float:
        """``σ²`` of the Gaussian whose negative log-likelihood this loss is (up to a constant)."""
        return 1.0 / (2.0 * self.scale)

    def per_example(self, output, target):
        output = _as_matrix(output)
        return self.scale * ((output - self.target_matrix(target, output)) ** 2).sum(dim=1)

    def output_gradient(self, output, target):
        output = _as_matrix(output)
        return 2.0 * self.scale * (output - self.target_matrix(target, output))

    def output_hessian(self, output, target):
        output = _as_matrix(output)
        self.target_matrix(target, output)  # the Hessian does not depend on y, but a wrong y is still refused
        return self.fisher_output_matrix(output)

    def fisher_output_matrix(self, output):
        output = _as_matrix(output)
        n, k = output.shape
        eye = torch.eye(k, dtype=output.dtype, device=output.device)
        return (2.0 * self.scale * eye).expand(n, k, k).clone()

    def output_hessian_product(self, output, target, vectors):
        self.target_matrix(target, _as_matrix(output))
        return 2.0 * self.scale * _vectors(vectors, output)

    def fisher_output_product(self, output, vectors):
        return 2.0 * self.scale * _vectors(vectors, output)

    def sample_target(self, output, generator=None):
        output = _as_matrix(output).detach()
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return output + self.variance ** 0.5 * noise

    def __repr__(self):
        return f"SquaredError(scale={self.scale:g})"


class BinaryCrossEntropy(Loss):
    """``l(f, y) = −Σ_j [y_j log f_j + (1 − y_j) log(1 − f_j)]`` on probabilities ``f ∈ (0, 1)^k``.

    Appendix A.2: gradient ``−(y/f − (1−y)/(1−f))``, Hessian ``diag(y/f² + (1−y)/(1−f)²)`` (Table 3.I).
    Appendix B.2: ``k`` independent Bernoulli outputs, ``D = diag(1/(f(1−f)))`` (Table 3.II).
    """

    name = "binary cross-entropy"

    def check_output(self, output):
        """Probabilities only: every entry in ``(0, 1)`` (``ValueError`` otherwise)."""
        return _check_probabilities(_as_matrix(output), type(self).__name__, simplex=False)

    def per_example(self, output, target):
        output = self.check_output(output)
        y = self.target_matrix(target, output)
        return -(y * torch.log(output) + (1 - y) * torch.log1p(-output)).sum(dim=1)

    def output_gradient(self, output, target):
        output = self.check_output(output)
        y = self.target_matrix(target, output)
        return -(y / output - (1 - y) / (1 - output))

    def output_hessian(self, output, target):
        output = self.check_output(output)
        y = self.target_matrix(target, output)
        return _diag(y / output ** 2 + (1 - y) / (1 - output) ** 2)

    def fisher_output_matrix(self, output):
        output = self.check_output(output)
        return _diag(1.0 / (output * (1 - output)))

    def output_hessian_product(self, output, target, vectors):
        output = self.check_output(output)
        y = self.target_matrix(target, output)
        return (y / output ** 2 + (1 - y) / (1 - output) ** 2) * _vectors(vectors, output)

    def fisher_output_product(self, output, vectors):
        output = self.check_output(output)
        return _vectors(vectors, output) / (output * (1 - output))

    def sample_target(self, output, generator=None):
        output = self.check_output(output).detach()
        return torch.bernoulli(output, generator=generator)


class CrossEntropy(Loss):
    """``l(f, y) = −yᵀ log f`` on class probabilities ``f`` (rows on the simplex, after a softmax).

    Appendix A.3: gradient ``−y/f``, Hessian ``diag(y/f²)`` (Table 3.I).
    Appendix B.3: categorical likelihood, ``D = diag(1/f)`` (Table 3.II).
    """

    name = "cross-entropy"

    def check_output(self, output):
        """Class probabilities only: entries in ``(0, 1]``, rows summing to 1 (``ValueError`` otherwise)."""
        return _check_probabilities(_as_matrix(output), type(self).__name__, simplex=True)

    def target_matrix(self, target, output):
        """Integer labels ``(n,)`` as one-hot rows, or float probability rows ``(n, k)``."""
        return _class_targets(target, _as_matrix(output), type(self).__name__)

    def per_example(self, output, target):
        output = self.check_output(output)
        return -(self.target_matrix(target, output) * torch.log(output)).sum(dim=1)

    def output_gradient(self, output, target):
        output = self.check_output(output)
        return -self.target_matrix(target, output) / output

    def output_hessian(self, output, target):
        output = self.check_output(output)
        return _diag(self.target_matrix(target, output) / output ** 2)

    def fisher_output_matrix(self, output):
        output = self.check_output(output)
        return _diag(1.0 / output)

    def output_hessian_product(self, output, target, vectors):
        output = self.check_output(output)
        return self.target_matrix(target, output) / output ** 2 * _vectors(vectors, output)

    def fisher_output_product(self, output, vectors):
        return _vectors(vectors, output) / self.check_output(output)

    def sample_target(self, output, generator=None):
        """A one-hot row per example, the class drawn from ``Categorical(f)``."""
        output = self.check_output(output).detach()
        labels = torch.multinomial(output, 1, generator=generator).squeeze(1)
        return F.one_hot(labels, output.shape[1]).to(output.dtype)


class BinaryCrossEntropyWithLogits(Loss):
    """Binary cross-entropy of ``sigmoid(z)`` written on the logits ``z``: ``Σ_j softplus(z_j) − y_j z_j``.

    Gradient ``σ(z) − y``; Hessian ``diag(σ(z)(1 − σ(z)))``, which does not depend on ``y`` and equals
    the Fisher ``D`` in logit coordinates (canonical link).
    """

    name = "binary cross-entropy (logits)"
    canonical = True

    def per_example(self, output, target):
        output = _as_matrix(output)
        y = self.target_matrix(target, output)
        return (F.softplus(output) - y * output).sum(dim=1)

    def output_gradient(self, output, target):
        output = _as_matrix(output)
        return torch.sigmoid(output) - self.target_matrix(target, output)

    def output_hessian(self, output, target):
        self.target_matrix(target, _as_matrix(output))  # the Hessian does not depend on y; a wrong y is refused
        return self.fisher_output_matrix(output)

    def fisher_output_matrix(self, output):
        p = torch.sigmoid(_as_matrix(output))
        return _diag(p * (1 - p))

    def output_hessian_product(self, output, target, vectors):
        self.target_matrix(target, _as_matrix(output))
        return self.fisher_output_product(output, vectors)

    def fisher_output_product(self, output, vectors):
        p = torch.sigmoid(_as_matrix(output))
        return p * (1 - p) * _vectors(vectors, output)

    def sample_target(self, output, generator=None):
        return torch.bernoulli(torch.sigmoid(_as_matrix(output).detach()), generator=generator)


class CrossEntropyWithLogits(Loss):
    """Multiclass cross-entropy of ``softmax(z)`` written on the logits: ``(Σ_j y_j) logsumexp(z) − yᵀ z``.

    Gradient ``(Σ_j y_j) p − y`` with ``p = softmax(z)`` (``p − y`` for a target on the simplex);
    Hessian ``(Σ_j y_j)(diag(p) − p pᵀ)``; Fisher ``D = diag(p) − p pᵀ`` (canonical link).
    """

    name = "cross-entropy (logits)"
    canonical = True

    def target_matrix(self, target, output):
        """Integer labels ``(n,)`` as one-hot rows, or float probability rows ``(n, k)``."""
        return _class_targets(target, _as_matrix(output), type(self).__name__)

    def per_example(self, output, target):
        output = _as_matrix(output)
        y = self.target_matrix(target, output)
        return y.sum(dim=1) * torch.logsumexp(output, dim=1) - (y * output).sum(dim=1)

    def output_gradient(self, output, target):
        output = _as_matrix(output)
        y = self.target_matrix(target, output)
        return y.sum(dim=1, keepdim=True) * torch.softmax(output, dim=1) - y

    def output_hessian(self, output, target):
        output = _as_matrix(output)
        mass = self.target_matrix(target, output).sum(dim=1)
        return mass[:, None, None] * self.fisher_output_matrix(output)

    def fisher_output_matrix(self, output):
        p = torch.softmax(_as_matrix(output), dim=1)
        return _diag(p) - p.unsqueeze(2) * p.unsqueeze(1)

    def output_hessian_product(self, output, target, vectors):
        output = _as_matrix(output)
        mass = self.target_matrix(target, output).sum(dim=1, keepdim=True)
        return mass * self.fisher_output_product(output, vectors)

    def fisher_output_product(self, output, vectors):
        p = torch.softmax(_as_matrix(output), dim=1)
        v = _vectors(vectors, output)
        return p * v - p * (p * v).sum(dim=1, keepdim=True)

    def sample_target(self, output, generator=None):
        """A one-hot row per example, the class drawn from ``Categorical(softmax(z))``."""
        p = torch.softmax(_as_matrix(output).detach(), dim=1)  # may hold exact zeros for extreme logits
        labels = torch.multinomial(p, 1, generator=generator).squeeze(1)
        return F.one_hot(labels, p.shape[1]).to(p.dtype)


#: The losses of the book by short name (widget menus).
LOSSES = {
    "squared_error": SquaredError,
    "binary_cross_entropy": BinaryCrossEntropy,
    "cross_entropy": CrossEntropy,
    "binary_cross_entropy_with_logits": BinaryCrossEntropyWithLogits,
    "cross_entropy_with_logits": CrossEntropyWithLogits,
}


def get_loss(name: str, **kwargs) -> Loss:
    """A loss object from its short name (a key of :data:`LOSSES`)."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
    return LOSSES[name](**kwargs)
