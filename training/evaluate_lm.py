"""``scratchgpt evaluate lm``: mean next-token loss and perplexity of a checkpoint on some text.

The book's chapter 5 ``calc_loss_loader`` over a whole file instead of a few
batches: the tokens are cut into consecutive windows of the model's context
(each window's last token starts the next), so every token after the first is
predicted exactly once, and the loss is averaged over tokens, not windows.
Perplexity is exp(mean loss). Works on any checkpoint ``core`` loads: GPT-2
or Llama family, with the checkpoint's own tokenizer.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data import DataError, TokenFile
from training.loss import lm_loss
from training.pretrain_data import is_token_file, read_text


@dataclass
class EvaluateLMConfig:
    checkpoint: Path | None = field(default=None, metadata={"help": "checkpoint directory (core format)"})
    data: Path | None = field(default=None, metadata={"help": "a text file, a token file, or a `scratchgpt prepare` directory (its val.bin)"})
    context_length: int | None = field(default=None, metadata={"help": "window length; default: the model's context length"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    max_tokens: int | None = field(default=None, metadata={"help": "evaluate only the first N tokens"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 autocast", "choices": ("fp32", "bf16")})


def load_eval_tokens(data: Path, tokenizer, vocab_size: int) -> np.ndarray:
    data = Path(data)
    if data.is_dir():
        if not (data / "val.bin").is_file():
            raise DataError(f"--data {data}: a directory must be a `scratchgpt prepare` output with val.bin")
        data = data / "val.bin"
    if not data.exists():
        raise DataError(f"--data {data}: no such file")
    if is_token_file(data):
        tf = TokenFile(data)
        declared = tf.header.get("vocab_size")
        if declared is not None and int(declared) != vocab_size:
            raise DataError(
                f"{data} was tokenized with a {declared}-token vocabulary ({tf.header.get('tokenizer')}), "
                f"the checkpoint's has {vocab_size}; prepare the text with the checkpoint's tokenizer or pass the text file"
            )
        ids = np.asarray(tf.ids, dtype=np.int64)
    else:
        ids = np.asarray(tokenizer.encode(read_text(data)), dtype=np.int64)
    if ids.size and int(ids.max()) >= vocab_size:
        raise DataError(f"{data} holds token id {int(ids.max())}, outside the checkpoint's vocabulary of {vocab_size}")
    return ids


@torch.no_grad()
def token_losses(model: torch.nn.Module, ids: np.ndarray, context: int, batch_size: int, device: torch.device, precision: str) -> tuple[float, int]:
    """(sum of next-token losses, number of predicted tokens) over consecutive windows."""
    if len(ids) < 2:
        raise DataError(f"the data has {len(ids)} token(s); at least 2 are needed to predict one")
    starts = list(range(0, len(ids) - 1, context))
    full = [s for s in starts if s + context + 1 <= len(ids)]
    tail = [s for s in starts if s + context + 1 > len(ids)]
    total, count = 0.0, 0
    tokens = torch.from_numpy(ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device.type, enabled=False)
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
    for group in groups:
        n = min(context, len(ids) - 1 - group[0])
        chunk = torch.stack([tokens[s : s + n + 1] for s in group]).to(device)
        targets = chunk[:, 1:]
        with autocast:
            loss = lm_loss(model, chunk[:, :-1], targets)
        total += float(loss) * targets.numel()  # the mean back to a sum, so windows weigh by their tokens
        count += targets.numel()
    return total, count


def evaluate_lm(
    checkpoint: Path,
    data: Path,
    *,
    context_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Mean loss and perplexity of ``checkpoint`` on ``data``: {"tokens", "loss", "perplexity", ...}."""
    from core.weights.checkpoint import load_checkpoint
    from core.device import resolve_device

    dev = resolve_device(device, allow_mps=True)
    ckpt = load_checkpoint(checkpoint, device=dev)
    if ckpt.task != "causal-lm":
        raise DataError(f"{checkpoint} is a {ckpt.task} checkpoint; language-model evaluation needs a causal-lm checkpoint")
    model = ckpt.model.eval()
    model_context = ckpt.config.context_length
    context = min(context_length or model_context, model_context)
    ids = load_eval_tokens(data, ckpt.tokenizer, ckpt.config.vocab_size)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    t0 = time.perf_counter()
    total, count = token_losses(model, ids, context, batch_size, dev, precision)
    loss = total / count
    return {
        "checkpoint": str(checkpoint), "data": str(data), "tokens": count, "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)), "context_length": context,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_evaluate_lm(cfg: EvaluateLMConfig) -> dict[str, Any]:
    """The CLI verb: evaluate and print the result as JSON."""
    if cfg.checkpoint is None or cfg.data is None:
        raise DataError("both --checkpoint and --data are required")
    result = evaluate_lm(
        cfg.checkpoint, cfg.data, context_length=cfg.context_length, batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens, device=cfg.device, precision=cfg.precision,
    )
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    from training.job_config import run_job_main

    return run_job_main(EvaluateLMConfig, run_evaluate_lm, argv, "python -m training.evaluate_lm", __doc__)


if __name__ == "__main__":
    sys.exit(main())
