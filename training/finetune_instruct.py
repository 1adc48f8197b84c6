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

from core.generation.chat_template import ALPACA, BUILTIN, ChatTemplate
from core.weights.catalogue import generation_defaults
from core.weights.checkpoint import save_checkpoint, write_json
from core.weights.fetch import sha256_file
from core.device import resolve_device
from training.activation_cache import prefix_activations
from training.base_model import load_base, resolve_base, weights_sha256
from training.evaluate_instruct import generate_responses, response_record, rouge_l
from training.instruct_data import (
    EncodedExample, InstructDataError, chain_conversations, collate, encode_example, read_instruct_file, split_instruct,
)
from training.job_config import config_to_dict
from training.loss import lm_loss
from training.lora import ALL_BLOCK_LINEARS, apply_lora, lora_parameters, merge_lora
from training.plots import plot_curves
from training.progress import JobProgress

log = logging.getLogger(__name__)


# Decoding settings for what this job makes, chosen on the development measure with the default recipe
# (docs/finetuning.md, "Decoding defaults"); the service applies them where a request leaves a setting out.
GENERATION_DEFAULTS = generation_defaults()


class InstructFinetuneError(ValueError):
    """An instruction fine-tuning setting that cannot work."""


# The measured recipe adapts the last 8 of SmolLM2-135M's 30 blocks (docs/finetuning.md); a base
# with fewer blocks (the tests' tiny models) has all of its blocks adapted.
DEFAULT_TRAINABLE_BLOCKS = 8


