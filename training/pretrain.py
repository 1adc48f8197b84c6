"""``scratchgpt pretrain``: next-token pretraining (the book's chapter 5 and appendix D).

The loop is the book's ``train_model_simple`` grown into a job: AdamW,
linear warm-up then cosine decay, gradient clipping and accumulation, bf16
autocast, periodic evaluation with a generated sample, atomic checkpoints
with everything needed to resume exactly, and PyTorch DDP when started under
``torchrun`` (gloo on CPU, nccl on CUDA; only rank 0 writes).

    scratchgpt pretrain --data book.txt --model gpt2-small --context-length 256 --max-steps 1000
    torchrun --nproc_per_node 2 $(which scratchgpt) pretrain --data ... 
    python -m training.pretrain --data ...            (same flags)
    scratchgpt pretrain --resume runs/pretrain-...     (continues exactly)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from core.weights.checkpoint import save_checkpoint
from core.model.config import PRESET_ALIASES, PRESETS, ModelConfig
from core.data import DataError
from core.model import GPTModel
from training import distributed as dist_utils
from training.distributed import DistEnv
from training.job_config import JobConfigError, config_to_dict, load_job_config
from training.loss import lm_loss
from training.plots import plot_curves
from training.pretrain_data import WindowSampler, collate, load_corpus, make_dataset
from training.run_state import (
    STATE_FILE,
    STATE_VERSION,
    RunDirError,
    append_metrics,
    capture_rng,
    checkpoint_dir,
    clean_partial_saves,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    read_metrics,
    read_run_json,
    restore_rng,
    save_state,
    truncate_metrics,
    write_run_json,
)
from training.schedule import SCHEDULES, LRSchedule


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its one-line help (and choices) for the CLI."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class PretrainConfig:
    # data
    data: list[Path] = _opt([], "training text: files, directories of .txt, globs, a token file, or a `scratchgpt prepare` directory")
    val_data: list[Path] = _opt([], "validation data (same forms as --data); default: split --data by --val-fraction")
    val_fraction: float = _opt(0.1, "fraction of each document (its end, by characters) held out for validation")
    stride: int | None = _opt(None, "tokens between window starts; default: the context length (no overlap)")
    tokenizer: str = _opt("gpt2", "tokenizer", choices=("gpt2",))
    # model
    model: str = _opt("gpt2-small", "model preset: " + ", ".join([*PRESETS, *PRESET_ALIASES]))
    context_length: int | None = _opt(None, "context length in tokens; default: the preset's")
    emb_dim: int | None = _opt(None, "embedding width; default: the preset's")
    n_layers: int | None = _opt(None, "transformer blocks; default: the preset's")
    n_heads: int | None = _opt(None, "attention heads; default: the preset's")
    drop_rate: float | None = _opt(None, "dropout rate; default: the preset's (0.0)")
    qkv_bias: bool | None = _opt(None, "bias in the query/key/value projection; default: the preset's")
    tie_embeddings: bool | None = _opt(None, "share the token embedding with the output head; default: the preset's")
    pos_encoding: str | None = _opt(
        None, "positions: 'learned' (GPT-2) or 'sinusoidal' (Vaswani et al., 2017) for GPT-2 presets, 'rotary' for "
        "Llama presets; default: the preset's", choices=("learned", "sinusoidal", "rotary"),
    )
    init: str = _opt(
        "gpt2", "weight init: 'gpt2' (normal, std 0.02, residual projections scaled by 1/sqrt(2 n_layers)) "
        "or 'torch' (PyTorch's layer defaults, which the book's GPTModel gets)", choices=("gpt2", "torch"),
    )
    # optimisation
    batch_size: int = _opt(8, "windows per micro-batch on each process")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int | None = _opt(None, "optimizer steps to train; default: from --epochs")
    epochs: float | None = _opt(None, "passes over the training windows, when --max-steps is not given (default 1)")
    lr: float = _opt(4e-4, "peak learning rate (AdamW)")
    min_lr: float | None = _opt(None, "final learning rate of the cosine decay; default: lr / 10")
    warmup_steps: int = _opt(0, "steps of linear warm-up from ~0 to --lr")
    schedule: str = _opt("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES)
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2 (the book's chapter 5 uses torch's default 0.999)")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    weight_decay_scope: str = _opt(
        "matrices", "which parameters decay: 'matrices' (linear weights only; not biases, norms, embeddings) or 'all' (the book's chapter 5)",
        choices=("matrices", "all"),
    )
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    precision: str = _opt("fp32", "fp32, or bf16 autocast (CPU and bf16-capable GPUs)", choices=("fp32", "bf16"))
    seed: int = _opt(123, "random seed for weights, data order and dropout")
    device: str = _opt("auto", "cpu, cuda, cuda:N, mps or auto")
    threads: int | None = _opt(None, "CPU threads for torch in each process; default: torch's choice")
    # evaluation and samples
    eval_interval: int = _opt(100, "evaluate every this many steps (0: only at the end)")
    eval_batches: int = _opt(20, "batches of train and of validation windows per evaluation (0: all validation windows)")
    eval_at_start: bool = _opt(True, "evaluate once before the first step (the untrained loss)")
    sample_prompt: str = _opt("Every effort moves you", "prompt of the sample generated at each sample interval")
    sample_interval: int | None = _opt(None, "generate a sample every this many steps (default: --eval-interval; 0: never)")
    sample_tokens: int = _opt(50, "tokens per sample")
    sample_temperature: float = _opt(0.0, "sampling temperature for samples (0: greedy)")
    sample_top_k: int | None = _opt(None, "top-k for samples")
    progress: bool = _opt(True, "show a progress bar")
    # run directory and checkpoints
    run_dir: Path | None = _opt(None, "run directory; default: runs/pretrain-<date>-<time>")
    checkpoint_interval: int = _opt(500, "save a checkpoint every this many steps (0: only at the end)")
    keep_checkpoints: int = _opt(3, "keep the newest N checkpoints (0: keep all)")
    resume: Path | None = _opt(None, "continue this run directory exactly from its newest complete checkpoint")
    stop_at_step: int | None = _opt(None, "stop after this step (saving a checkpoint) without changing the schedule; continue with --resume")

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "stride", "context_length", "stop_at_step", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("eval_interval", "eval_batches", "checkpoint_interval", "keep_checkpoints", "warmup_steps", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be >= 0")


# Fields a resumed run takes from the command line; everything else comes from
# the run's own run.json, since changing it would not continue the same run.
RESUME_FIELDS = ("resume", "stop_at_step", "device", "threads", "progress")


class PretrainError(ValueError):
    """A pretraining job that cannot start (bad settings for this data or device)."""


# -- pieces of the job ------------------------------------------------------------


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    name = PRESET_ALIASES.get(cfg.model, cfg.model)
    if name not in PRESETS:
        raise JobConfigError(f"--model {cfg.model!r} is not a preset; choose one of {', '.join([*PRESETS, *PRESET_ALIASES])}")
    overrides = {
        k: getattr(cfg, k)
        for k in ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias", "tie_embeddings", "pos_encoding")
        if getattr(cfg, k) is not None
    }
    try:
        return ModelConfig.from_preset(name, vocab_size=vocab_size, **overrides)
    except ValueError as e:
        raise JobConfigError(f"model settings: {e}") from None


def reset_to_torch_defaults(model: torch.nn.Module) -> None:
    """Re-initialise linears and embeddings as PyTorch's constructors do (Kaiming-uniform, N(0, 1)).

    GPTModel uses GPT-2's initialisation; the book's chapter 4 GPTModel does
    not set one, so its layers keep these defaults. Reproducing the book's
    chapter 5 curves needs them: N(0, 1) token embeddings barely move at
    lr 4e-4, which lets the model memorise a 5,000-token story quickly.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()


