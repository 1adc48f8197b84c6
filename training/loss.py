"""The next-token loss of every training job (the book's ``calc_loss_batch``, chapter 5).

Pretraining, instruction fine-tuning and ``evaluate lm`` all take the mean
cross-entropy of the next token through ``core.model.loss.linear_cross_entropy``,
which never keeps the (tokens x vocabulary) logits. Targets equal to
``IGNORE_INDEX`` (padding; the prompt under ``--mask-prompt``, the book's
section 7.3) do not count.
"""

from __future__ import annotations

import torch

from core.model.loss import IGNORE_INDEX, linear_cross_entropy


def lm_loss(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    prefix: torch.Tensor | None = None,
    start: int = 0,
    skip_ignored: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``inputs`` (B, T) against ``targets`` (B, T).

    ``prefix`` is the cached output of ``blocks[:start]`` for ``inputs``
    (``training.activation_cache``, padded like them); with it only the
    remaining blocks run. ``skip_ignored`` leaves positions without a target
    out before the vocabulary projection, the largest matmul of a small model:
    worth it where many are padding or prompt, but the boolean selection waits
    for the device, so pretraining (every position a target) does not ask.
    """
    if prefix is None and not skip_ignored:
        # Through forward(): a DistributedDataParallel wrapper arms its gradient all-reduce there.
        return model(inputs, targets=targets)
    ctx = model.context(inputs)
    hidden = model.embed(inputs, ctx) if prefix is None else prefix
    hidden, _ = model.run_blocks(hidden, ctx, start=0 if prefix is None else start)
    if skip_ignored:
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
    return linear_cross_entropy(model.final_norm(hidden), model.head_weight, targets)