@dataclass
class InstructConfig:
    base: str = field(default="smollm2-135m-instruct", metadata={"help": "base checkpoint directory or known model name"})
    data: Path | None = field(default=None, metadata={"help": "instruction JSON or JSONL file; when absent the book's file is downloaded"})
    out: Path = field(default=Path("runs/instruct"), metadata={"help": "output directory (checkpoint, plots, responses)"})
    # The defaults are the recipe chosen on the development measure (docs/finetuning.md, "Recipes compared").
    method: str = field(default="lora", metadata={"help": "full fine-tuning or LoRA adapters", "choices": ("full", "lora")})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale alpha (the update is scaled by alpha / r)"})
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_BLOCK_LINEARS),
                                    metadata={"help": "comma-separated linear layers to adapt"})
    trainable_blocks: int | None = field(default=None, metadata={
        "help": f"train (or adapt) only the last N blocks and the final norm; 0: the whole model; "
                f"default: the last {DEFAULT_TRAINABLE_BLOCKS} (every block of a smaller model)"})
    activation_cache: bool = field(default=True, metadata={
        "help": "with --trainable-blocks, compute the frozen prefix once per example and reuse it"})
    template: str = field(default="auto", metadata={"help": "chat template: the base's own (auto; Alpaca when it has none)",
                                                     "choices": ("auto", "alpaca", "chatml")})
    epochs: int = field(default=2, metadata={"help": "passes over the training split"})
    lr: float = field(default=4e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    max_length: int = field(default=1024, metadata={"help": "sequences are cut to this many tokens (and the context)"})
    mask_prompt: bool = field(default=False, metadata={"help": "leave prompt tokens out of the loss"})
    chain_turns: int = field(default=1, metadata={
        "help": "chain training entries into conversations of up to N turns (same-task follow-ups asked "
                "elliptically), so later answers learn to use earlier turns; 1 keeps single turns"})
    eval_every: int = field(default=20, metadata={"help": "steps between validation-loss estimates"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches per estimate"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest test response to generate"})
    test_responses: bool = field(default=True, metadata={"help": "generate the test split's responses after training"})
    seed: int = field(default=123, metadata={"help": "seed for the split and the batch order"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; when absent torch decides"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    progress_file: Path | None = field(default=None, metadata={"help": "keep this JSON file up to date with the job's progress (training.progress)"})

    def __post_init__(self) -> None:
        if self.trainable_blocks is not None and self.trainable_blocks < 0:
            raise InstructFinetuneError(f"--trainable-blocks must be >= 0 (0: every block), got {self.trainable_blocks}")
        for name in ("epochs", "batch_size", "max_length", "lora_rank", "eval_every", "eval_batches", "chain_turns"):
            if getattr(self, name) < 1:
                raise InstructFinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InstructFinetuneError(f"--lr must be positive, got {self.lr}")


def choose_template(base_template: ChatTemplate | None, choice: str) -> ChatTemplate:
    if choice == "auto":
        return base_template or ALPACA
    return BUILTIN[choice]


class LMBatches:
    """One split's encoded examples, batched by ``collate``, with the frozen prefix cached when asked."""

    def __init__(self, model, encoded: list[EncodedExample], cfg: InstructConfig, pad_id: int, start: int | None) -> None:
        self.encoded, self.cfg, self.pad_id, self.start = encoded, cfg, pad_id, start
        self.prefix = None
        if start:
            # The model's inputs are the sequence plus one end-of-text, cut to
            # max_length + 1, minus the last token (collate's shift).
            inputs = [(e.ids + [pad_id])[: cfg.max_length + 1][:-1] for e in encoded]
            self.prefix = prefix_activations(model, inputs, start, batch_size=cfg.batch_size)

    def __len__(self) -> int:
        return len(self.encoded)

    def __iter__(self):
        yield from self.iterate(None)

    def iterate(self, generator: torch.Generator | None):
        order = torch.randperm(len(self), generator=generator).tolist() if generator is not None else list(range(len(self)))
        for s in range(0, len(order), self.cfg.batch_size):
            rows = order[s : s + self.cfg.batch_size]
            inputs, targets = collate([self.encoded[i] for i in rows], self.pad_id,
                                      max_length=self.cfg.max_length, mask_prompt=self.cfg.mask_prompt)
            prefix = None
            if self.prefix is not None:
                prefix = nn.utils.rnn.pad_sequence([self.prefix[i] for i in rows], batch_first=True)
            yield inputs, targets, prefix

    def loss(self, model, batch) -> torch.Tensor:
        inputs, targets, prefix = batch
        device = next(model.parameters()).device
        return lm_loss(model, inputs.to(device), targets.to(device), prefix=None if prefix is None else prefix.to(device),
                       start=self.start or 0, skip_ignored=True)


@torch.no_grad()
def estimate_loss(model, data: LMBatches, max_batches: int | None) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        losses.append(data.loss(model, batch).item())
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


def train_lm(model, train: LMBatches, val: LMBatches, cfg: InstructConfig, params: list[nn.Parameter],
             progress: JobProgress | None = None) -> dict[str, list]:
    """The book's train_model_simple: AdamW steps, a validation estimate every ``eval_every`` steps."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list] = {"step": [], "train_loss": [], "tokens_seen": [], "eval_step": [], "val_loss": []}
    steps_total = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    step, tokens, start = 0, 0, time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for batch in train.iterate(generator):
            loss = train.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tokens += batch[0].numel()
            history["step"].append(step)
            history["train_loss"].append(loss.item())
            history["tokens_seen"].append(tokens)
            if progress is not None:
                progress.step(step, steps_total, f"epoch {epoch}/{cfg.epochs}, step {step}/{steps_total}")
            if step % cfg.eval_every == 0 or step == steps_total:
                val_loss = estimate_loss(model, val, cfg.eval_batches)
                history["eval_step"].append(step)
                history["val_loss"].append(val_loss)
                elapsed = time.perf_counter() - start
                log.info("epoch %d step %d/%d: train loss %.3f, val loss %.3f (%.0f s, %.2f s/step)",
                         epoch, step, steps_total, loss.item(), val_loss, elapsed, elapsed / step)
    return history


def select_trainable(model, cfg: InstructConfig) -> tuple[list[nn.Parameter], int]:
    """Freeze what does not train; returns the trainable parameters and the first trainable block."""
    n_layers = model.cfg.n_layers
    if cfg.trainable_blocks is None:  # the recipe's default, on whatever depth the base has
        n_train = min(DEFAULT_TRAINABLE_BLOCKS, n_layers)
    else:
        n_train = cfg.trainable_blocks or n_layers
    if n_train > n_layers:
        raise InstructFinetuneError(f"--trainable-blocks {n_train} exceeds the base's {n_layers} blocks")
    first = n_layers - n_train
    if cfg.method == "lora":
        wrapped = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, blocks=range(first, n_layers))
        log.info("LoRA r=%d alpha=%g on %d layers", cfg.lora_rank, cfg.lora_alpha, len(wrapped))
        return lora_parameters(model), first
    for p in model.parameters():
        p.requires_grad_(first == 0)
    if first:
        # The embedding feeds the frozen prefix (and is the tied output head), so it stays frozen too.
        modules = [*model.blocks[first:], model.final_norm] + ([model.out_head] if model.out_head is not None else [])
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad], first


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
    start, start_cpu = time.perf_counter(), time.process_time()
    progress = JobProgress(cfg.progress_file, title="instruction model", role="chat", checkpoint=Path(cfg.out))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data is None:
        from core.weights.fetch import download_dataset

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
    train_examples = chain_conversations(splits.train, cfg.chain_turns, template, seed=cfg.seed)
    train = encode_split(train_examples, template, tokenizer, cfg, "train")
    val = encode_split(splits.val, template, tokenizer, cfg, "validation")
    if not train or not val:
        raise InstructDataError(f"{data_path}: empty training or validation split")

    torch.manual_seed(cfg.seed)
    params, first = select_trainable(model, cfg)
    trainable = sum(p.numel() for p in params)
    log.info("instruction fine-tune (%s): base %s, template %s, %d train / %d val / %d test, "
             "%d trainable parameters (blocks %d-%d)", cfg.method, base_dir, template.name, len(splits.train),
             len(splits.val), len(splits.test), trainable, first, model.cfg.n_layers - 1)
    start_block = first if cfg.activation_cache and first > 0 else None
    t_cache, cpu_cache = time.perf_counter(), time.process_time()
    train_batches = LMBatches(model, train, cfg, pad_id, start_block)
    val_batches = LMBatches(model, val, cfg, pad_id, start_block)
    cache_s, cache_cpu = time.perf_counter() - t_cache, time.process_time() - cpu_cache
    if start_block:
        log.info("cached the frozen prefix (blocks 0-%d) in %.0f s", start_block - 1, cache_s)

    progress.stage("measuring the validation loss before training")
    initial_val = estimate_loss(model, val_batches, None)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    history = train_lm(model, train_batches, val_batches, cfg, params, progress)
    train_s, train_cpu = time.perf_counter() - t_train, time.process_time() - cpu_train
    final_val = estimate_loss(model, val_batches, None)
    if cfg.method == "lora":
        merge_lora(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    out = Path(cfg.out)
    metadata = {"name": out.name, "base": str(base_dir), "base_sha256": weights_sha256(base_dir),
                "finetune": f"instruct-{cfg.method}", "generation_defaults": dict(GENERATION_DEFAULTS)}
    save_checkpoint(out, model, tokenizer, chat_template=template, metadata=metadata)
    write_loss_plot(out / "loss.png", history)

    metrics: dict[str, Any] = {
        "method": cfg.method,
        "template": template.name,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "train_sequences": len(train),
        "trainable_parameters": trainable,
        "val_loss_before": initial_val,
        "val_loss_after": final_val,
        "trainable_blocks": model.cfg.n_layers - first,
        "activation_cache": bool(start_block),
        "prefix_cache_wall_time_s": round(cache_s, 2),
        "training_wall_time_s": round(train_s, 2),
        # CPU seconds (all threads): on a shared machine the wall clock also measures the neighbours.
        "prefix_cache_cpu_time_s": round(cache_cpu, 2),
        "training_cpu_time_s": round(train_cpu, 2),
        "data": {"path": str(data_path), "sha256": sha256_file(data_path)},
        "base": {"path": str(base_dir), "sha256": metadata["base_sha256"]},
        "config": config_to_dict(cfg),
        "history": history,
    }
    if cfg.test_responses:
        progress.stage(f"trained; answering the {len(splits.test)} test instructions for metrics.json")
        t_gen = time.perf_counter()
        responses = generate_responses(model, tokenizer, template, splits.test, max_new_tokens=cfg.max_new_tokens)
        records = [response_record(e, r) for e, r in zip(splits.test, responses)]
        scores = [rouge_l(r["model_response"], r["output"])["f1"] for r in records]
        (out / "test_responses.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
        metrics["test_rouge_l_f1"] = sum(scores) / len(scores)
        metrics["generation_wall_time_s"] = round(time.perf_counter() - t_gen, 2)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    metrics["cpu_time_s"] = round(time.process_time() - start_cpu, 2)
    write_json(out / "metrics.json", metrics)
    log.info("done in %.0f s (training %.0f s); val loss %.3f -> %.3f; wrote %s",
             metrics["wall_time_s"], train_s, initial_val, final_val, out)
    progress.done(out)
    return out
