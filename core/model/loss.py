"""Next-token cross-entropy fused with the output projection.

The book's ``calc_loss_batch`` (chapter 5) projects every position to the
vocabulary and hands the logits to ``cross_entropy``. For GPT-2 that is a
(tokens x 50,257) matrix: under bf16 autocast it is written in bf16, copied to
fp32 for a stable softmax, log-softmaxed into a third matrix, and in backward
a zero-filled gradient, the log-softmax backward and a copy back to bf16 follow,
all passes over hundreds of megabytes that do no arithmetic worth the name.

Here the forward pass computes the loss *and* its gradient with respect to the
logits in one sweep over row chunks small enough to stay in cache
(softmax minus one-hot, divided by the number of counted targets; the same
idea as Liger Kernel's fused linear cross-entropy, Hsu et al., 2024), writing
that gradient over the logits' own buffer. Backward is then just the two
matrix products of a linear layer. The loss and gradients equal
``F.cross_entropy(hidden @ weight.T, targets)`` to rounding (tested).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ROWS = 64  # 64 x 50,257 fp32 is 13 MB: one chunk at a time stays near the cache


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_enabled: bool) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        device = hidden.device.type
        h, w = hidden.to(dtype), weight.to(dtype)
        # needs_input_grad is set even under torch.no_grad(), hence the caller's grad mode too.
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with torch.autocast(device, enabled=False):
            logits = h @ w.t()  # (N, V); becomes dL/dlogits in place below
        counted = targets != IGNORE_INDEX
        n_counted = counted.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0)
        softmax_dtype = torch.promote_types(dtype, torch.float32)  # at least fp32 for a stable softmax
        total = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            chunk = logits[rows].to(softmax_dtype)
            lse = torch.logsumexp(chunk, dim=-1)
            target_logit = chunk.gather(1, safe_targets[rows, None]).squeeze(1)
            total += ((lse - target_logit) * counted[rows]).sum()
            if need_grad:
                # softmax - one_hot(target), over the counted rows, scaled for the mean
                chunk.sub_(lse[:, None]).exp_()
                chunk.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(lse)[:, None])
                chunk.mul_((counted[rows].to(softmax_dtype) / n_counted)[:, None])
                logits[rows] = chunk
        if need_grad:
            ctx.save_for_backward(h, w, logits)
            ctx.input_dtypes = (hidden.dtype, weight.dtype)
        return total / n_counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        h, w, grad_logits = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        scale = grad_loss.to(grad_logits.dtype)
        grad_hidden = grad_weight = None
        with torch.autocast(h.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_logits @ w).mul_(scale).to(hidden_dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_logits.t() @ h).mul_(scale).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, without keeping the logits.

    hidden: (..., D); weight: (V, D); targets: (...) token ids, ``-100`` for positions not counted.
    Runs in the autocast dtype when autocast is on (the softmax always in fp32).
    """
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), torch.is_grad_enabled())
