"""Instruction fine-tuning (the book's chapter 7), in full or with LoRA (appendix E).

``scratchgpt finetune instruct --base BASE --data PATH --out DIR``

Entries are rendered through the chat template the model will be served with
(the base's own, or Alpaca for a GPT-2 base without one), batched by
``training.instruct_data.collate`` and trained with next-token cross-entropy.
The loss is computed only at positions that have a target, which skips the
vocabulary projection (the largest matmul of a small model) for padding and,
with ``--mask-prompt``, for the prompt.

With ``--method lora`` the base is frozen and low-rank adapters train; they
are merged into plain weights before saving, so the checkpoint loads and runs
like any other.

Outputs in ``--out``: the checkpoint, ``loss.png``, ``metrics.json`` and
``test_responses.json`` (the test split in the book's format with
``model_response``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.chat_template import ALPACA, BUILTIN, ChatTemplate
from core.checkpoint import save_checkpoint, write_json
from core.download import sha256_file
from training.base_model import load_base, resolve_base, resolve_device, weights_sha256
from training.evaluate_instruct import generate_responses, response_record, rouge_l
from training.instruct_data import (
    IGNORE_INDEX, EncodedExample, InstructDataError, collate, encode_example, read_instruct_file, split_instruct,
)
from training.job_config import config_to_dict
from training.lora import ALL_BLOCK_LINEARS, apply_lora, lora_parameters, merge_lora
from training.plots import plot_curves

log = logging.getLogger(__name__)


class InstructFinetuneError(ValueError):
    """An instruction fine-tuning setting that cannot work."""


@dataclass
class InstructConfig:
    base: str = field(default="smollm2-135m-instruct", metadata={"help": "base checkpoint directory or known model name"})
    data: Path | None = field(default=None, metadata={"help": "instruction JSON or JSONL file; when absent the book's file is downloaded"})
    out: Path = field(default=Path("runs/instruct"), metadata={"help": "output directory (checkpoint, plots, responses)"})
    method: str = field(default="full", metadata={"help": "full fine-tuning or LoRA adapters", "choices": ("full", "lora")})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale alpha (the update is scaled by alpha / r)"})
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_BLOCK_LINEARS),
                                    metadata={"help": "comma-separated linear layers to adapt"})
    template: str = field(default="auto", metadata={"help": "chat template: the base's own (auto; Alpaca when it has none)",
                                                     "choices": ("auto", "alpaca", "chatml")})
    epochs: int = field(default=2, metadata={"help": "passes over the training split"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    max_length: int = field(default=1024, metadata={"help": "sequences are cut to this many tokens (and the context)"})
    mask_prompt: bool = field(default=False, metadata={"help": "leave prompt tokens out of the loss"})
    eval_every: int = field(default=20, metadata={"help": "steps between validation-loss estimates"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches per estimate"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest test response to generate"})
    test_responses: bool = field(default=True, metadata={"help": "generate the test split's responses after training"})
    seed: int = field(default=123, metadata={"help": "seed for the split and the batch order"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; when absent torch decides"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "lora_rank", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise InstructFinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InstructFinetuneError(f"--lr must be positive, got {self.lr}")


def choose_template(base_template: ChatTemplate | None, choice: str) -> ChatTemplate:
    if choice == "auto":
        return base_template or ALPACA
    return BUILTIN[choice]


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that have a target."""
    device = next(model.parameters()).device
    inputs, targets = inputs.to(device), targets.to(device)
    ctx = model.context(inputs)
    hidden, _ = model.run_blocks(model.embed(inputs, ctx), ctx)
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        # A batch whose every target was masked or truncated away: nothing to learn.
        return hidden.sum() * 0.0
    logits = model.logits(hidden[keep])  # (N, vocab): only where a target exists
    return nn.functional.cross_entropy(logits.float(), targets[keep])


def batches(encoded: list[EncodedExample], cfg: InstructConfig, pad_id: int, generator: torch.Generator | None):
    order = torch.randperm(len(encoded), generator=generator).tolist() if generator is not None else range(len(encoded))
    order = list(order)
    for s in range(0, len(order), cfg.batch_size):
        yield collate([encoded[i] for i in order[s : s + cfg.batch_size]], pad_id,
                      max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)


@torch.no_grad()
def estimate_loss(model, encoded: list[EncodedExample], cfg: InstructConfig, pad_id: int, max_batches: int | None) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for i, (inputs, targets) in enumerate(batches(encoded, cfg, pad_id, None)):
        if max_batches is not None and i >= max_batches:
            break
        losses.append(lm_loss(model, inputs, targets).item())
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


