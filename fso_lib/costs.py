"""What curvature costs: entries, memory and floating-point operations from a network's layer sizes
(thesis §3.1.1, §3.1.4, §3.1.5, §6.3.1, §6.4.2).

Conventions, stated once:

* A network is the list of its linear layers' ``(n_in, n_out)``, each with a bias; ``P = Σ (n_in + 1) n_out``
  parameters and ``W = Σ n_in n_out`` weights.
* FLOPs count the matrix products only, two per multiply-add (the convention of
  ``torch.utils.flop_counter.FlopCounterMode``, against which ``tests/test_costs.py`` checks every count
  that a product computes); element-wise work (activations, bias additions) is left out.
* One minibatch of ``n`` examples: a forward pass costs ``2nW``, the backward pass ``4nW`` minus the
  gradient with respect to the network's input, which nobody needs (``2n n_in n_out`` of the first layer).
* Inverting (solving with) a dense symmetric ``m × m`` matrix costs a Cholesky factorization, ``m³/3``
  (leading term); damping ``+ εI`` makes the matrices positive definite.
* Memory: dense float32 matrices, 4 bytes per entry, every entry stored.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .initialization import linear_layers
from .optim.acp import acp_product_order
from .optim.inverse import inverse_form
from .optim.kfac import kfac_product_order

__all__ = [
    "FLOAT32_BYTES",
    "LayerSizes",
    "layer_sizes",
    "parameter_count",
    "weight_count",
    "forward_flops",
    "gradient_flops",
    "hessian_vector_product_flops",
    "gauss_newton_vector_product_flops",
    "cholesky_flops",
    "CurvatureCost",
    "curvature_costs",
    "human_bytes",
    "human_seconds",
    "median_times",
    "matmul_rate",
    "DEEP_AUTOENCODER_WIDTHS",
    "update_products",
    "amortized_update_multiply_adds",
]

#: Bytes of one float32 entry.
FLOAT32_BYTES = 4

LayerSizes = Sequence[tuple[int, int]]


def layer_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """``(n_in, n_out)`` of each ``nn.Linear`` of ``model``, in forward order."""
    return [(layer.in_features, layer.out_features) for layer in linear_layers(model)]


def parameter_count(sizes: LayerSizes) -> int:
    """``P = Σ (n_in + 1) n_out``: weights and biases."""
    return sum((n_in + 1) * n_out for n_in, n_out in sizes)


def weight_count(sizes: LayerSizes) -> int:
    """``W = Σ n_in n_out``: the multiply-adds of one example's forward pass."""
    return sum(n_in * n_out for n_in, n_out in sizes)


def forward_flops(sizes: LayerSizes, batch_size: int) -> int:
    """One forward pass of ``n`` examples: ``2nW``."""
    return 2 * batch_size * weight_count(sizes)


def _input_gradient_flops(sizes: LayerSizes, batch_size: int) -> int:
    n_in, n_out = sizes[0]
    return 2 * batch_size * n_in * n_out


def gradient_flops(sizes: LayerSizes, batch_size: int) -> int:
    """Forward plus backward pass (``∂L/∂h`` and ``∂L/∂W`` per layer, none for the input): ``6nW − 2n n_0 n_1``."""
    return 6 * batch_size * weight_count(sizes) - _input_gradient_flops(sizes, batch_size)


def hessian_vector_product_flops(sizes: LayerSizes, batch_size: int) -> int:
    """``H v`` by forward-mode differentiation of the gradient: each product of the gradient computation
    gains two tangent products (``Ẋ Y + X Ẏ``), so three gradients' worth."""
    return 3 * gradient_flops(sizes, batch_size)


def gauss_newton_vector_product_flops(sizes: LayerSizes, batch_size: int) -> int:
    """``G_GN v``: ``J v`` (forward pass with tangents, ``6nW``) then ``Jᵀ u`` (a forward and a backward pass):
    ``12nW − 2n n_0 n_1``, as torch's ``jvp`` + ``vjp`` compute it (:class:`fso_lib.matrix_free.CurvatureProducts`)."""
    return 6 * batch_size * weight_count(sizes) + gradient_flops(sizes, batch_size)


def cholesky_flops(m: int) -> float:
    """Factorizing a dense symmetric positive definite ``m × m`` matrix: ``m³/3`` (leading term)."""
    return m ** 3 / 3


