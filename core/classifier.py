"""A language model turned into a text classifier (the book's chapter 6).

The output head over the vocabulary is replaced by a small head over the
classes, read at the last real token: with causal attention it is the only
position that has seen the whole text. Right padding after it changes
nothing, because no earlier position attends to later ones.

Serving many short texts at once, padding every row to the longest text
wastes most of the arithmetic (SMS messages: 2.4 tokens computed per real
token in batches of ten). :func:`classify` therefore *packs* texts: several
texts share one row, back to back, and a block-diagonal causal mask keeps
each text from seeing its neighbours, with positions restarting at 0 for each
text. This is sequence packing as used to pre-train on mixed-length
documents (Krell et al., 2021, "Efficient Sequence Packing without
Cross-contamination"); every text computes exactly what it would alone.
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

    def forward_packed(self, batch: "PackedBatch") -> torch.Tensor:
        """Class logits (N, classes) of the N texts packed in ``batch``, in their original order."""
        backbone = self.backbone
        # The context computes the positions' embeddings or rotary tables; the mask is the packing's.
        ctx = backbone.context(batch.ids, position_ids=batch.positions)
        ctx.mask = batch.mask()
        hidden, _ = backbone.run_blocks(backbone.embed(batch.ids, ctx), ctx)
        picked = hidden[batch.last_row, batch.last_col]
        return self.head(backbone.final_norm(picked))

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


class ThresholdError(ValueError):
    """A classifier checkpoint whose stored decision threshold cannot be used."""


def decision_threshold(checkpoint) -> float | None:
    """The probability of the last label (the positive class: "spam") at or above which a text
    gets that label, as the fine-tuning job chose it on validation data; None: the most likely label wins.

    Training on balanced data and deciding by argmax puts the cut wherever the loss left it;
    the job stores the cut that keeps validation precision, so every caller decides alike."""
    value = (checkpoint.metadata or {}).get("threshold")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ThresholdError(f"classifier {checkpoint.name!r}: stored threshold {value!r} is not a probability in (0, 1)")
    if len(checkpoint.labels or []) < 2:
        raise ThresholdError(f"classifier {checkpoint.name!r}: a threshold needs at least two labels")
    return float(value)


def decide(probabilities: list[float], threshold: float | None) -> int:
    """Index of the predicted label: the last one when its probability reaches ``threshold``,
    else the most likely of the others; with no threshold, the most likely of all."""
    if threshold is None:
        return max(range(len(probabilities)), key=probabilities.__getitem__)
    if probabilities[-1] >= threshold:
        return len(probabilities) - 1
    return max(range(len(probabilities) - 1), key=probabilities.__getitem__)


def encode_texts(tokenizer, texts: list[str], max_length: int, pad_id: int) -> list[list[int]]:
    """Token ids of each text, cut to its first ``max_length`` tokens; an empty text becomes ``[pad_id]``.

    Texts are data, not markup: "<|endoftext|>" inside a message is encoded as
    the characters it is made of, never as the control token.
    """
    return [tokenizer.encode_ordinary(t)[:max_length] or [pad_id] for t in texts]


@dataclass
class PackedBatch:
    """Texts laid back to back in rows of at most ``capacity`` tokens (a longer text gets a row of its own).

    ``segments`` numbers the texts within each row (-1 for the padding that
    evens out the rows); text i ends at ``ids[last_row[i], last_col[i]]``.
    """

    ids: torch.Tensor  # (R, T)
    positions: torch.Tensor  # (R, T), restarting at 0 for each text
    segments: torch.Tensor  # (R, T)
    last_row: torch.Tensor  # (N,)
    last_col: torch.Tensor  # (N,)

    def mask(self) -> torch.Tensor:
        """(R, 1, T, T) bool: a token sees the earlier tokens of its own text, and itself.

        Padding forms one segment of its own, so a padded query still sees
        itself (a query with no key would give a NaN softmax) and no real token
        sees it."""
        T = self.ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.ids.device).tril()
        same_text = self.segments[:, :, None] == self.segments[:, None, :]
        return (same_text & causal)[:, None]

    @property
    def real_tokens(self) -> int:
        return int((self.segments >= 0).sum())


def pack_texts(encoded: list[list[int]], capacity: int, pad_id: int) -> PackedBatch:
    """First-fit decreasing: each text, longest first, goes into the first row with room for it.

    Rows come out nearly full, so padding is at most the last row's slack
    spread over the others; ``capacity`` bounds the row length, which keeps the
    attention's T x T work small next to the linear layers'.
    """
    if not encoded:
        raise ValueError("pack_texts: no texts to pack")
    if capacity < 1:
        raise ValueError(f"pack_texts: capacity must be at least 1 token, got {capacity}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(encoded[i])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity, n) - n)
    width = max(sum(len(encoded[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    last_row = torch.empty(len(encoded), dtype=torch.long)
    last_col = torch.empty(len(encoded), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for s, i in enumerate(row):
            n = len(encoded[i])
            ids[r, col : col + n] = torch.tensor(encoded[i])
            positions[r, col : col + n] = torch.arange(n)
            segments[r, col : col + n] = s
            last_row[i], last_col[i] = r, col + n - 1
            col += n
    return PackedBatch(ids, positions, segments, last_row, last_col)


@torch.inference_mode()
def class_logits(model: SequenceClassifier, encoded: list[list[int]], pad_id: int, batch_size: int = 32,
                 pack_tokens: int | None = 512) -> torch.Tensor:
    """(N, classes) float64 logits of already encoded texts, ``batch_size`` texts per forward pass.

    With ``pack_tokens`` each group is packed into rows of at most that many tokens
    (:func:`pack_texts`), so no padding is computed; ``None`` pads each text to the group's
    longest instead (the book's way). Both give the same results up to float rounding.
    """
    device = next(model.parameters()).device
    # A packed row is one sequence to the model, so it must fit the context window.
    capacity = min(pack_tokens, model.cfg.context_length) if pack_tokens is not None else None
    out = []
    for i in range(0, len(encoded), batch_size):
        group = encoded[i : i + batch_size]
        if capacity is None:
            ids = nn.utils.rnn.pad_sequence([torch.tensor(e) for e in group], batch_first=True, padding_value=pad_id)
            logits = model(ids.to(device), torch.tensor([len(e) for e in group], device=device))
        else:
            logits = model.forward_packed(_to(pack_texts(group, capacity, pad_id), device))
        # float64: a threshold near 0 or 1 must not be blurred by float32 rounding.
        out.append(logits.double().cpu())
    return torch.cat(out)


def classify(checkpoint, texts: list[str], batch_size: int = 32, pack_tokens: int | None = 512) -> list[Prediction]:
    """Label and class probabilities for each text, with a checkpoint of task "classification".

    The label follows the checkpoint's stored threshold (:func:`decision_threshold`) when it
    has one. Texts are cut to the checkpoint's ``max_length`` tokens and run through
    :func:`class_logits`.
    """
    labels = checkpoint.labels
    threshold = decision_threshold(checkpoint)
    max_length = int(checkpoint.metadata.get("max_length") or checkpoint.model.cfg.context_length)
    pad_id = checkpoint.tokenizer.eos_id
    encoded = encode_texts(checkpoint.tokenizer, texts, max_length, pad_id)
    probabilities = class_logits(checkpoint.model, encoded, pad_id, batch_size, pack_tokens).softmax(-1).tolist()
    return [Prediction(labels[decide(row, threshold)], dict(zip(labels, row))) for row in probabilities]


def _to(batch: PackedBatch, device: torch.device) -> PackedBatch:
    if batch.ids.device == device:
        return batch
    return PackedBatch(*(t.to(device) for t in (batch.ids, batch.positions, batch.segments, batch.last_row, batch.last_col)))