def make_optimizer(model: GPTModel, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay.

    With scope "matrices" only the weights of linear layers decay: decaying
    biases and norm gains pulls them toward 0 for no benefit, and the
    embeddings are lookup tables whose rare rows would shrink between their
    updates (the choice of GPT-3-style recipes). Scope "all" decays every
    parameter as ``AdamW(model.parameters(), weight_decay=0.1)`` does in the
    book's chapter 5.
    """
    if cfg.weight_decay_scope == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    else:
        linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        decay = [p for p in model.parameters() if id(p) in linear_weights]
        no_decay = [p for p in model.parameters() if id(p) not in linear_weights]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each parameter in one pass over its four tensors
    # (CUDA and, since torch 2.4, CPU); the default foreach path makes several.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PretrainError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, dataset, indices: torch.Tensor, batch_size: int, env: DistEnv, precision: str) -> float:
    """Mean loss over the given windows, shared across ranks (each takes every world_size-th batch)."""
    total, count = 0.0, 0
    batches = list(indices.split(batch_size))
    for b in batches[env.rank :: env.world_size]:
        x, y = collate(dataset, b)
        x, y = x.to(env.device), y.to(env.device)
        with autocast_context(precision, env.device):
            loss = lm_loss(model, x, y)
        total += float(loss) * len(b)
        count += len(b)
    if env.enabled:
        t = torch.tensor([total, count], dtype=torch.float64, device=env.device)
        torch.distributed.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


def generate_sample(model: GPTModel, tokenizer, cfg: PretrainConfig) -> str:
    """The prompt and its continuation (greedy by default, as the book's generate_and_print_sample)."""
    from core.generation.generate import GenerationConfig, generate

    ids = tokenizer.encode(cfg.sample_prompt)[-model.cfg.context_length :]
    if not ids:
        return ""
    gen = GenerationConfig(
        max_new_tokens=cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
        seed=cfg.seed, stop_token_ids=(tokenizer.eos_id,) if tokenizer.eos_id is not None else (),
    )
    return tokenizer.decode(ids + generate(model, [ids], gen)[0])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: exp of a diverged loss is just overflow


def plot_losses(run_dir: Path) -> None:
    """loss.png: train and validation loss at each evaluation against tokens seen (the book's Figure 5.12)."""
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    series = {"train": ([r["tokens"] for r in evals], [r["train_loss"] for r in evals])}
    val = [r for r in evals if r.get("val_loss") is not None]
    if val:
        series["validation"] = ([r["tokens"] for r in val], [r["val_loss"] for r in val])
    plot_curves(run_dir / "loss.png", series, "tokens seen", "cross-entropy loss", f"pretraining: {run_dir.name}")


def resolve_resume(cfg: PretrainConfig) -> tuple[PretrainConfig, Path]:
    """The run's saved config with the few resume-time fields from ``cfg``; the checkpoint to load."""
    run_dir = Path(cfg.resume)
    saved = read_run_json(run_dir)
    ckpt = latest_checkpoint(run_dir)
    try:
        restored = load_job_config(PretrainConfig, None, saved["config"])
    except JobConfigError as e:
        raise RunDirError(f"--resume {run_dir}: run.json holds a config this version cannot use: {e}") from None
    defaults = PretrainConfig()
    ignored = [
        f.name for f in dataclasses.fields(PretrainConfig)
        if f.name not in RESUME_FIELDS and getattr(cfg, f.name) != getattr(defaults, f.name)
        and getattr(cfg, f.name) != getattr(restored, f.name)
    ]
    if ignored:
        print(
            f"note: resuming {run_dir} with its own settings; ignoring "
            + ", ".join("--" + n.replace("_", "-") for n in ignored),
            file=sys.stderr,
        )
    # Resume-time fields: the flag when given, else the run's own value (the same
    # thread count keeps CPU matmuls bit-identical), except the stop step,
    # which always comes from this invocation.
    taken = {
        k: getattr(cfg, k) if getattr(cfg, k) != getattr(defaults, k) or k in ("resume", "stop_at_step") else getattr(restored, k)
        for k in RESUME_FIELDS
    }
    merged = dataclasses.replace(restored, **taken, run_dir=run_dir)
    return merged, ckpt


def new_run_dir(cfg: PretrainConfig) -> Path:
    run_dir = cfg.run_dir or Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(
            f"--run-dir {run_dir} already exists and is not empty; choose another, or continue it with --resume {run_dir}"
        )
    return run_dir


# -- the job ------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) a pretraining job; returns the run directory."""
    env = dist_utils.setup(cfg.device)
    try:
        return Trainer(cfg, env).run()
    finally:
        dist_utils.teardown(env)


class Trainer:
    """State of one pretraining process; ``run`` is the loop."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv) -> None:
        from core.tokenizer.gpt2 import gpt2_tokenizer

        resume_from: Path | None = None
        if cfg.resume is not None:
            cfg, resume_from = resolve_resume(cfg)
            self.run_dir = Path(cfg.resume)
        else:
            if not cfg.data:
                raise JobConfigError("--data is required: the text (or token files) to train on")
            self.run_dir = new_run_dir(cfg)
            # Absolute paths in run.json, so --resume works from any directory.
            cfg = dataclasses.replace(
                cfg, data=[p.absolute() for p in cfg.data], val_data=[p.absolute() for p in cfg.val_data],
                run_dir=self.run_dir.absolute(),
            )
            self.run_dir = cfg.run_dir
        self.cfg, self.env = cfg, env
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tokenizer = gpt2_tokenizer("tiktoken")

        # Everything that can fail on bad input happens before the run directory is touched.
        self.model_cfg = build_model_config(cfg, self.tokenizer.vocab_size)
        C = self.model_cfg.context_length
        corpus = load_corpus(cfg.data, cfg.val_data or None, cfg.val_fraction, self.tokenizer, cfg.tokenizer)
        self.data_description = corpus.description
        self.train_ds = make_dataset(corpus.train, C, cfg.stride or C, "training data")
        self.val_ds = make_dataset(corpus.val, C, cfg.stride or C, "validation split") if len(corpus.val) or cfg.val_data else None
        if self.val_ds is None and cfg.val_fraction > 0:
            raise DataError("the validation split is empty; give more text or --val-data")
        self.sampler = WindowSampler(len(self.train_ds), cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
        if cfg.max_steps is not None:
            self.max_steps = cfg.max_steps
        else:
            self.max_steps = max(1, math.ceil((cfg.epochs or 1.0) * self.sampler.batches_per_epoch / cfg.grad_accum))
        self.schedule = LRSchedule(cfg.lr, cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10, cfg.warmup_steps, self.max_steps, cfg.schedule)
        autocast_context(cfg.precision, env.device)  # fails early on a device without bf16
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * env.world_size * C
        g = torch.Generator().manual_seed(cfg.seed + 1)  # a private generator: evaluation never moves the training RNG
        self.eval_train_idx = torch.randperm(len(self.train_ds), generator=g)[: max(cfg.eval_batches, 1) * cfg.batch_size]
        if self.val_ds is not None:
            n_val = len(self.val_ds) if cfg.eval_batches == 0 else min(len(self.val_ds), cfg.eval_batches * cfg.batch_size)
            self.eval_val_idx = torch.arange(n_val)

        # Weights: seeded init (identical on every rank), or the checkpoint.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = GPTModel(self.model_cfg)
        if cfg.init == "torch":
            reset_to_torch_defaults(self.model)
        self.step = 0
        self.elapsed = 0.0
        state = None
        if resume_from is not None:
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(str(resume_from / "model.safetensors")))
            state = load_state(resume_from / STATE_FILE)
        self.model.to(env.device)
        self.optimizer = make_optimizer(self.model, cfg, env.device)
        if state is not None:
            self._restore(state, resume_from)
        elif env.enabled:
            # Same weights everywhere (DDP also broadcasts them), different dropout per rank.
            torch.manual_seed(cfg.seed + env.rank)
        self.ddp = None
        if env.enabled:
            self.ddp = DistributedDataParallel(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if env.is_main:
            self._prepare_run_dir(resume_from)
        dist_utils.barrier(env)

    # -- setup helpers

    def _restore(self, state: dict[str, Any], ckpt: Path) -> None:
        if state["schedule"] != self.schedule.state_dict():
            raise RunDirError(f"{ckpt}: its schedule {state['schedule']} differs from the run's {self.schedule.state_dict()}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            restore_rng(rngs[self.env.rank])
        else:
            torch.manual_seed(self.cfg.seed + 7919 * self.step + self.env.rank)
            if self.env.is_main:
                print(
                    f"note: {ckpt} was saved by {len(rngs)} process(es), this run has {self.env.world_size}: "
                    "data order and dropout will not match an uninterrupted run",
                    file=sys.stderr,
                )
        if int(state["sampler"]["world_size"]) != self.env.world_size:
            self.sampler.load_state_dict({"epoch": self.sampler.epoch + 1, "pos": 0})

    def _prepare_run_dir(self, resume_from: Path | None) -> None:
        if resume_from is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_json(
                self.run_dir, config_to_dict(self.cfg),
                {"model": self.model_cfg.to_dict(), "data": self.data_description, "world_size": self.env.world_size},
            )
        else:
            for p in clean_partial_saves(self.run_dir):
                print(f"removed an unfinished save: {p}", file=sys.stderr)
            truncate_metrics(self.metrics_path, self.step)

    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            append_metrics(self.metrics_path, record)

    # -- the loop

    @property
    def net(self) -> torch.nn.Module:
        """What the forward pass goes through: the DDP wrapper when there is one."""
        return self.ddp if self.ddp is not None else self.model

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm, lr)."""
        cfg, env = self.cfg, self.env
        self.net.train()
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = collate(self.train_ds, self.sampler.next_batch())
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            last = micro == cfg.grad_accum - 1
            # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                with autocast_context(cfg.precision, env.device):
                    loss = lm_loss(self.net, x, y) / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        grad_norm = float("nan")
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return dist_utils.mean_across(env, loss_sum), grad_norm, lr

    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.eval()
        train_loss = evaluate_windows(self.model, self.train_ds, self.eval_train_idx, cfg.batch_size, self.env, cfg.precision)
        val_loss = None
        if self.val_ds is not None:
            val_loss = evaluate_windows(self.model, self.val_ds, self.eval_val_idx, cfg.batch_size, self.env, cfg.precision)
        self.model.train()
        record = {
            "kind": "eval", "step": self.step, "tokens": self.step * self.tokens_per_step,
            "train_loss": train_loss, "train_ppl": perplexity(train_loss),
            "val_loss": val_loss, "val_ppl": perplexity(val_loss) if val_loss is not None else None,
        }
        self.log(record)
        return record

    def sample(self) -> str | None:
        if not self.env.is_main or not self.cfg.sample_prompt:
            return None
        self.model.eval()
        text = generate_sample(self.model, self.tokenizer, self.cfg)
        self.model.train()
        self.log({"kind": "sample", "step": self.step, "tokens": self.step * self.tokens_per_step, "text": text})
        return text

    def save(self) -> Path:
        """A checkpoint of this step: weights in the core format, then the training state."""
        rngs = dist_utils.gather_to_main(self.env, capture_rng())  # every rank's RNG, collectively
        path = checkpoint_dir(self.run_dir, self.step)
        if self.env.is_main:
            last_eval = next((r for r in reversed(read_metrics(self.metrics_path)) if r.get("kind") == "eval"), {})
            metadata = {
                "name": f"{self.run_dir.name}-step{self.step}",
                "step": self.step, "tokens_seen": self.step * self.tokens_per_step,
                "val_loss": last_eval.get("val_loss"), "data": self.data_description,
            }
            save_checkpoint(path, self.model, self.tokenizer, metadata=metadata)
            state = {
                "version": STATE_VERSION,
                "step": self.step,
                "tokens_seen": self.step * self.tokens_per_step,
                "elapsed_s": self.elapsed,
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": rngs,
                "world_size": self.env.world_size,
            }
            save_state(path / STATE_FILE, state, self.step)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        dist_utils.barrier(self.env)
        return path

    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        main = env.is_main
        say = print
        if main:
            n_params = self.model.num_parameters()
            say(
                f"pretraining {n_params / 1e6:.1f}M-parameter {self.model_cfg.family} model "
                f"(d={self.model_cfg.emb_dim}, layers={self.model_cfg.n_layers}, heads={self.model_cfg.n_heads}, "
                f"context={self.model_cfg.context_length}) on {env.device} x{env.world_size}, {cfg.precision}\n"
                f"data: {self.data_description}; {len(self.train_ds)} train windows, "
                f"{len(self.val_ds) if self.val_ds is not None else 0} val windows\n"
                f"{self.max_steps} steps of {self.tokens_per_step:,} tokens; run dir {self.run_dir}"
                + (f"; resuming at step {self.step}" if self.step else ""),
                flush=True,
            )
        bar = None
        if main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr)
            say = bar.write
        sample_every = cfg.eval_interval if cfg.sample_interval is None else cfg.sample_interval
        end = min(self.max_steps, cfg.stop_at_step or self.max_steps)

        last_plot = [time.monotonic()]

        def report_eval() -> None:
            r = self.evaluate()
            if main:
                val = f" | val loss {r['val_loss']:.3f} (ppl {r['val_ppl']:.1f})" if r["val_loss"] is not None else ""
                say(f"step {self.step} | tokens {r['tokens']:,} | train loss {r['train_loss']:.3f} (ppl {r['train_ppl']:.1f}){val}")
                # Redraw at most once a minute: a plot costs more than a tiny model's step.
                if time.monotonic() - last_plot[0] > 60:
                    plot_losses(self.run_dir)
                    last_plot[0] = time.monotonic()

        if self.step == 0 and cfg.eval_at_start:
            report_eval()
        rate = None
        while self.step < end:
            t0 = time.perf_counter()
            loss, grad_norm, lr = self.train_step()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            tok_s = self.tokens_per_step / dt
            rate = tok_s if rate is None else 0.9 * rate + 0.1 * tok_s
            if not math.isfinite(loss):
                raise PretrainError(f"the loss became {loss} at step {self.step}; lower --lr, add --warmup-steps or --grad-clip")
            self.log({
                "kind": "train", "step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": tok_s, "elapsed_s": self.elapsed,
            })
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)
            final = self.step == end
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or (final and self.step == self.max_steps):
                report_eval()
            if main and sample_every and (self.step % sample_every == 0 or (final and self.step == self.max_steps)):
                say(f"sample: {self.sample()!r}")
            if (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or final:
                path = self.save()
                if main:
                    say(f"saved {path}")
        if bar is not None:
            bar.close()
        if main:
            plot_losses(self.run_dir)
            state = "finished" if self.step >= self.max_steps else f"stopped at step {self.step} of {self.max_steps}"
            print(f"{state}; run dir {self.run_dir}, {self.elapsed:.1f}s of training", flush=True)
        return self.run_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m training.pretrain [flags]``: the same flags as ``scratchgpt pretrain``."""
    from training.job_config import run_job_main

    # Our errors all subclass these two.
    return run_job_main(PretrainConfig, pretrain, argv, "python -m training.pretrain", __doc__,
                        errors=(ValueError, dist_utils.DistributedError))


if __name__ == "__main__":
    sys.exit(main())
