"""The fast/full mode switch and the device helper."""
import pytest
import torch

from fso_lib.config import choose, fast_mode, get_device


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("off", False)])
def test_fast_mode_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("FSO_FAST", value)
    assert fast_mode() is expected


def test_full_mode_is_the_default(monkeypatch):
    monkeypatch.delenv("FSO_FAST", raising=False)
    assert fast_mode() is False
    assert choose(full=1000, fast=10) == 1000


def test_choose_follows_the_switch(monkeypatch):
    monkeypatch.setenv("FSO_FAST", "1")
    assert choose(full=1000, fast=10) == 10


def test_unknown_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FSO_FAST", "maybe")
    with pytest.raises(ValueError, match="FSO_FAST"):
        fast_mode()


def test_device_default_and_override(monkeypatch):
    monkeypatch.delenv("FSO_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device().type == expected
    monkeypatch.setenv("FSO_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    assert get_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown on machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FSO_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        get_device()
