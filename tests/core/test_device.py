"""core/device.py: ``--device`` and ``--dtype`` names, the one resolver every job uses."""

from __future__ import annotations

import pytest
import torch

from core.device import DeviceError, resolve_device, resolve_dtype


def test_auto_is_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected


def test_auto_with_mps_allowed_still_prefers_cuda_and_falls_back_to_cpu():
    device = resolve_device("auto", allow_mps=True)
    if torch.cuda.is_available():
        assert device.type == "cuda"
    elif torch.backends.mps.is_available():
        assert device.type == "mps"
    else:
        assert device.type == "cpu"


def test_explicit_names_pass_through():
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_name_names_the_flag():
    with pytest.raises(DeviceError, match=r"--device 'gpu0' is not a device torch knows"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_fails_early():
    with pytest.raises(DeviceError, match="--device cuda:1 asks for CUDA"):
        resolve_device("cuda:1")


def test_device_error_is_a_value_error():
    # The job mains report ValueErrors as "error: ..." with exit code 2.
    assert issubclass(DeviceError, ValueError)


def test_dtypes():
    assert resolve_dtype(None) is None and resolve_dtype("auto") is None
    assert resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