@dataclass(frozen=True)
class CurvatureCost:
    """One curvature object of a network: how many numbers it holds and what it costs to build and invert."""

    name: str
    shapes: str          # e.g. "1 matrix P × P" or "8 pairs (n_in+1)² and n_out²"
    entries: int
    form_flops: float     # to build it from one minibatch
    invert_flops: float   # to factorize it (0 when nothing is inverted)
    how_formed: str

    @property
    def bytes_float32(self) -> int:
        return FLOAT32_BYTES * self.entries


def curvature_costs(sizes: LayerSizes, batch_size: int) -> list[CurvatureCost]:
    """The table of notebook 03c: the gradient, then the full Hessian, Gauss-Newton (or Fisher), its
    layer-wise block diagonal (§3.1.5), K-FAC's Kronecker factors (§6.5.1) and ACP's input covariances
    (§6.4.2), each with entries, FLOPs to form from a minibatch of ``batch_size`` and FLOPs to invert."""
    sizes = [(int(a), int(b)) for a, b in sizes]
    n, n_params = int(batch_size), parameter_count(sizes)
    blocks = [(n_in + 1) * n_out for n_in, n_out in sizes]
    gvp, hvp = gauss_newton_vector_product_flops(sizes, n), hessian_vector_product_flops(sizes, n)
    k = len(sizes)
    return [
        CurvatureCost("gradient (for comparison)", "1 vector of P", n_params, gradient_flops(sizes, n), 0.0,
                      "one forward and one backward pass"),
        CurvatureCost("full Hessian H", "1 matrix P × P", n_params ** 2, n_params * hvp, cholesky_flops(n_params),
                      "P Hessian-vector products, one per column"),
        CurvatureCost("Gauss-Newton G_GN or Fisher F", "1 matrix P × P", n_params ** 2, n_params * gvp,
                      cholesky_flops(n_params), "P GN-vector products, one per column"),
        CurvatureCost("block-diagonal G_GN (one block per layer)", f"{k} blocks (n_in+1)·n_out squared",
                      sum(b ** 2 for b in blocks), n_params * gvp, sum(cholesky_flops(b) for b in blocks),
                      "P GN-vector products: a column of one block still needs a full product"),
        CurvatureCost("K-FAC factors A and G per layer", f"{k} pairs (n_in+1)² and n_out²",
                      sum((n_in + 1) ** 2 + n_out ** 2 for n_in, n_out in sizes),
                      sum(2 * n * ((n_in + 1) ** 2 + n_out ** 2) for n_in, n_out in sizes),
                      sum(cholesky_flops(n_in + 1) + cholesky_flops(n_out) for n_in, n_out in sizes),
                      "outer products of the inputs h and of the gradients ∂L/∂a of a backward pass"),
        CurvatureCost("ACP input covariance C per layer", f"{k} matrices n_in²",
                      sum(n_in ** 2 for n_in, _ in sizes), sum(2 * n * n_in ** 2 for n_in, _ in sizes),
                      sum(cholesky_flops(n_in) for n_in, _ in sizes),
                      "outer products of the centred inputs, from the forward pass"),
    ]


def human_bytes(n_bytes: float) -> str:
    """``n_bytes`` with a decimal unit: ``'32.2 TB'``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n_bytes) < 1000 or unit == "PB":
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """A duration in the largest unit that keeps it readable: ``'251 ms'``, ``'4.2 h'``, ``'3.1e+03 years'``."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.2e} {unit}"
    return f"{seconds * 1000:.3g} ms"


