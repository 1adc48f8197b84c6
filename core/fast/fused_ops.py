"""RMSNorm and rotary embedding as one kernel call each, for Llama-family decoding.

A decoding step of SmolLM2-135M runs 61 RMSNorms and 30 rotary embeddings on
one token per sequence. torch computes each as a chain of small element-wise
kernels, and at that size the chain's dispatch costs more than its arithmetic,
a sizeable share of a step once the matrix products read GGUF blocks
(``core.fast.gguf_matvec``; figures in docs/performance.md).
``core/fast/csrc/fused_ops.cpp`` does each in one pass over the rows.

:func:`use_fused_ops` swaps them into a model (``core.fast.transforms.make_fast`` does it
for fp32 CPU models). Like the other fast paths, they keep the modules'
parameters and state-dict names and serve only fp32 CPU inference; autograd,
other dtypes and devices take ``core.model.layers``' own code. The rotation rounds as
``core.model.layers.apply_rope`` does and is equal to it bit for bit; the norm sums
its squares in another order and agrees to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from core.fast.kernels import load_kernels, needs_autograd
from core.model.layers import RMSNorm, apply_rope


def kernels():
    """The compiled ``rms_norm`` and ``rope``; raises FastPathError saying why they cannot be had."""
    return load_kernels("fused_ops")


def _fused(x: torch.Tensor, param: torch.Tensor) -> bool:
    # Checked on every call of every layer, so kept to a few attribute reads.
    if x.dtype != torch.float32 or param.dtype != torch.float32 or x.device.type != "cpu":
        return False
    return not needs_autograd(x, param)


class FusedRMSNorm(RMSNorm):
    """An :class:`~core.model.layers.RMSNorm` (the same ``weight`` parameter) computed by one kernel call."""

    def __init__(self, norm: RMSNorm) -> None:
        nn.Module.__init__(self)  # not RMSNorm's: it would make a new weight instead of sharing this one
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fused(x, self.weight):
            return super().forward(x)
        return kernels().rms_norm(x, self.weight, self.eps)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`core.model.layers.apply_rope` for x (B, T, heads, head_dim) and cos, sin (B, T, 1, head_dim)."""
    B, T, _, D = x.shape
    if not _fused(x, cos) or sin.dtype != torch.float32 or x.stride(-1) != 1 or cos.shape != (B, T, 1, D):
        return apply_rope(x, cos, sin)
    # The (B, T, 1, D) tables are transposed views of contiguous (B, 1, T, D) ones: reshaping is free.
    return kernels().rope(x, cos.reshape(B, T, D).contiguous(), sin.reshape(B, T, D).contiguous())


def fusable(model: nn.Module) -> tuple[list, list]:
    """The model's RMSNorms (as (parent, name, module)) and its attention layers that rotate."""
    norms = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is RMSNorm]
    rotations = [m for m in model.modules() if getattr(m, "use_rope", False) and getattr(m, "rotate", None) is apply_rope]
    return norms, rotations


def use_fused_ops(model: nn.Module) -> int:
    """Swap every RMSNorm and rotary embedding of ``model`` for the fused kernels; returns how many.

    Raises FastPathError (from :func:`kernels`) when the kernels cannot be built here."""
    norms, rotations = fusable(model)
    if not (norms or rotations):
        return 0  # nothing to fuse (GPT-2): nothing to compile
    kernels()
    for parent, name, child in norms:
        setattr(parent, name, FusedRMSNorm(child))
    for attention in rotations:
        attention.rotate = fused_rope
    return len(norms) + len(rotations)
