"""The benchmark tasks (thesis §4.2, §4.3): data, model and loss, in one object.

* ``autoencoder``: the MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784 (sigmoid hidden units,
  linear code, sigmoid outputs), squared error summed over the 784 pixels and averaged over examples.
* ``classification``: an MLP with 8 hidden ReLU layers of 100 units and multiclass cross-entropy, on
  CIFAR-10 (thesis §4.3) when its archive can be fetched and matches its pinned SHA-256, else on MNIST
  digits. The dataset that actually ran is always recorded (``Task.dataset``).
* ``small_autoencoder``: 784-100-30-100-784, the same loss; a cheap stand-in for tests and the
  hyperparameter-search experiment of Table 4.1.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import fast_mode
from ..data import data_dir, load_mnist, restricted_loads
from ..models import deep_autoencoder, glorot_uniform_init_, mlp, sparse_init_

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_SIZE = 170_498_071
CIFAR10_FILE = "cifar-10-python.tar.gz"

CLASSIFIER_SIZES_HIDDEN = (100,) * 8


class CIFAR10Unavailable(RuntimeError):
    """CIFAR-10 could not be obtained or failed its checksum; the message says what to do."""


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output units, averaged over examples (no ½), thesis §4.2."""
    return (output - target).pow(2).sum(dim=1).mean()


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multiclass cross-entropy of logits, averaged over examples."""
    return nn.functional.cross_entropy(output, target)


@dataclass
class Task:
    """Everything a run needs besides the optimizer. Targets equal inputs for an autoencoder."""

    name: str
    dataset: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    build_model: Callable[..., nn.Module]  # (init, init_scale, seed) -> model
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    classification: bool = False
    defaults: dict = field(default_factory=dict)  # default init / init_scale
    sampled_loss: str = "squared_error"  # the loss K-FAC samples its targets from

    @property
    def n_train(self) -> int:
        return self.train_inputs.shape[0]

    def to(self, device) -> "Task":
        for name in ("train_inputs", "train_targets", "test_inputs", "test_targets"):
            setattr(self, name, getattr(self, name).to(device))
        return self


# ----------------------------------------------------------------------------- CIFAR-10
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_cifar10(folder: Path | None = None, download: bool = True, timeout: float = 30.0):
    """CIFAR-10 as float32 (N, 3072) in [0, 1] and int64 labels: (train_x, train_y, test_x, test_y).

    The archive ``cifar-10-python.tar.gz`` is looked for in ``data/`` (place it there by hand on a machine
    without access to the Toronto host), else downloaded; it must match its pinned SHA-256. The pickles
    inside are read with a loader that only rebuilds numpy arrays. Raises :class:`CIFAR10Unavailable`.
    """
    folder = Path(folder) if folder is not None else data_dir()
    path = folder / CIFAR10_FILE
    if not path.exists():
        if not download:
            raise CIFAR10Unavailable(f"{path} is missing and download=False.")
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response, open(partial, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
            os.replace(partial, path)
        except Exception as error:  # noqa: BLE001 - reported with what to do
            partial.unlink(missing_ok=True)
            raise CIFAR10Unavailable(
                f"CIFAR-10 could not be downloaded from {CIFAR10_URL} ({type(error).__name__}: {error}). "
                f"Place {CIFAR10_FILE} (SHA-256 {CIFAR10_SHA256}) in {folder} by hand to use it."
            ) from error
    if path.stat().st_size != CIFAR10_SIZE or _sha256_file(path) != CIFAR10_SHA256:
        raise CIFAR10Unavailable(f"{path} does not match its pinned size and SHA-256 {CIFAR10_SHA256}; delete it.")
    batches = {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            base = os.path.basename(member.name)
            if base.startswith("data_batch_") or base == "test_batch":
                batches[base] = restricted_loads(archive.extractfile(member).read())

    def stack(names):
        x = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        y = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
        return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y)

    train_x, train_y = stack([f"data_batch_{k}" for k in range(1, 6)])
    test_x, test_y = stack(["test_batch"])
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------- models
def _init(model: nn.Module, init: str, init_scale: float, seed: int | None) -> nn.Module:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if init == "glorot":
        return glorot_uniform_init_(model, scale=init_scale, generator=generator)
    if init == "sparse":
        return sparse_init_(model, scale=init_scale, generator=generator)
    raise ValueError(f"Unknown init {init!r}: use 'glorot' or 'sparse'.")


def classifier(n_inputs: int, n_classes: int = 10, init: str = "glorot", init_scale: float = 2 ** 0.5,
               seed: int | None = None) -> nn.Sequential:
    """Thesis §4.3's MLP: 8 hidden ReLU layers of 100 units, logits out."""
    model = mlp([n_inputs, *CLASSIFIER_SIZES_HIDDEN, n_classes], activation="relu", output_activation="identity")
    return _init(model, init, init_scale, seed)


SMALL_AUTOENCODER_SIZES = (784, 100, 30, 100, 784)

TASKS = ("autoencoder", "classification", "small_autoencoder")


def make_task(name: str, sample: bool | None = None, dataset: str | None = None) -> Task:
    """Build a task by name (see the module docstring). ``sample=True`` uses the 1,000-image MNIST sample.

    For ``classification``, ``dataset`` may be ``"cifar10"`` (fail if unavailable), ``"mnist"``, or ``None``
    (CIFAR-10 if available, else MNIST with a warning that says why).
    """
    if name in ("autoencoder", "small_autoencoder"):
        mnist = load_mnist(sample=sample)
        sizes = None if name == "autoencoder" else SMALL_AUTOENCODER_SIZES

        def build(init="glorot", init_scale=1.0, seed=None, _sizes=sizes):
            if _sizes is None:
                return deep_autoencoder(init=init, init_scale=init_scale, seed=seed)
            return deep_autoencoder(sizes=_sizes, init=init, init_scale=init_scale, seed=seed)

        return Task(name, f"mnist ({mnist.source})", mnist.train_images, mnist.train_images, mnist.test_images,
                    mnist.test_images, build, squared_error, defaults={"init": "glorot", "init_scale": 1.0})
    if name == "classification":
        if dataset not in (None, "cifar10", "mnist"):
            raise ValueError(f"dataset must be 'cifar10', 'mnist' or None, got {dataset!r}.")
        use_sample = fast_mode() if sample is None else sample
        if dataset in (None, "cifar10") and not use_sample:
            try:
                train_x, train_y, test_x, test_y = load_cifar10()
                source = "cifar10"
            except CIFAR10Unavailable as error:
                if dataset == "cifar10":
                    raise
                warnings.warn(f"CIFAR-10 is unavailable, running the classification task on MNIST digits. {error}",
                              stacklevel=2)
                source = None
        else:
            source = None
        if source is None:
            mnist = load_mnist(sample=sample)
            train_x, train_y, test_x, test_y = mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels
            source = f"mnist ({mnist.source})"
        n_inputs = train_x.shape[1]

        def build(init="glorot", init_scale=2 ** 0.5, seed=None):
            return classifier(n_inputs, 10, init=init, init_scale=init_scale, seed=seed)

        return Task(name, source, train_x, train_y, test_x, test_y, build, cross_entropy, classification=True,
                    sampled_loss="softmax_cross_entropy", defaults={"init": "glorot", "init_scale": 2 ** 0.5})
    raise ValueError(f"Unknown task {name!r}; choose one of {TASKS}.")
