"""A layer's weight direction kept as a product of two thin factors, applied without forming it.

With a minibatch of ``n`` examples, the updates of ACP (in its large-batch order), the implicit natural neural
network, centered gradient descent and K-FAC (in its large-batch order) are all of the form
``ΔW = leftᵀ @ right`` with ``left`` of shape n × n_out and ``right`` n × n_in (thesis §6.3: every such update
is a sum of n outer products, one per example). Forming ΔW costs a GEMM's output (n_out × n_in floats written,
then read again to test it for inf/NaN and to apply it); ``W.addmm_(leftᵀ, right, alpha=−lr)`` does the same
multiply-adds straight into the parameter. :class:`LowRankDirection` carries the two factors from an optimizer's
``_layer_update`` to :meth:`fso_lib.optim.base.LayerwiseOptimizer._apply`, which knows how to apply it (with
heavy-ball momentum: ``buf ← μ·buf + leftᵀright`` is one ``addmm_``).
"""
from __future__ import annotations

import torch

__all__ = ["LowRankDirection", "as_dense", "finiteness_probe", "largest_magnitude"]


class LowRankDirection:
    """The direction ``leftᵀ @ right`` of a weight matrix (``left``: n × n_out, ``right``: n × n_in), not formed.

    ``dense()`` forms it; ``direction * scale`` scales ``right`` (n × n_in numbers, not n_out × n_in);
    :meth:`magnitude_bound` bounds its entries without forming it (the non-finite test of a step)."""

    __slots__ = ("left", "right")

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        if left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0]:
            raise ValueError(
                f"LowRankDirection needs two matrices with the same number of rows (examples), got shapes "
                f"{tuple(left.shape)} and {tuple(right.shape)}")
        self.left = left
        self.right = right

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[1], self.right.shape[1]))

    def dense(self) -> torch.Tensor:
        """``leftᵀ @ right``, formed."""
        return self.left.T @ self.right

    def __mul__(self, scale) -> "LowRankDirection":
        return LowRankDirection(self.left, self.right * scale)

    __rmul__ = __mul__

    def magnitude_bound(self) -> torch.Tensor:
        """``‖left‖_F · ‖right‖_F`` (0-dim): no entry of ``leftᵀ right`` is larger in magnitude (each entry is the
        dot product of a column of ``left`` with one of ``right``; Cauchy–Schwarz).

        It is finite exactly when both factors are finite and neither norm nor their product overflows. So a finite
        bound proves every entry of the product finite (an entry can reach 3.4·10³⁸ only if the bound does), and a
        non-finite one flags a product that holds inf/NaN or *could* overflow (factors with entries ≳ 10¹⁹: a diverged
        run either way). Two norms of the n-row factors, each one pass and free of OpenMP thread wake-ups on a CPU."""
        return torch.linalg.vector_norm(self.left) * torch.linalg.vector_norm(self.right)

    def masked(self, skip: torch.Tensor) -> "LowRankDirection":
        """Both factors zeroed when the 0-dim bool ``skip`` is True (a copy: ``left`` may be a captured
        gradient that must stay as it is); zero times zero is zero even where a factor held inf/NaN."""
        return LowRankDirection(self.left.masked_fill(skip, 0.0), self.right.masked_fill(skip, 0.0))


def largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` as a 0-dim tensor (NaN if ``x`` holds one), from one min/max pass: on a CPU
    ``torch.linalg.vector_norm(x, ord=inf)`` takes about 15× longer (0.9 ms against 0.06 ms for a 200 × 1000
    array on one thread of this project's machine)."""
    low, high = torch.aminmax(x)
    return torch.maximum(high, -low)


def as_dense(direction):
    """``direction`` as a tensor: a :class:`LowRankDirection` formed, anything else as it is."""
    return direction.dense() if isinstance(direction, LowRankDirection) else direction


def finiteness_probe(direction) -> torch.Tensor:
    """A 0-dim tensor that is finite only if every entry of ``direction`` is: the sum of a tensor (one pass; any
    inf/NaN makes it non-finite), or the :meth:`~LowRankDirection.magnitude_bound` of a low-rank direction."""
    if isinstance(direction, LowRankDirection):
        return direction.magnitude_bound()
    return direction.sum()
