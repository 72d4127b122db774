"""One figure style for the whole book, and fixed colours per method."""
from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt

#: Colour of each optimizer, the same in every chapter.
METHOD_COLORS = {
    "sgd": "#7f7f7f",
    "sgd_momentum": "#17becf",
    "adam": "#000000",
    "centered_gd": "#bcbd22",
    "mean_only_batchnorm": "#8c564b",
    "batchnorm": "#e377c2",
    "acp": "#d62728",
    "acp_fixed_alpha": "#ff7f0e",
    "kfac": "#1f77b4",
    "natural_nn": "#2ca02c",
    "natural_nn_implicit": "#98df8a",
    "kfac_thesis": "#aec7e8",
    "acp_quadratic_model": "#a50f15",
    "natural_nn_quadratic_model": "#00441b",
    "ekfac": "#e6ab02",   # not a blue: it is drawn beside K-FAC
    "shampoo": "#756bb1",
    "soap": "#bc80bd",
    "newton": "#9467bd",
    "damped_newton": "#e7969c",
    "gd": "#7f7f7f",
    "gauss_newton": "#393b79",
    "natural_gradient": "#74c476",
    "updated_backprop": "#8c6d31",
}

BOOK_STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 90,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "image.cmap": "RdBu_r",
    "savefig.format": "png",
}


def use_book_style() -> None:
    """Apply the book's matplotlib style (and PNG inline figures, which nbval does not compare)."""
    mpl.rcParams.update(BOOK_STYLE)
    try:  # inside IPython: make inline figures PNG, never SVG (SVG differs on every run)
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except Exception:  # not in a notebook
        pass


def method_color(name: str) -> str:
    """The fixed colour of a method; unknown names get a neutral colour."""
    return METHOD_COLORS.get(name, "#444444")


def show_images(images, n_rows: int, n_cols: int, ax=None, title: str | None = None):
    """Tile ``n_rows × n_cols`` images (tensors or arrays of shape (N, 28, 28) or (N, 784)) in one axes."""
    import numpy as np

    images = np.asarray(images[: n_rows * n_cols], dtype=float)
    side = int(round(images.shape[-1] ** 0.5)) if images.ndim == 2 else images.shape[-1]
    images = images.reshape(-1, side, side)
    grid = np.full((n_rows * (side + 1) - 1, n_cols * (side + 1) - 1), 0.15)  # light grey separators
    for k, image in enumerate(images):
        r, c = divmod(k, n_cols)
        grid[r * (side + 1): r * (side + 1) + side, c * (side + 1): c * (side + 1) + side] = image
    if ax is None:
        _, ax = plt.subplots(figsize=(n_cols * 0.6, n_rows * 0.6))
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
