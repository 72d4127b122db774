"""The damped inverse of an input covariance, applied to rows (thesis §6.3.2 and §6.4.2).

ACP and the natural neural network precondition every layer's update by ``P = (C + εI)⁻¹`` on the input
side, where ``C = (1/m) Sᵀ S`` is the covariance of a statistics minibatch whose ``m`` centered rows are
``S`` (m × n_in). Two forms of ``x ↦ x P`` give the same numbers (up to rounding):

* ``"dense"``: ``P`` is formed once per refresh (Cholesky, n_in³) and each use costs ``rows · n_in²``;
* ``"woodbury"``: ``C`` has rank at most ``m − 1``, so the Sherman–Morrison–Woodbury identity gives
  ``P = (1/ε) (I − Sᵀ B)`` with ``B = (mεI + S Sᵀ)⁻¹ S`` (an m × m Cholesky per refresh), and each use
  costs ``rows · m · (2 n_in + m)``: about half as much as the dense form for the 784- and 1000-wide inputs of
  the deep autoencoder with m = 200.

``"auto"`` picks the cheaper form per layer (:func:`inverse_form`).
"""
from __future__ import annotations

import torch

from .base import damped_inverse

__all__ = ["INVERSE_FORMS", "inverse_form", "CovarianceInverse", "apply_inverse"]

INVERSE_FORMS = ("auto", "dense", "woodbury")


def inverse_form(n_statistics: int, n_in: int, requested: str = "auto") -> str:
    """``"dense"`` or ``"woodbury"``: the requested form, or for ``"auto"`` the one with fewer multiply-adds
    per preconditioned row (``n_in²`` against ``m (2 n_in + m)`` with ``m = n_statistics``)."""
    if requested not in INVERSE_FORMS:
        raise ValueError(f"inverse form must be one of {INVERSE_FORMS}, got {requested!r}")
    if requested != "auto":
        return requested
    m = n_statistics
    return "woodbury" if m * (2 * n_in + m) < n_in * n_in else "dense"


class CovarianceInverse:
    """``x ↦ x (C + εI)⁻¹`` for the covariance ``C`` of centered rows ``centered`` (m × n_in).

    ``epsilon`` is a float or a 0-dim tensor (kept on the device). Holds tensors only, so that an
    optimizer can keep them in its ``state`` (:meth:`to_state`, :meth:`from_state`).
    """

    def __init__(self, form: str, epsilon, matrix: torch.Tensor | None = None, basis: torch.Tensor | None = None,
                 solve: torch.Tensor | None = None):
        self.form, self.epsilon = form, epsilon
        self.matrix, self.basis, self.solve = matrix, basis, solve

    @classmethod
    def from_centered(cls, centered: torch.Tensor, epsilon, form: str = "auto", what: str = "input covariance",
                      covariance: torch.Tensor | None = None) -> "CovarianceInverse":
        """Build from the centered statistics rows; ``covariance`` (``Sᵀ S / m``) may be passed if already formed."""
        m, n_in = centered.shape
        form = inverse_form(m, n_in, form)
        rows64 = lambda: centered.double()  # noqa: E731 - the float64 retry forms the matrix again from the rows
        if form == "dense":
            if covariance is None:
                covariance = centered.T @ centered / m
            return cls("dense", epsilon, matrix=damped_inverse(covariance, epsilon, what=what,
                                                               float64_matrix=lambda: rows64().T @ rows64() / m))
        gram = centered @ centered.T
        kernel = damped_inverse(gram, epsilon * m, what=f"{what} (its {m} × {m} Gram matrix)",
                                float64_matrix=lambda: rows64() @ rows64().T)
        return cls("woodbury", epsilon, basis=centered, solve=kernel @ centered)

    def apply(self, rows: torch.Tensor, scale=None) -> torch.Tensor:
        """``scale · rows (C + εI)⁻¹``; ``scale`` a float, a 0-dim tensor or ``None`` (1)."""
        return apply_inverse(self.to_state(), rows, scale)

    def dense(self) -> torch.Tensor:
        """The matrix ``(C + εI)⁻¹`` itself (for inspection; the Woodbury form builds it here, n_in² memory)."""
        if self.form == "dense":
            return self.matrix
        n_in = self.basis.shape[1]
        eye = torch.eye(n_in, dtype=self.basis.dtype, device=self.basis.device)
        return self.apply(eye)

    def to_state(self) -> dict:
        """Tensors only (``torch.optim.Optimizer.load_state_dict`` mangles strings): the form is told by which of
        ``inverse`` (dense) and ``inverse_basis``/``inverse_solve`` (Woodbury) is set."""
        return {"epsilon": self.epsilon, "inverse": self.matrix, "inverse_basis": self.basis, "inverse_solve": self.solve}

    @staticmethod
    def clear_state(state: dict) -> None:
        """Mark the inverse kept in ``state`` as stale."""
        state["inverse"] = state["inverse_basis"] = state["inverse_solve"] = None

    @classmethod
    def from_state(cls, state: dict) -> "CovarianceInverse | None":
        """The inverse kept in an optimizer's ``state`` by :meth:`to_state`, or ``None`` if there is none."""
        if state.get("inverse") is not None:
            return cls("dense", state["epsilon"], matrix=state["inverse"])
        if state.get("inverse_basis") is not None:
            return cls("woodbury", state["epsilon"], basis=state["inverse_basis"], solve=state["inverse_solve"])
        return None


def apply_inverse(state: dict, rows: torch.Tensor, scale=None) -> torch.Tensor:
    """``scale · rows (C + εI)⁻¹`` with the inverse an optimizer keeps in ``state`` (:meth:`CovarianceInverse.to_state`).

    A plain function over the state's tensors (no object built per call), so that a compiled step traces it."""
    epsilon = state["epsilon"]
    if state.get("inverse") is not None:
        out = rows @ state["inverse"]
        return out if scale is None else out.mul_(scale)
    out = torch.addmm(rows, rows @ state["inverse_basis"].T, state["inverse_solve"], alpha=-1.0)
    return out.mul_(1.0 / epsilon if scale is None else scale / epsilon)
