"""fso_lib: the helper library of the book *Factorized Second Order*.

One concept per module (import them as ``from fso_lib import curvature`` or ``from fso_lib.optim import ACP``):

- ``config``: fast/full mode (``FSO_FAST``) and device choice (``FSO_DEVICE``);
- ``data``: MNIST with pinned checksums; ``models``, ``initialization``, ``training``: networks and a training loop;
- ``losses``, ``curvature``, ``steps``, ``functions2d``: chapter 3 (exact curvature, Newton, Gauss-Newton, Fisher);
- ``updated_backprop``: chapter 5;
- ``layer_stats``, ``kron``, ``optim``, ``normalization``: chapter 6 (Kronecker factors and the optimizers);
- ``search``, ``bench``: chapter 4 and §6.6 (hyperparameter search, the benchmark harness);
- ``plotting``: the book's figure style; ``errors``: shared exceptions.
"""
from .config import choose, fast_mode, get_device

__all__ = ["choose", "fast_mode", "get_device"]
__version__ = "0.1.0"
