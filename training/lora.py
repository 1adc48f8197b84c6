"""Low-rank adaptation (Hu et al., 2021; the book's appendix E).

A frozen linear layer ``W`` gets a trainable detour ``x A B`` of rank r:

    y = x W^T + b + (alpha / r) * x A B        A: (in, r), B: (r, out)

B starts at zero, so training starts from exactly the base model; A starts
like a linear layer's weight (Kaiming uniform), as in the book. Only A and B
receive gradients and optimizer state, a few percent of the parameters.

For serving, ``merge_lora`` folds the detour back into the weight,
``W' = W + (alpha / r) (A B)^T``, and puts a plain ``nn.Linear`` back, so the
saved checkpoint has our usual parameter names and costs nothing extra to run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Every linear layer inside a block, for both families (core/model/attention.py, core/model/layers.py).
ALL_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "ff.fc", "ff.proj", "ff.gate", "ff.up", "ff.down")


class LoRAError(ValueError):
    """A LoRA setting that cannot be applied (bad rank, a target that matches nothing)."""


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A @ B)`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        dtype, device = base.weight.dtype, base.weight.device
        self.A = nn.Parameter(torch.empty(base.in_features, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rank, base.out_features, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.A) @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The detour as a weight update of nn.Linear's shape (out, in)."""
        return self.scale * (self.A @ self.B).T

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear


def _matches(name: str, targets: Iterable[str]) -> bool:
    # "attn.qkv" matches "blocks.3.attn.qkv" (and "backbone.blocks.3.attn.qkv"),
    # a dotted suffix, so targets never depend on the block index.
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = ALL_BLOCK_LINEARS,
    blocks: Iterable[int] | None = None,
) -> list[str]:
    """Freeze ``model`` and wrap each targeted nn.Linear in a LoRALinear; returns the wrapped names.

    ``blocks`` limits the adapters to those block indices (the rest of the
    model stays exactly the base). Unknown target names that match no layer
    raise LoRAError, so a typo such as ``attn.q`` does not silently train nothing.
    """
    targets = tuple(targets)
    prefixes = None if blocks is None else tuple(f"blocks.{i}." for i in blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        in_blocks = prefixes is None or any(name.startswith(p) or f".{p}" in name for p in prefixes)
        if isinstance(module, nn.Linear) and in_blocks and _matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha))
            wrapped.append(name)
    # A known name absent from this family (ff.fc in Llama) is fine; anything
    # else that matched nothing is a typo.
    unknown = [t for t in targets if t not in ALL_BLOCK_LINEARS and not any(_matches(n, [t]) for n in wrapped)]
    if not wrapped or unknown:
        raise LoRAError(
            f"LoRA target module(s) {', '.join(unknown or targets)} match no linear layer of this model; "
            f"choose from {', '.join(ALL_BLOCK_LINEARS)} (or out_head when the head is not tied)"
        )
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear in ``model`` by its merged nn.Linear; returns how many were merged."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
            count += 1
    return count


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.A, m.B)]
