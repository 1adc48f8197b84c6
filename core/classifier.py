"""A language model turned into a text classifier (the book's chapter 6).

The output head over the vocabulary is replaced by a small head over the
classes, read at the last real token: with causal attention it is the only
position that has seen the whole text. Right padding after it changes
nothing, because no earlier position attends to later ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.model import ForwardContext, GPTModel


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: GPTModel, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        if backbone.out_head is not None:
            backbone.out_head = None  # the vocabulary head is not used by a classifier
        self.head = nn.Linear(backbone.cfg.emb_dim, num_classes)

    @property
    def cfg(self):
        return self.backbone.cfg

    def classify_hidden(self, hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Class logits from the last block's output (B, T, d) at each row's last real token."""
        B, T = hidden.shape[:2]
        if lengths is None:
            last = torch.full((B,), T - 1, device=hidden.device)
        else:
            last = lengths.to(hidden.device) - 1
        picked = hidden[torch.arange(B, device=hidden.device), last]
        return self.head(self.backbone.final_norm(picked))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), right-padded; lengths (B,) real tokens per row. Returns (B, classes)."""
        ctx = self.backbone.context(input_ids)
        hidden, _ = self.backbone.run_blocks(self.backbone.embed(input_ids, ctx), ctx)
        return self.classify_hidden(hidden, lengths)

    def forward_from(self, hidden: torch.Tensor, start_block: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks[start_block:] on a cached prefix activation (frozen-prefix fine-tuning)."""
        # The context only needs the shape and device of the token ids.
        ctx: ForwardContext = self.backbone.context(hidden.new_zeros(hidden.shape[:2], dtype=torch.long))
        out, _ = self.backbone.run_blocks(hidden, ctx, start=start_block)
        return self.classify_hidden(out, lengths)


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]


def encode_batch(tokenizer, texts: list[str], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and true lengths; texts longer than max_length keep their first tokens.

    Texts are data, not markup: "<|endoftext|>" inside a message is encoded as
    the characters it is made of, never as the control token.
    """
    encoded = [tokenizer.encode_ordinary(t)[:max_length] or [pad_id] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
    return ids, torch.tensor([len(e) for e in encoded])


@torch.inference_mode()
def classify(checkpoint, texts: list[str], batch_size: int = 32) -> list[Prediction]:
    """Label and class probabilities for each text, with a checkpoint of task "classification"."""
    model: SequenceClassifier = checkpoint.model
    labels = checkpoint.labels
    max_length = int(checkpoint.metadata.get("max_length") or model.cfg.context_length)
    device = next(model.parameters()).device
    predictions = []
    for i in range(0, len(texts), batch_size):
        ids, lengths = encode_batch(checkpoint.tokenizer, texts[i : i + batch_size], max_length, checkpoint.tokenizer.eos_id)
        probs = model(ids.to(device), lengths.to(device)).float().softmax(-1).cpu()
        for row in probs.tolist():
            best = max(range(len(labels)), key=row.__getitem__)
            predictions.append(Prediction(labels[best], dict(zip(labels, row))))
    return predictions