def median_times(functions: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each function, measured *interleaved* (one call of each per round), so that
    a change in the machine's load touches every entry alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def matmul_rate(size: int = 1000, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of one ``size × size`` matrix product on the CPU (median of ``repeats``)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    seconds = median_times({"matmul": lambda: a @ b}, repeats)["matmul"]
    return 2 * size ** 3 / seconds


# -- one optimizer update, product by product (issue 11; the speed goals of benchmarks/optimizer_speed.py) -----------

#: Layer widths of the benchmark's deep autoencoder (thesis §4.2, §6.6).
DEEP_AUTOENCODER_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def update_products(n: int, m: int, sizes: Sequence[int] = DEEP_AUTOENCODER_WIDTHS) -> list[tuple[str, str, tuple[int, int, int]]]:
    """``(group, product, (rows, inner, columns))`` for every matrix product of one update (minibatch ``n``, ``m``
    statistics rows) of SGD's passes, ACP and K-FAC as :mod:`fso_lib.optim` computes them, layer by layer; ``sizes``
    are the layer widths (thesis §6.6: the deep autoencoder's by default). ACP: the order of
    :func:`~fso_lib.optim.acp.acp_product_order` and the inverse form of :func:`~fso_lib.optim.inverse.inverse_form`,
    then the product over the minibatch; K-FAC: each side in the order of
    :func:`~fso_lib.optim.kfac.kfac_product_order`, and the product over the minibatch."""
    rows = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layer = f"{n_in}→{n_out}"
        rows += [("SGD passes", f"{layer} forward", (n, n_in, n_out)),
                 ("SGD passes", f"{layer} input gradient", (n, n_out, n_in)),
                 ("SGD passes", f"{layer} weight gradient", (n_out, n, n_in)),
                 ("ACP", f"{layer} weight gradient", (n_out, n, n_in))]
        r = n if acp_product_order(n, n_in, n_out, weight_grads=False) == "batch" else n_out
        if inverse_form(m, n_in) == "woodbury":
            rows += [("ACP", f"{layer} Woodbury: rows·basisᵀ", (r, n_in, m)),
                     ("ACP", f"{layer} Woodbury: ·solve", (r, m, n_in))]
        else:
            rows += [("ACP", f"{layer} dense inverse", (r, n_in, n_in))]
        left, right = kfac_product_order(n, n_in, n_out, weight_grads=False)
        a = n_in + 1
        if left == "batch":
            rows.append(("K-FAC", f"{layer} g G⁻¹", (n, n_out, n_out)))
        if right == "batch":
            rows.append(("K-FAC", f"{layer} [h 1] A⁻¹", (n, a, a)))
        rows.append(("K-FAC", f"{layer} (·)ᵀ (·) over the minibatch", (n_out, n, a)))
        if left == "gradient":
            rows.append(("K-FAC", f"{layer} G⁻¹ (·)", (n_out, n_out, a)))
        if right == "gradient":
            rows.append(("K-FAC", f"{layer} (·) A⁻¹", (n_out, a, a)))
    return rows


def amortized_update_multiply_adds(n: int, m: int, sizes: Sequence[int] = DEEP_AUTOENCODER_WIDTHS, statistics_period: int = 10, inverse_period: int = 100,
                            amortization_period: int = 100) -> dict[str, int]:
    """Multiply-adds of one update, amortized over the refreshes, for SGD, ACP and K-FAC as the library computes
    them (the goals of issue 11 are ratios of times; this is the ratio they would have if every multiply-add cost
    the same). Counted: the forward pass and the input gradients of the backward pass (autograd skips the first
    layer's), SGD's weight gradients, every product of :func:`update_products` for ACP and K-FAC; ACP's refresh every
    ``amortization_period`` updates (a forward pass on the ``m`` statistics rows, the covariance ``m·n_in²``, then the
    inverse: the Gram matrix ``m²·n_in`` and its Cholesky inverse ``m³`` in Woodbury form, ``n_in³`` dense); K-FAC's
    statistics pass every ``statistics_period`` (forward and backward to the pre-activations on ``m`` rows, the
    factors ``m·((n_in+1)² + n_out²)``) and its inversions every ``inverse_period`` (Cholesky and inverse ≈ ``d³``
    per factor of size ``d``). Elementwise work (activations, the loss, momentum) is not counted."""
    layers = list(zip(sizes[:-1], sizes[1:]))
    weights = sum(i * o for i, o in layers)
    passes = n * weights + n * sum(i * o for i, o in layers[1:])  # forward + input gradients
    step = {"ACP": 0, "K-FAC": 0}
    for group, _, (rows, inner, columns) in update_products(n, m, sizes):
        if group in step:
            step[group] += rows * inner * columns
    acp_refresh = m * weights + sum(m * i * i + (m * m * i + m ** 3 if inverse_form(m, i) == "woodbury" else i ** 3)
                                    for i, _ in layers)
    kfac_statistics = m * weights + m * sum(i * o for i, o in layers[1:]) + m * sum((i + 1) ** 2 + o * o for i, o in layers)
    kfac_inversions = sum((i + 1) ** 3 + o ** 3 for i, o in layers)
    return {"SGD": passes + n * weights,
            "ACP": passes + step["ACP"] + acp_refresh // amortization_period,
            "K-FAC": passes + step["K-FAC"] + kfac_statistics // statistics_period + kfac_inversions // inverse_period}
