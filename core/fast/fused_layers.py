"""A transformer layer of a decoding step as one C++ call.

At one token per sequence, a layer is a few matrix products and some twenty
small operations around them (two norms, the split into heads, rotary
embedding, the cache write, attention over the cache, the activation, two
residual additions), each a torch call and most a Python module call too.
Once the products read their weights at memory speed, those small calls are a
large share of a decoding step (docs/performance.md): dispatch, not arithmetic.
``core/fast/csrc/decode_layer.cpp`` does the whole layer, products included, in
one call:

- GPT-2 layers whose linear layers carry panels (``core.fast.panels``),
- Llama layers whose linear layers decode from GGUF blocks (``core.fast.gguf_matvec``).

:class:`FusedGPT2Block` and :class:`FusedLlamaBlock` are the model's own
``TransformerBlock`` (the same submodules, parameters and state-dict names)
whose forward takes that call when it applies: fp32 on the CPU, inference,
one new token for up to eight sequences (GPT-2: up to eight new tokens in all,
for speculative decoding's verifying pass), a KV cache, and the weights still
the ones the panels or blocks hold. Everything else (longer prompts, training,
returned attention weights, the book's explicit attention path, another dtype)
runs the block's own code. A fused layer agrees with it to fp32 rounding
(tested), not bit for bit: its norms, softmax and activations round in their
own order.
"""

from __future__ import annotations

import torch
from torch import nn

from core.fast.gguf_matvec import GGUFLinear
from core.fast.kernels import load_kernels, weight_key
from core.fast.packed import PackedLinear
from core.fast.panels import MAX_ROWS
from core.model import ForwardContext, TransformerBlock
from core.model.layers import FeedForward, LayerNorm, RMSNorm, SwiGLU


def kernels():
    """The compiled ``gpt2_layer`` and ``llama_layer``; raises FastPathError saying why they cannot be had."""
    return load_kernels("decode_layer")


