"""A spam classifier built by hand whose answer is known: some tokens are spam words, the rest are not.

One GPT-2-style block over 8-dimensional embeddings. Every ordinary token embeds as e1, every
spam token as 3 e0; attention is uniform over the prefix (zero queries and keys) and copies its
input (identity values and output), the feed-forward part is zero, and the head reads e0 after
the final LayerNorm: spam log-odds = 2 x the normalised e0 component at the last token. A spam
word therefore raises the log-odds and an ordinary word lowers them, and removing one moves the
verdict the other way. Tests of explanations use it to check signs against a known truth.
"""

from __future__ import annotations

import torch

from core.classifier import SequenceClassifier
from core.model import GPTModel
from core.model.config import ModelConfig

DIM = 8


def keyword_classifier(spam_ids: set[int], vocab_size: int = 50257, context_length: int = 128) -> SequenceClassifier:
    cfg = ModelConfig(family="gpt2", vocab_size=vocab_size, context_length=context_length, emb_dim=DIM, n_layers=1,
                      n_heads=1, hidden_dim=DIM, qkv_bias=True)
    model = SequenceClassifier(GPTModel(cfg), num_classes=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if ("norm" in name and name.endswith("weight")) else torch.zeros_like(p))
        backbone = model.backbone
        backbone.tok_emb.weight[:, 1] = 1.0
        for i in spam_ids:
            backbone.tok_emb.weight[i] = 0.0
            backbone.tok_emb.weight[i, 0] = 3.0
        attn = backbone.blocks[0].attn
        attn.qkv.weight[2 * DIM :] = torch.eye(DIM)  # values: the input itself
        attn.proj.weight.copy_(torch.eye(DIM))
        model.head.weight[1, 0], model.head.weight[0, 0] = 1.0, -1.0  # rows: ham, spam
    return model


SPAM_WORDS = (" FREE", " prize", " claim")


def save_keyword_classifier(path, tokenizer, words=SPAM_WORDS, **metadata) -> tuple[object, set[int]]:
    """A keyword classifier checkpoint whose spam tokens are the first tokens of ``words``; returns (path, spam ids)."""
    from core.weights.checkpoint import save_checkpoint

    spam_ids = {tokenizer.encode(w)[0] for w in words}
    saved = save_checkpoint(path, keyword_classifier(spam_ids), tokenizer, task="classification",
                            labels=["ham", "spam"], metadata={"name": "keyword-spam", **metadata})
    return saved, spam_ids
