"""Tiny seeded models for the decoding tests: fused layers, speculative decoding, CUDA graphs, prefix caching."""

from __future__ import annotations

import torch

from core.model.config import ModelConfig
from core.model import GPTModel


def seeded(cfg: ModelConfig, head_scale: float = 8.0, device: str = "cpu") -> GPTModel:
    """The model for ``cfg`` from seed 0, in eval mode. ``head_scale`` > 1 gives trained-looking
    logits, so greedy decoding is not a coin toss between near-ties."""
    torch.manual_seed(0)
    model = GPTModel(cfg).eval().to(device)
    with torch.no_grad():
        model.head_weight.mul_(head_scale)
    return model


def tiny_gpt2(head_scale: float = 8.0, **kw) -> GPTModel:
    """Two layers. head_dim 12 and hidden_dim 200: neither a multiple of 16, so the kernels'
    partial vectors are exercised."""
    base = dict(family="gpt2", vocab_size=500, context_length=40, emb_dim=48, n_layers=2, n_heads=4, hidden_dim=200,
                qkv_bias=True)
    return seeded(ModelConfig(**{**base, **kw}), head_scale)


def tiny_model(family: str, context_length: int = 40, device: str = "cpu") -> GPTModel:
    """GPT-2 or Llama (grouped-query, two key/value heads), two layers."""
    extra = dict(n_kv_heads=2, hidden_dim=48) if family == "llama" else {}
    cfg = ModelConfig(family=family, vocab_size=97, context_length=context_length, emb_dim=32, n_layers=2, n_heads=4,
                      **extra)
    return seeded(cfg, device=device)