class _FusedBlock(TransformerBlock):
    """What both fused blocks share: the wrapped block's submodules, and when the kernel applies."""

    several_tokens = False  # whether the kernel takes more than one new token per sequence

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
            (T == 1 or self.several_tokens) and B * T <= MAX_ROWS and cache is not None and not ctx.return_attention
            and x.dtype == torch.float32 and x.device.type == "cpu" and cache.keys.dtype == torch.float32
            and not self.training and self.attn.path == "sdpa"
            and not (torch.is_grad_enabled() and (x.requires_grad or self.norm1.weight.requires_grad))
        )

    @staticmethod
    def _key_mask(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        # (B or 1, 1, T, S), True where a key may be seen, as one row per new token (B T, S).
        if ctx.mask is None:
            return None  # plain causal: the kernel lets each token see the cache up to its own position
        B, T, S = x.shape[0], x.shape[1], ctx.mask.shape[-1]
        return ctx.mask.expand(B, 1, T, S).reshape(B * T, S).contiguous()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._applies(x, ctx):
            return super().forward(x, ctx)
        return self._fused(x.contiguous(), ctx, self._key_mask(x, ctx)), None


class FusedGPT2Block(_FusedBlock):
    """A GPT-2 ``TransformerBlock`` whose linear layers carry panels, one kernel call per decoding step.

    It also takes several new tokens of a sequence (up to eight rows in all): the verifying
    pass of speculative decoding (``core.fast.speculative``), and short prompts."""

    several_tokens = True

    @staticmethod
    def fits(block: nn.Module) -> bool:
        if type(block) is not TransformerBlock or not isinstance(block.ff, FeedForward) or block.attn.use_rope:
            return False
        if not (isinstance(block.norm1, LayerNorm) and isinstance(block.norm2, LayerNorm)):
            return False
        return block.attn.n_kv_heads == block.attn.n_heads and all(
            isinstance(m, PackedLinear) and m._panels is not None for m in gpt2_linears(block))

    def linears(self) -> tuple[nn.Module, ...]:
        return gpt2_linears(self)

    def _fused(self, x: torch.Tensor, ctx: ForwardContext, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.decode(x, ctx.cache, ctx.cache.length, key_mask)

    def decode(self, x: torch.Tensor, cache, position: int, key_mask: torch.Tensor | None = None,
               panels: list | None = None) -> torch.Tensor:
        """The layer for T new tokens per sequence, x (B, T, d) fp32 with B T <= 8, their keys and
        values written into ``cache`` from ``position`` on. ``panels``: four ``Panels`` to read the
        weights from instead of the layers' own (``core.fast.speculative``'s draft passes int8 ones)."""
        linears = self.linears()
        weights = [(p or m._panels).of(m.weight) for m, p in zip(linears, panels or [None] * 4)]
        qkv, proj, fc, fc2 = linears
        layer = self.attn.layer_idx
        return kernels().gpt2_layer(
            x, self.norm1.weight, self.norm1.bias, self.norm1.eps, weights[0], qkv.bias, weights[1], proj.bias,
            self.norm2.weight, self.norm2.bias, self.norm2.eps, weights[2], fc.bias, weights[3], fc2.bias,
            cache.keys[layer], cache.values[layer], position, self.attn.n_heads, key_mask,
        )


class FusedLlamaBlock(_FusedBlock):
    """A Llama ``TransformerBlock`` whose linear layers decode from GGUF blocks, one kernel call per decoding step."""

    @staticmethod
    def fits(block: nn.Module) -> bool:
        if type(block) is not TransformerBlock or not isinstance(block.ff, SwiGLU) or not block.attn.use_rope:
            return False
        if not (isinstance(block.norm1, RMSNorm) and isinstance(block.norm2, RMSNorm)):
            return False
        return all(isinstance(m, GGUFLinear) and m.bias is None for m in llama_linears(block))

    def _applies(self, x: torch.Tensor, ctx: ForwardContext) -> bool:
        # ... and every weight still the one its blocks hold (not fine-tuned or reloaded since).
        return super()._applies(x, ctx) and ctx.rope is not None and all(
            m._blocks.key == weight_key(m.weight) for m in llama_linears(self))

    def _fused(self, x: torch.Tensor, ctx: ForwardContext, key_mask: torch.Tensor | None) -> torch.Tensor:
        attn, cache = self.attn, ctx.cache
        cos, sin = (t.reshape(x.shape[0], -1).contiguous() for t in ctx.rope)  # (B, 1, 1, head_dim) -> (B, head_dim)
        blocks = [_streams(m) for m in llama_linears(self)]
        return kernels().llama_layer(
            x, self.norm1.weight, self.norm1.eps, blocks[0], blocks[1], self.norm2.weight, self.norm2.eps,
            *blocks[2:], cache.keys[attn.layer_idx], cache.values[attn.layer_idx], cache.length,
            attn.n_heads, attn.n_kv_heads, cos, sin, key_mask,
        )


def gpt2_linears(block: nn.Module) -> tuple[nn.Module, ...]:
    """A GPT-2 block's linear layers in the kernel's order: qkv, proj, fc, fc2."""
    return block.attn.qkv, block.attn.proj, block.ff.fc, block.ff.proj


def llama_linears(block: nn.Module) -> tuple[nn.Module, ...]:
    """A Llama block's linear layers in the kernel's order: qkv, o, gate, up, down."""
    return block.attn.qkv, block.attn.proj, block.ff.gate, block.ff.up, block.ff.down


def _streams(linear: nn.Module) -> list[torch.Tensor]:
    matrix = linear._blocks.matrix
    return [matrix.qs, matrix.d] + ([matrix.m] if matrix.m is not None else [])


FUSED_BLOCKS = (FusedGPT2Block, FusedLlamaBlock)


def fusable(block: nn.Module) -> bool:
    """Whether ``block`` can run its decoding steps as one kernel call (its weights as panels or GGUF blocks)."""
    return any(kind.fits(block) for kind in FUSED_BLOCKS)


def use_fused_layers(model: nn.Module) -> int:
    """Swap each fusable block of ``model`` for its fused twin; returns how many."""
    count = 0
    for i, block in enumerate(model.blocks):
        for kind in FUSED_BLOCKS:
            if kind.fits(block):
                model.blocks[i] = kind(block)
                count += 1
                break
    return count
