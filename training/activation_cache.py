"""The frozen-prefix activation cache shared by the fine-tuning jobs (the book's chapters 6 and 7).

When only the last blocks of a model train (section 6.5's "freeze all but the
last N"), the frozen prefix ``blocks[:start]`` computes the same activations
for an example in every epoch. The spam and instruction jobs therefore run the
prefix once per example (in eval mode, without gradients), keep its output,
and train only the suffix on it. With causal attention each example is cached
at its own length; batches pad the cached activations on the right, which
cannot reach the real tokens, so the result equals the uncached forward pass
(tests/training/test_finetune_spam.py and test_finetune_instruct.py check it).
"""

from __future__ import annotations

import torch

from core.model import GPTModel


def pad_ids(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right into one (B, longest) tensor, and each row's real length."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def prefix_activations(backbone: GPTModel, encoded: list[list[int]], stop_block: int, batch_size: int = 32) -> list[torch.Tensor]:
    """Output of blocks[:stop_block] for each sequence, (len_i, d) each, computed in eval mode.

    Sequences are run in length-sorted batches (little padding); each row is
    then cut back to its real length, which right padding cannot have changed
    because attention is causal.
    """
    was_training = backbone.training
    backbone.eval()
    out: list[torch.Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(backbone.parameters()).device
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, _ = pad_ids([encoded[i] for i in rows], pad_id=0)
        ids = ids.to(device)
        ctx = backbone.context(ids)
        x = backbone.embed(ids, ctx)
        # core's run_blocks runs a suffix; the prefix is the complementary slice.
        for block in backbone.blocks[:stop_block]:
            x, _ = block(x, ctx)
        for row, i in enumerate(rows):
            out[i] = x[row, : len(encoded[i])].clone()
    backbone.train(was_training)
    return out  # type: ignore[return-value]
