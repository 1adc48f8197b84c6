"""Causal multi-head self-attention (Vaswani et al., 2017; the book's chapter 3).

One module serves both families: GPT-2's multi-head attention is the special
case of grouped-query attention (Ainslie et al., 2023) with as many key/value
heads as query heads, and Llama adds rotary embeddings to queries and keys.

It has two paths that compute the same thing:
- ``explicit``: scores = QK^T / sqrt(d), mask, softmax, times V. It is the
  version the book teaches, and the only one that can hand back the attention
  weights (the Lab draws them).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which picks a
  fused kernel (flash / memory-efficient) and is what training and serving use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.model.config import ModelConfig
from core.model.kv_cache import KVCache
from core.model.layers import apply_rope


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # Fused projection: one matmul for Q, K and V instead of three.
        # Rows are all query heads, then key heads, then value heads.
        self.qkv = nn.Linear(cfg.emb_dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, cfg.emb_dim, bias=cfg.family == "gpt2")
        self.dropout = cfg.drop_rate
        self.attn_drop = nn.Dropout(cfg.drop_rate)
        self.use_rope = cfg.family == "llama"
        # How queries and keys are rotated; core.fast.transforms may swap in one fused kernel call (core.fast.fused_ops).
        self.rotate = apply_rope
        self.path = "sdpa"  # or "explicit"; see module docstring

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, d). mask: bool (B or 1, 1, T, S), True where a query may attend;
        None means plain causal attention over x alone (no cache, no padding)."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)  # the heads, side by side
        if self.use_rope:
            # Queries and keys turn by the same angles: rotate both in one pass.
            cos, sin = (t.transpose(1, 2) for t in rope)  # (B, T, 1, head_dim), one angle set per token
            q, k = self.rotate(qkv[:, :, : H + KV], cos, sin).split([H, KV], dim=2)
        else:
            q, k = qkv[:, :, :H], qkv[:, :, H : H + KV]
        v = qkv[:, :, H + KV :]
        # (B, T, heads, head_dim) -> (B, heads, T, head_dim): heads become a batch dimension.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)

        weights = None
        if self.path == "explicit" or return_weights:
            out, weights = self._explicit(q, k, v, mask)
        else:
            out = nn.functional.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1,
                # Grouped-query heads read their shared key/value head in place, no copies.
                enable_gqa=KV != H,
            )
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(out), weights

    def _explicit(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_kv_heads != self.n_heads:
            # Each key/value head serves a group of consecutive query heads.
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        T, S = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, S)
        if mask is None:
            # Query i sits at absolute position S - T + i and may see keys up to it.
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.attn_drop(weights) @ v, weights
