"""A GPT-2 layer of a decoding step as one C++ call.

At one token per sequence, a GPT-2 layer is four matrix products and some
twenty small operations around them (two LayerNorms, the split into heads, the
cache write, attention over the cache, GELU, two residual additions), each a
torch call and most a Python module call too. Once the products read their
weights at memory speed (``core.panel_linear``), those small calls are a
quarter of GPT-2 small's decoding step on this machine's CPU: dispatch, not
arithmetic. ``core/csrc/decode_layer.cpp`` does the whole layer, products
included, in one call.

:class:`FusedGPT2Block` is the model's own ``TransformerBlock`` (the same
submodules, parameters and state-dict names) whose forward takes that call
when it applies: fp32 on the CPU, inference, one new token for up to eight
sequences, a KV cache, and linear layers that carry panels (``core.fast``
attaches them first). Everything else (prefill, training, returned attention
weights, the book's explicit attention path, another dtype) runs the block's
own code. The fused layer agrees with it to fp32 rounding (tested), not bit
for bit: its LayerNorm, softmax and GELU round in their own order.
"""

from __future__ import annotations

import torch
from torch import nn

from core.kernels import load_kernels
from core.model import ForwardContext, TransformerBlock
from core.panel_linear import MAX_ROWS


def kernels():
    """The compiled ``gpt2_layer``; raises FastPathError saying why it cannot be had."""
    return load_kernels("decode_layer")


def fusable(block: nn.Module) -> bool:
    """Whether ``block`` is a GPT-2 block whose linear layers carry panels (``core.fast.make_fast``)."""
    from core.fast import PackedLinear
    from core.layers import FeedForward, LayerNorm

    if type(block) is not TransformerBlock or not isinstance(block.ff, FeedForward):
        return False
    if not (isinstance(block.norm1, LayerNorm) and isinstance(block.norm2, LayerNorm)) or block.attn.use_rope:
        return False
    linears = (block.attn.qkv, block.attn.proj, block.ff.fc, block.ff.proj)
    return block.attn.n_kv_heads == block.attn.n_heads and all(
        isinstance(m, PackedLinear) and m._panels is not None for m in linears)


class FusedGPT2Block(TransformerBlock):
    """A GPT-2 ``TransformerBlock`` (the same submodules) whose decoding steps run as one kernel call."""

    def __init__(self, block: TransformerBlock) -> None:
        nn.Module.__init__(self)  # not TransformerBlock's: it would build new layers instead of sharing these
        self.norm1, self.attn, self.norm2, self.ff, self.drop = block.norm1, block.attn, block.norm2, block.ff, block.drop
        self.train(block.training)
        kernels()  # fail here, with the reason, rather than on the first step

    def _applies(self, x: torch.Tensor, ctx: ForwardContext) -> bool:
        # Checked on every call of every layer, so kept to a few attribute reads.
        B, T, _ = x.shape
        cache = ctx.cache
        return (
            T == 1 and B <= MAX_ROWS and cache is not None and not ctx.return_attention
            and x.dtype == torch.float32 and x.device.type == "cpu" and cache.keys.dtype == torch.float32
            and not self.training and self.attn.path == "sdpa"
            and not (torch.is_grad_enabled() and (x.requires_grad or self.norm1.weight.requires_grad))
        )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._applies(x, ctx):
            return super().forward(x, ctx)
        attn, ff, cache = self.attn, self.ff, ctx.cache
        key_mask = None
        if ctx.mask is not None:  # left-padded prompts: (B or 1, 1, 1, S), True where a key may be seen
            key_mask = ctx.mask.reshape(-1, ctx.mask.shape[-1]).expand(x.shape[0], -1).contiguous()
        qkv, proj, fc, fc2 = attn.qkv, attn.proj, ff.fc, ff.proj
        out = kernels().gpt2_layer(
            x.contiguous(), self.norm1.weight, self.norm1.bias, self.norm1.eps,
            qkv._panels.of(qkv.weight), qkv.bias, proj._panels.of(proj.weight), proj.bias,
            self.norm2.weight, self.norm2.bias, self.norm2.eps,
            fc._panels.of(fc.weight), fc.bias, fc2._panels.of(fc2.weight), fc2.bias,
            cache.keys[attn.layer_idx], cache.values[attn.layer_idx], cache.length, attn.n_heads, key_mask,
        )
        return out, None


def use_fused_layers(model: nn.Module) -> int:
    """Swap each fusable GPT-2 block of ``model`` for a :class:`FusedGPT2Block`; returns how many."""
    count = 0
    for i, block in enumerate(model.blocks):
        if fusable(block):
            model.blocks[i] = FusedGPT2Block(block)
            count += 1
    return count
