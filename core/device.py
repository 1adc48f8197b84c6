"""Choosing where a model runs: ``--device`` and ``--dtype`` names to torch objects, one place for every job."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class DeviceError(ValueError):
    """A ``--device`` that torch does not know or this machine does not have."""


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto", *, allow_mps: bool = False) -> torch.device:
    """The device ``--device NAME`` means; ``auto`` is CUDA when present, else the CPU.

    ``allow_mps`` lets ``auto`` pick Apple's MPS before the CPU: the training
    jobs ask for it (a laptop GPU still beats its CPU at a training step), the
    inference paths keep CUDA-or-CPU. Any other name goes to ``torch.device``,
    and one this machine lacks fails here, naming the flag, not deep in a kernel.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if allow_mps and _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device torch knows; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asks for CUDA, but this torch build or machine has no CUDA device")
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"--device {name} asks for Apple MPS, but this torch build or machine has none")
    return device


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """None (or "auto") keeps the dtype the weights are stored in."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return DTYPES[name]
