"""Run-time switches shared by every notebook, test and script.

One environment variable chooses the *mode* of the whole book:

``FSO_FAST=1``
    fast mode: small data, few steps. Used by the test suite (nbval) so that
    every notebook runs in seconds on a 2-core CPU, through the same code paths.
unset or ``FSO_FAST=0``
    full mode, what a reader gets by default.

A second variable, ``FSO_DEVICE``, overrides the device picked by
:func:`get_device` (``cpu``, ``cuda``, ``cuda:1``...).
"""
from __future__ import annotations

import os

import torch

FAST_ENV_VAR = "FSO_FAST"
DEVICE_ENV_VAR = "FSO_DEVICE"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def fast_mode() -> bool:
    """True when ``FSO_FAST`` asks for the fast (CI) mode of the book."""
    value = os.environ.get(FAST_ENV_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{FAST_ENV_VAR}={value!r} is not understood: set it to 1 (fast mode) or 0 / unset (full mode)."
    )


def choose(full, fast):
    """Return ``fast`` in fast mode and ``full`` otherwise.

    Every size that the fast mode shrinks goes through this one function, e.g.
    ``n_steps = choose(full=2000, fast=50)``.
    """
    return fast if fast_mode() else full


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else ``FSO_DEVICE``, else CUDA when available, else CPU."""
    requested = device if device is not None else os.environ.get(DEVICE_ENV_VAR) or None
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"Device {requested!r} was requested but this PyTorch build sees no CUDA GPU "
            f"(torch {torch.__version__}). Use device='cpu', unset {DEVICE_ENV_VAR}, or install a CUDA build of torch."
        )
    return device
