"""A tiny GPT-2 for the tests of the fused decoding layers and of speculative decoding."""

from __future__ import annotations

import torch

from core.config import ModelConfig
from core.model import GPTModel


def tiny_gpt2(head_scale: float = 8.0, **kw) -> GPTModel:
    """Two layers, seeded. head_dim 12 and hidden_dim 200: neither a multiple of 16, so the kernels'
    partial vectors are exercised. ``head_scale`` > 1 gives trained-looking logits, so greedy
    decoding is not a coin toss between near-ties."""
    torch.manual_seed(0)
    base = dict(family="gpt2", vocab_size=500, context_length=40, emb_dim=48, n_layers=2, n_heads=4, hidden_dim=200,
                qkv_bias=True)
    base.update(kw)
    model = GPTModel(ModelConfig(**base)).eval()
    with torch.no_grad():
        model.head_weight.mul_(head_scale)
    return model
