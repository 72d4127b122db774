"""fso_lib: the helper library of the book *Factorized Second Order*.

One concept per module; see the README for the map from modules to thesis chapters.
"""
from .config import choose, fast_mode, get_device

__all__ = ["choose", "fast_mode", "get_device"]
__version__ = "0.1.0"
