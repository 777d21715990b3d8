"""The server's device: a GPU, or the CPU only for test models or when FLUX_DEVICE=cpu asks for it."""

import logging
import types
import warnings

import pytest
import torch

from flux import hardware
from flux.hardware import DeviceError, serving_device
from flux.model import RANDOM_WEIGHTS_MARKER


@pytest.fixture
def real_weights(tmp_path):
    """A weights directory without the test-model marker (its contents do not matter here)."""
    return tmp_path


@pytest.fixture
def test_weights(tmp_path):
    (tmp_path / RANDOM_WEIGHTS_MARKER).write_text("{}")
    return tmp_path


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.delenv("FLUX_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def a_gpu(monkeypatch):
    monkeypatch.delenv("FLUX_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: "570.86.15")


def test_without_a_gpu_real_weights_are_refused(no_gpu, real_weights):
    with pytest.raises(DeviceError) as error:
        serving_device(real_weights)
    message = str(error.value)
    assert "no CUDA GPU is visible to torch" in message
    assert f"torch {torch.__version__}" in message
    assert "--gpus all" in message and "FLUX_DEVICE=cpu" in message
    assert "script/serve --tiny" in message  # what a newcomer without a GPU can run instead


def test_torchs_own_explanation_is_kept(monkeypatch, real_weights):
    monkeypatch.delenv("FLUX_DEVICE", raising=False)

    def is_available():
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020).", stacklevel=2
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    with pytest.raises(DeviceError, match="driver on your system is too old"):
        serving_device(real_weights)


def test_without_a_gpu_a_test_model_runs_on_the_cpu(no_gpu, test_weights, caplog):
    with caplog.at_level(logging.INFO, logger="flux.hardware"):
        assert serving_device(test_weights) == "cpu"
    assert "runtime: torch" in caplog.text and "test model" in caplog.text


def test_flux_device_cpu_allows_the_cpu(no_gpu, real_weights, monkeypatch):
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    assert serving_device(real_weights) == "cpu"


def test_flux_device_cuda_insists_on_a_gpu(no_gpu, test_weights, monkeypatch):
    monkeypatch.setenv("FLUX_DEVICE", "cuda")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        serving_device(test_weights)


def test_an_unknown_device_is_named(no_gpu, real_weights, monkeypatch):
    monkeypatch.setenv("FLUX_DEVICE", "tpu")
    with pytest.raises(DeviceError, match="FLUX_DEVICE must be one of cuda, cpu.*'tpu'"):
        serving_device(real_weights)


def test_with_a_gpu_it_is_used_and_described(a_gpu, real_weights, caplog):
    with caplog.at_level(logging.INFO, logger="flux.hardware"):
        assert serving_device(real_weights) == "cuda"
    assert "NVIDIA driver 570.86.15" in caplog.text
    assert "GPU NVIDIA H100 80GB HBM3 (80 GiB, compute capability 9.0)" in caplog.text


def test_flux_device_cpu_wins_over_a_gpu(a_gpu, real_weights, monkeypatch):
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    assert serving_device(real_weights) == "cpu"


def test_the_driver_version_is_read_from_the_kernel_module(monkeypatch, tmp_path):
    text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n"
    version_file = tmp_path / "version"
    version_file.write_text(text)
    real_path = hardware.Path
    monkeypatch.setattr(
        hardware, "Path", lambda p: version_file if p == "/proc/driver/nvidia/version" else real_path(p)
    )
    assert hardware.nvidia_driver_version() == "570.86.15"
