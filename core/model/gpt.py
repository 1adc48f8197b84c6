"""The transformer: GPT-2 (Radford et al., 2019) and Llama (Touvron et al., 2023).

Read top to bottom: a block is pre-norm attention plus pre-norm feed-forward,
each added back to the residual stream (the book's chapter 4); the model embeds
tokens, runs the blocks, normalises and projects to the vocabulary. The
``family`` in the config picks GPT-2's LayerNorm, GELU MLP and learned
positions, or Llama's RMSNorm, SwiGLU and rotary positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.model.attention import CausalSelfAttention
from core.model.config import ModelConfig
from core.model.kv_cache import KVCache
from core.model.layers import make_feed_forward, make_norm, make_position_embedding, rope_tables
from core.model.loss import linear_cross_entropy


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.norm2 = make_norm(cfg)
        self.ff = make_feed_forward(cfg)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(
            self.norm1(x), mask=ctx.mask, rope=ctx.rope, cache=ctx.cache, return_weights=ctx.return_attention
        )
        x = x + self.drop(attn_out)
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, weights


@dataclass
class ForwardContext:
    """What every block needs besides its input, computed once per forward pass."""

    positions: torch.Tensor  # (B, T) absolute position of each new token
    mask: torch.Tensor | None  # bool (B or 1, 1, T, S), or None for plain causal
    rope: tuple[torch.Tensor, torch.Tensor] | None
    cache: KVCache | None
    return_attention: bool = False


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = make_position_embedding(cfg)  # learned, sinusoidal, or None for rotary
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.out_head = None if cfg.tie_embeddings else nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.family == "llama":
            cos, sin = rope_tables(cfg)
            # Not persistent: derived from the config, so never stored in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layers) so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ff.proj.weight", "ff.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection; with tied embeddings it is the token embedding itself."""
        return self.tok_emb.weight if self.out_head is None else self.out_head.weight

    def num_parameters(self) -> int:
        # parameters() yields a shared (tied) tensor once, so this counts it once.
        return sum(p.numel() for p in self.parameters())

    # -- forward, in pieces so fine-tuning can run a suffix of the blocks ------

    def context(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> ForwardContext:
        """Positions, attention mask and rotary tables for one forward pass.

        attention_mask: (B, S) with 1 for real tokens and 0 for padding, covering
        the cached tokens and the new ones (S = cached + T).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        S = start + T
        device = input_ids.device
        if S > self.cfg.context_length:
            raise ValueError(f"sequence of {S} tokens exceeds the context length {self.cfg.context_length}")
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: count positions from each row's first real token.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            else:
                position_ids = torch.arange(start, S, device=device).expand(B, T)

        mask = None
        if attention_mask is not None or (start > 0 and T > 1) or return_attention:
            query_pos = torch.arange(start, S, device=device)
            mask = torch.arange(S, device=device)[None, :] <= query_pos[:, None]  # (T, S) causal
            if attention_mask is not None:
                # A padded query would see no key at all (softmax of all -inf = NaN),
                # so let every query see itself; padded outputs are ignored anyway.
                diagonal = torch.arange(S, device=device)[None, :] == query_pos[:, None]
                mask = (mask & attention_mask.bool()[:, None, :]) | diagonal
                mask = mask[:, None]  # (B, 1, T, S)
            else:
                mask = mask[None, None]  # (1, 1, T, S)

        return ForwardContext(position_ids, mask, self.rope_at(position_ids), cache, return_attention)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary (cos, sin) tables at (B, T) positions, each (B, 1, T, head_dim); None for GPT-2."""
        if self.cfg.family != "llama":
            return None
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def embed(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(ctx.positions)
        return self.drop(x)

    def run_blocks(
        self, x: torch.Tensor, ctx: ForwardContext, start: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attentions = []
        for block in self.blocks[start:]:
            x, weights = block(x, ctx)
            if weights is not None:
                attentions.append(weights)
        if ctx.cache is not None:
            ctx.cache.advance(x.shape[1])
        return x, attentions

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.final_norm(hidden), self.head_weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_attention: bool = False,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, vocab); with ``last_only`` just the last position's (B, 1, vocab),
        which saves the largest matmul of a decode step. With ``return_attention``
        also the per-layer attention weights, each (B, heads, T, S).

        With ``targets`` (B, T), the mean next-token cross-entropy instead of the
        logits, computed by ``core.model.loss`` without materialising them (training)."""
        ctx = self.context(
            input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
            return_attention=return_attention,
        )
        hidden, attentions = self.run_blocks(self.embed(input_ids, ctx), ctx)
        if targets is not None:
            return linear_cross_entropy(self.final_norm(hidden), self.head_weight, targets)
        if last_only:
            hidden = hidden[:, -1:]
        logits = self.logits(hidden)
        return (logits, attentions) if return_attention else logits

    def set_attention_path(self, path: str) -> None:
        """"sdpa" (fused kernels) or "explicit" (the book's masked softmax)."""
        if path not in ("sdpa", "explicit"):
            raise ValueError(f"unknown attention path {path!r}")
        for block in self.blocks:
            block.attn.path = path
