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

from core.config import ModelConfig
from core.kv_cache import KVCache
from core.layers import apply_rope


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
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): heads become a batch dimension.
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.n_kv_heads != self.n_heads:
            # Each key/value head serves a group of consecutive query heads.
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)

        weights = None
        if self.path == "explicit" or return_weights:
            out, weights = self._explicit(q, k, v, mask)
        else:
            out = nn.functional.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1,
            )
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(out), weights

    def _explicit(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, S = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, S)
        if mask is None:
            # Query i sits at absolute position S - T + i and may see keys up to it.
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.attn_drop(weights) @ v, weights
