"""Linear layers whose weights are also kept in the layouts fast kernels read (``make_fast``'s
``prepack`` and ``panels``): oneDNN's blocked layout for prompts, our column panels
(``core.fast.panels``) for decoding's few rows. The parameters stay where they were, so the
state dict keeps its names and values, and autograd, other devices and dtypes take ``F.linear``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from core.fast.kernels import needs_autograd, weight_key
from core.fast.panels import Panels

# oneDNN keeps each product it has compiled, one per input row count, in two caches (its own
# primitive cache, and ideep's in front of it), 1,024 each by default and about 140 KB apiece. A
# chat engine meets a new row count in most prefill passes, so at the defaults the caches grow by
# hundreds of MB over the first hours of serving. 256 holds what decoding reuses every step (up to
# 32 row counts for each of a model's five weight shapes) and the recent prompts' shapes; compiling
# a shape that fell out costs about a millisecond. Read when oneDNN compiles its first product, so
# it must be set before then; a value the user set wins.
ONEDNN_CACHE_CAPACITY = 256
for _variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, str(ONEDNN_CACHE_CAPACITY))


@functools.cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN linear kernels run here for ``dtype`` (CPU only)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_weight(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    # An opaque oneDNN tensor in the blocked layout its matmul kernel reads fastest
    # for about ``batch_hint`` rows of input; any number of rows still works.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# -- prepacked linear layers ----------------------------------------------------


class _PackedCopy:
    """A packed snapshot of a weight, rebuilt when the weight is changed in place or replaced."""

    def __init__(self, batch_hint: int) -> None:
        self.batch_hint = batch_hint
        self.packed: torch.Tensor | None = None
        self.key: tuple | None = None

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        key = weight_key(weight)
        if key != self.key:
            self.packed, self.key = pack_weight(weight, self.batch_hint), key
        return self.packed

    def __getstate__(self) -> dict:
        # A packed tensor is opaque (no storage to copy or pickle): copies repack on first use.
        return {"batch_hint": self.batch_hint, "packed": None, "key": None}


def _use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The packed kernels are CPU, inference-only and want matching dtypes;
    # anything else takes plain F.linear. One fp32 row is a matrix-vector product
    # that only streams the weight, where MKL's gemv measured faster than oneDNN's
    # packed kernel (docs/performance.md); packing pays once there are rows to reuse it.
    if x.device.type != "cpu" or x.dtype != weight.dtype or not onednn_available(weight.dtype):
        return False
    if needs_autograd(x, weight):
        return False
    return weight.dtype != torch.float32 or x.numel() > x.shape[-1]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, panels: Panels | None,
            packed: _PackedCopy | None) -> torch.Tensor:
    # Decoding's few rows from the panels, longer inputs from oneDNN's copy, the rest plain.
    if panels is not None and panels.applies(x, weight):
        return panels.linear(x, weight, bias)
    if packed is None or not _use_packed(x, weight):
        return nn.functional.linear(x, weight, bias)
    return packed_linear(x, packed.of(weight), bias)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is also kept in the layouts fast kernels read, for inference.

    It holds the original ``weight`` and ``bias`` parameters (so the state dict
    keeps its names and values) plus packed copies, snapshots rebuilt if the
    weight is changed or cast afterwards: ``panels`` (``core.fast.panels``) for
    up to eight rows, and with ``onednn`` a oneDNN-packed copy for the rest.
    Autograd, other devices and other dtypes take the plain ``F.linear``.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1, onednn: bool = True, panels: Panels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # Plain attributes: never saved, never cast.
        self._packed = _PackedCopy(batch_hint) if onednn else None
        self._panels = panels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, self._panels, self._packed)

    def extra_repr(self) -> str:
        layouts = " and ".join(name for name, copy in (("oneDNN", self._packed), ("panels", self._panels)) if copy)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {layouts}"


class PackedHead(nn.Module):
    """The output layer ``hidden @ weight.T`` with the weight packed as :class:`PackedLinear`'s;
    the weight (possibly the tied embedding) is passed in on each call."""

    def __init__(self, batch_hint: int = 1, onednn: bool = True, panels: Panels | None = None) -> None:
        super().__init__()
        self._packed = _PackedCopy(batch_hint) if onednn else None
        self._panels = panels

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _linear(hidden, weight, None, self._panels, self._packed)


def pack_linears(model: nn.Module, batch_hint: int = 1, onednn: bool = True, panels: bool = False) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear` with the copies asked for; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, batch_hint, onednn, Panels() if panels else None))
                count += 1
    return count