def train_lm(model, train: list[EncodedExample], val: list[EncodedExample], cfg: InstructConfig, pad_id: int,
             params: list[nn.Parameter]) -> dict[str, list]:
    """The book's train_model_simple: AdamW steps, a validation estimate every ``eval_every`` steps."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list] = {"step": [], "train_loss": [], "tokens_seen": [], "eval_step": [], "val_loss": []}
    steps_total = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    step, tokens, start = 0, 0, time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for inputs, targets in batches(train, cfg, pad_id, generator):
            loss = lm_loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tokens += inputs.numel()
            history["step"].append(step)
            history["train_loss"].append(loss.item())
            history["tokens_seen"].append(tokens)
            if step % cfg.eval_every == 0 or step == steps_total:
                val_loss = estimate_loss(model, val, cfg, pad_id, cfg.eval_batches)
                history["eval_step"].append(step)
                history["val_loss"].append(val_loss)
                elapsed = time.perf_counter() - start
                log.info("epoch %d step %d/%d: train loss %.3f, val loss %.3f (%.0f s, %.1f s/step)",
                         epoch, step, steps_total, loss.item(), val_loss, elapsed, elapsed / step)
    return history


def write_loss_plot(path: Path, history: dict[str, list]) -> None:
    steps, losses = history["step"], history["train_loss"]
    window = max(1, min(10, len(steps) // 20))
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    plot_curves(
        path,
        {f"train (mean of {window} steps)": (steps, smoothed), "validation": (history["eval_step"], history["val_loss"])},
        "step", "cross-entropy loss", "Instruction fine-tuning: loss",
    )


def encode_split(examples, template: ChatTemplate, tokenizer, cfg: InstructConfig, name: str) -> list[EncodedExample]:
    encoded = [encode_example(e.messages, template, tokenizer) for e in examples]
    if cfg.mask_prompt:
        # A response cut off entirely by truncation leaves no target at all.
        lost = sum(1 for e in encoded if not any(e.trainable[1 : cfg.max_length + 1]))
        if lost:
            log.warning("%s split: %d of %d examples have no response tokens within --max-length %d",
                        name, lost, len(encoded), cfg.max_length)
    return encoded


def finetune_instruct(cfg: InstructConfig) -> Path:
    """Run the instruction fine-tune described by ``cfg``; returns the output checkpoint directory."""
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data is None:
        from core.download import download_dataset

        data_path = download_dataset("instruction-data")
    else:
        data_path = Path(cfg.data)
    base_dir = resolve_base(cfg.base)
    base = load_base(base_dir, resolve_device(cfg.device))
    model, tokenizer = base.model, base.tokenizer
    template = choose_template(base.chat_template, cfg.template)
    if cfg.max_length > model.cfg.context_length:
        log.info("--max-length %d exceeds the context of %d; using the context", cfg.max_length, model.cfg.context_length)
        cfg.max_length = model.cfg.context_length
    pad_id = tokenizer.eos_id
    if pad_id is None:
        raise InstructFinetuneError(f"the tokenizer of {base_dir} has no end-of-text token to pad and stop with")

    splits = split_instruct(read_instruct_file(data_path, template), seed=cfg.seed, source=str(data_path))
    train = encode_split(splits.train, template, tokenizer, cfg, "train")
    val = encode_split(splits.val, template, tokenizer, cfg, "validation")
    if not train or not val:
        raise InstructDataError(f"{data_path}: empty training or validation split")

    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        wrapped = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        params = lora_parameters(model)
        log.info("LoRA r=%d alpha=%g on %d layers", cfg.lora_rank, cfg.lora_alpha, len(wrapped))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    trainable = sum(p.numel() for p in params)
    log.info("instruction fine-tune (%s): base %s, template %s, %d train / %d val / %d test, %d trainable parameters",
             cfg.method, base_dir, template.name, len(splits.train), len(splits.val), len(splits.test), trainable)

    initial_val = estimate_loss(model, val, cfg, pad_id, None)
    t_train = time.perf_counter()
    history = train_lm(model, train, val, cfg, pad_id, params)
    train_s = time.perf_counter() - t_train
    final_val = estimate_loss(model, val, cfg, pad_id, None)
    if cfg.method == "lora":
        merge_lora(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    out = Path(cfg.out)
    metadata = {"name": out.name, "base": str(base_dir), "base_sha256": weights_sha256(base_dir),
                "finetune": f"instruct-{cfg.method}"}
    save_checkpoint(out, model, tokenizer, chat_template=template, metadata=metadata)
    write_loss_plot(out / "loss.png", history)

    metrics: dict[str, Any] = {
        "method": cfg.method,
        "template": template.name,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "trainable_parameters": trainable,
        "val_loss_before": initial_val,
        "val_loss_after": final_val,
        "training_wall_time_s": round(train_s, 2),
        "data": {"path": str(data_path), "sha256": sha256_file(data_path)},
        "base": {"path": str(base_dir), "sha256": metadata["base_sha256"]},
        "config": config_to_dict(cfg),
        "history": history,
    }
    if cfg.test_responses:
        t_gen = time.perf_counter()
        responses = generate_responses(model, tokenizer, template, splits.test, max_new_tokens=cfg.max_new_tokens)
        records = [response_record(e, r) for e, r in zip(splits.test, responses)]
        scores = [rouge_l(r["model_response"], r["output"])["f1"] for r in records]
        (out / "test_responses.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
        metrics["test_rouge_l_f1"] = sum(scores) / len(scores)
        metrics["generation_wall_time_s"] = round(time.perf_counter() - t_gen, 2)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    write_json(out / "metrics.json", metrics)
    log.info("done in %.0f s (training %.0f s); val loss %.3f -> %.3f; wrote %s",
             metrics["wall_time_s"], train_s, initial_val, final_val, out)
    return out
