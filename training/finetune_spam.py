"""Fine-tuning a language model into a spam classifier (the book's chapter 6).

``scratchgpt finetune spam --base BASE --data PATH --out DIR``

The vocabulary head is replaced by a 2-class head (``core.classifier``), read
at each message's last real token. Everything is frozen except the last N
blocks, the final norm and the head, as in the book (section 6.5); the rest of
the network is a fixed feature extractor.

That makes a large saving possible on CPU: the frozen prefix
``blocks[:n_layers - N]`` runs once per message and only the suffix trains on
its cached output (``training.activation_cache``; the result equals the
uncached forward pass, tested).

Outputs in ``--out``: a checkpoint of task "classification" that the service
and ``scratchgpt classify`` load, ``metrics.json`` (accuracy, precision,
recall, F1 and confusion matrix per split; data and base hashes; wall time),
``loss.png`` and ``accuracy.png``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.weights.checkpoint import save_checkpoint, write_json
from core.classifier import SequenceClassifier
from core.weights.fetch import sha256_file
from core.device import resolve_device
from training.activation_cache import pad_ids, prefix_activations
from training.base_model import load_base, resolve_base, weights_sha256
from training.classification_metrics import classification_report, predict_at, threshold_for_precision
from training.job_config import config_to_dict
from training.plots import plot_curves
from training.progress import JobProgress
from training.schedule import SCHEDULES, LRSchedule
from training.spam_data import LABELS, SpamExample, load_spam_splits, resolve_spam_data

log = logging.getLogger(__name__)


class SpamFinetuneError(ValueError):
    """A spam fine-tuning setting that cannot work (too many trainable blocks, a bad value)."""


THRESHOLD_RULES = ("argmax", "validation")


@dataclass
class SpamConfig:
    base: str = field(default="smollm2-135m-instruct", metadata={"help": "base checkpoint directory or known model name"})
    data: Path | None = field(default=None, metadata={"help": "SMSSpamCollection file or the UCI zip; when absent the zip is downloaded"})
    out: Path = field(default=Path("runs/spam"), metadata={"help": "output directory (checkpoint, metrics.json, plots)"})
    trainable_blocks: int = field(default=1, metadata={"help": "how many of the last transformer blocks to train"})
    epochs: int = field(default=5, metadata={"help": "passes over the training split"})
    # Chosen by validation accuracy (docs/finetuning.md); the book's 5e-5 learns too slowly for one block.
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=8, metadata={"help": "messages per optimizer step"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule after warm-up (cosine decays to 0)",
                                                         "choices": SCHEDULES})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from ~0 to --lr"})
    max_length: int = field(default=256, metadata={"help": "messages are cut to this many tokens"})
    activation_cache: bool = field(default=True, metadata={"help": "compute the frozen prefix once per message and reuse it"})
    select_best: bool = field(default=True, metadata={"help": "keep the epoch with the best validation accuracy"})
    seed: int = field(default=123, metadata={"help": "seed for the split, the head's init and the batch order"})
    average_seeds: int = field(default=1, metadata={"help": "train this many times from the same start (batch orders seed, "
                                                           "seed+1, ...) and save the average of the trained weights"})
    threshold: str = field(default="validation", metadata={
        "help": "spam decision threshold: argmax (spam when more likely than ham) or validation (the highest "
                "validation recall at --min-precision), stored in the checkpoint", "choices": THRESHOLD_RULES})
    min_precision: float = field(default=1.0, metadata={"help": "validation precision the chosen threshold must keep"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; when absent torch decides"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    progress_file: Path | None = field(default=None, metadata={"help": "keep this JSON file up to date with the job's progress (training.progress)"})

    def __post_init__(self) -> None:
        for name in ("trainable_blocks", "epochs", "batch_size", "max_length", "average_seeds"):
            if getattr(self, name) < 1:
                raise SpamFinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SpamFinetuneError(f"--lr must be positive, got {self.lr}")
        if self.threshold not in THRESHOLD_RULES:
            raise SpamFinetuneError(f"--threshold must be one of {', '.join(THRESHOLD_RULES)}, got {self.threshold!r}")
        if not 0.0 < self.min_precision <= 1.0:
            raise SpamFinetuneError(f"--min-precision must be in (0, 1], got {self.min_precision}")


# -- the model -------------------------------------------------------------------


def build_classifier(backbone: nn.Module, trainable_blocks: int, num_classes: int = 2, seed: int = 123) -> SequenceClassifier:
    """The base with a fresh class head; only the last ``trainable_blocks`` blocks, final norm and head train."""
    n_layers = backbone.cfg.n_layers
    if trainable_blocks > n_layers:
        raise SpamFinetuneError(f"--trainable-blocks {trainable_blocks} exceeds the base's {n_layers} blocks")
    torch.manual_seed(seed)
    model = SequenceClassifier(backbone, num_classes).to(next(backbone.parameters()).device)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*backbone.blocks[n_layers - trainable_blocks:], backbone.final_norm, model.head]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def encode_texts(tokenizer, examples: list[SpamExample], max_length: int) -> list[list[int]]:
    # A message that encodes to nothing (impossible for the UCI file, but cheap to
    # guard) still needs one token to read the class from.
    return [tokenizer.encode(e.text)[:max_length] or [tokenizer.eos_id] for e in examples]


def pad_hidden(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return nn.utils.rnn.pad_sequence(rows, batch_first=True), torch.tensor([r.shape[0] for r in rows])


class SpamInputs:
    """One split, as token ids or as cached prefix activations, yielding batches for the model."""

    def __init__(self, model: SequenceClassifier, encoded: list[list[int]], labels: list[int], pad_id: int,
                 start_block: int | None) -> None:
        self.model, self.encoded, self.pad_id, self.start_block = model, encoded, pad_id, start_block
        self.labels = torch.tensor(labels)
        self.cached = prefix_activations(model.backbone, encoded, start_block) if start_block else None

    def __len__(self) -> int:
        return len(self.encoded)

    def logits(self, rows: list[int]) -> torch.Tensor:
        """Class logits for the given message indices: the uncached and cached paths compute the same."""
        device = next(self.model.parameters()).device
        if self.cached is None:
            ids, lengths = pad_ids([self.encoded[i] for i in rows], self.pad_id)
            return self.model(ids.to(device), lengths.to(device))
        hidden, lengths = pad_hidden([self.cached[i] for i in rows])
        return self.model.forward_from(hidden.to(device), self.start_block, lengths.to(device))

    @torch.no_grad()
    def all_logits(self, batch_size: int = 32) -> torch.Tensor:
        """(N, classes) float64 logits of the whole split in eval mode, in message order."""
        was_training = self.model.training
        self.model.eval()
        out = torch.empty(len(self), len(LABELS), dtype=torch.float64)
        order = sorted(range(len(self)), key=lambda i: len(self.encoded[i]))  # little padding
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            out[rows] = self.logits(rows).double().cpu()
        self.model.train(was_training)
        return out

    def evaluate(self, batch_size: int = 32) -> tuple[float, list[int]]:
        """Mean loss and argmax predictions over the whole split (eval mode)."""
        logits = self.all_logits(batch_size)
        return nn.functional.cross_entropy(logits, self.labels).item(), logits.argmax(-1).tolist()

    def spam_log_odds(self) -> list[float]:
        """Per message, log p(spam) - log p(ham): the score a decision threshold cuts."""
        logits = self.all_logits()
        return (logits[:, 1] - logits[:, 0]).tolist()


# -- training --------------------------------------------------------------------


def lr_schedule(cfg: SpamConfig, n_train: int) -> LRSchedule:
    """The learning rate of each optimizer step: the pretraining job's schedule, decaying to 0."""
    return LRSchedule(cfg.lr, 0.0, cfg.warmup_steps, math.ceil(n_train / cfg.batch_size) * cfg.epochs, cfg.schedule)


def train_classifier(model: SequenceClassifier, splits: dict[str, SpamInputs], cfg: SpamConfig,
                     order_seed: int | None = None, progress: JobProgress | None = None,
                     member: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The book's train_classifier_simple, with a full evaluation after every epoch.

    ``order_seed`` (default ``cfg.seed``) seeds the batch order; ``member`` (k of n runs whose
    weights are averaged) places this run's steps in the job's ``progress``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed if order_seed is None else order_seed)
    train = splits["train"]
    schedule = lr_schedule(cfg, len(train))
    history: dict[str, list] = {"step": [], "step_loss": [], "epoch": [], "examples_seen": [], "elapsed_s": [],
                                "train_loss": [], "val_loss": [], "train_accuracy": [], "val_accuracy": []}
    start = time.perf_counter()
    best: tuple[float, float, int, dict] | None = None
    step = 0
    steps_total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train), generator=generator).tolist()
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s : s + cfg.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step)
            logits = train.logits(rows)
            loss = nn.functional.cross_entropy(logits.float(), train.labels[rows].to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history["step"].append(step)
            history["step_loss"].append(loss.item())
            if progress is not None:
                k, n = member
                run = f"run {k + 1}/{n}, " if n > 1 else ""
                progress.step(k * steps_total + step, n * steps_total,
                              f"{run}epoch {epoch}/{cfg.epochs}, step {step}/{steps_total}")
        train_loss, train_pred = train.evaluate()
        val_loss, val_pred = splits["val"].evaluate()
        train_acc = classification_report(train.labels.tolist(), train_pred)["accuracy"]
        val_acc = classification_report(splits["val"].labels.tolist(), val_pred)["accuracy"]
        for key, value in (("epoch", epoch), ("examples_seen", step * cfg.batch_size),
                           ("elapsed_s", round(time.perf_counter() - start, 2)), ("train_loss", train_loss),
                           ("val_loss", val_loss), ("train_accuracy", train_acc), ("val_accuracy", val_acc)):
            history[key].append(value)
        log.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.0f s)",
                 epoch, train_loss, train_acc, val_loss, val_acc, history["elapsed_s"][-1])
        # Best = highest validation accuracy, ties broken by lower validation loss.
        if cfg.select_best and (best is None or (val_acc, -val_loss) > (best[0], best[1])):
            state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
            best = (val_acc, -val_loss, epoch, state)
    history["best_epoch"] = cfg.epochs
    if best is not None:
        model.load_state_dict(best[3], strict=False)
        history["best_epoch"] = best[2]
    return history


# -- averaging seeds, and the decision threshold -------------------------------------


@dataclass
class Member:
    """One training run of the job: its batch-order seed, trained weights and per-split spam log-odds."""

    seed: int
    state: dict[str, torch.Tensor]
    history: dict[str, Any]
    best_epoch: int
    scores: dict[str, list[float]]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def split_scores(inputs: dict[str, SpamInputs]) -> dict[str, list[float]]:
    return {name: split.spam_log_odds() for name, split in inputs.items()}


def train_members(model: SequenceClassifier, inputs: dict[str, SpamInputs], cfg: SpamConfig,
                  progress: JobProgress | None = None) -> list[Member]:
    """``cfg.average_seeds`` runs from the same start (the base's blocks, one head init), batch
    orders seeded ``cfg.seed``, ``cfg.seed + 1``, ...; all reuse one frozen-prefix cache."""
    start = trainable_state(model)
    members = []
    for k in range(cfg.average_seeds):
        model.load_state_dict(start, strict=False)
        history = train_classifier(model, inputs, cfg, order_seed=cfg.seed + k, progress=progress,
                                   member=(k, cfg.average_seeds))
        members.append(Member(cfg.seed + k, trainable_state(model), history, history["best_epoch"], split_scores(inputs)))
    return members


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform "model soup" (Wortsman et al., 2022): the mean of weights fine-tuned from one start.

    Runs that share their starting point stay in one basin of the loss, so their mean is a
    model of its own (one checkpoint, served at one model's cost) rather than a blur."""
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def mean_probability_log_odds(member_scores: list[list[float]]) -> list[float]:
    """Spam log-odds of the mean of the members' spam probabilities (an ensemble's output).

    Computed from log-sigmoids so probabilities within 1e-16 of 1 still order correctly."""
    s = torch.tensor(member_scores, dtype=torch.float64)
    k = math.log(len(member_scores))
    log_p = torch.logsumexp(nn.functional.logsigmoid(s), 0) - k
    log_q = torch.logsumexp(nn.functional.logsigmoid(-s), 0) - k
    return (log_p - log_q).tolist()


def log_odds_to_probability(log_odds: float) -> float:
    return 1.0 / (1.0 + math.exp(-log_odds))


def decision_threshold(cfg: SpamConfig, val_truth: list[int], val_scores: list[float]) -> tuple[float | None, str]:
    """The spam log-odds at or above which a message is called spam (None: argmax), and the rule that chose it.

    Only the validation split chooses it; the test split stays an unbiased estimate."""
    if cfg.threshold == "argmax":
        return None, "argmax: spam when more likely than ham"
    chosen = threshold_for_precision(val_truth, val_scores, cfg.min_precision)
    if chosen is None:
        log.warning("no threshold reaches validation precision %.3f; the classifier decides by argmax", cfg.min_precision)
        return None, f"argmax: no threshold reached validation precision {cfg.min_precision:g}"
    return chosen, f"highest validation recall at validation precision >= {cfg.min_precision:g}"


def compare_variants(members: list[Member], scores: dict[str, list[float]], truth: dict[str, list[int]],
                     min_precision: float) -> dict[str, Any]:
    """Validation and test metrics of each member, of their mean probability and of their
    weight average, each decided by argmax and by a threshold chosen on validation (docs/finetuning.md's table)."""
    candidates = {f"seed {m.seed}": m.scores for m in members}
    if len(members) > 1:
        candidates[f"mean probability of {len(members)} seeds"] = {
            name: mean_probability_log_odds([m.scores[name] for m in members]) for name in ("val", "test")
        }
        candidates[f"weight average of {len(members)} seeds"] = scores

    def compact(name: str, split_scores: list[float], threshold: float) -> dict[str, Any]:
        report = classification_report(truth[name], predict_at(split_scores, threshold))
        return {k: report[k] for k in ("accuracy", "precision", "recall", "f1", "confusion_matrix")}

    variants = {}
    for label, by_split in candidates.items():
        chosen = threshold_for_precision(truth["val"], by_split["val"], min_precision)
        variants[label] = {"argmax": {name: compact(name, by_split[name], 0.0) for name in ("val", "test")}}
        if chosen is not None:
            variants[label]["validation threshold"] = {
                "log_odds": chosen, "probability": log_odds_to_probability(chosen),
                **{name: compact(name, by_split[name], chosen) for name in ("val", "test")},
            }
    return variants


# -- the job ----------------------------------------------------------------------


def write_plots(out: Path, history: dict[str, list], batch_size: int) -> None:
    # Smooth the per-step loss over about a tenth of an epoch so the trend is visible.
    steps, losses = history["step"], history["step_loss"]
    window = max(1, len(steps) // (10 * max(1, len(history["epoch"]))))
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    plot_curves(
        out / "loss.png",
        {
            "train (per step, smoothed)": ([s * batch_size for s in steps], smoothed),
            "train (epoch end)": (history["examples_seen"], history["train_loss"]),
            "validation (epoch end)": (history["examples_seen"], history["val_loss"]),
        },
        "examples seen", "cross-entropy loss", "Spam classifier: loss",
    )
    plot_curves(
        out / "accuracy.png",
        {"train": (history["epoch"], history["train_accuracy"]), "validation": (history["epoch"], history["val_accuracy"])},
        "epoch", "accuracy", "Spam classifier: accuracy",
    )


def finetune_spam(cfg: SpamConfig) -> Path:
    """Run the spam fine-tune described by ``cfg``; returns the output checkpoint directory."""
    start, start_cpu = time.perf_counter(), time.process_time()
    progress = JobProgress(cfg.progress_file, title="spam classifier", role="classifier", checkpoint=Path(cfg.out))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_path = resolve_spam_data(cfg.data)
    splits = load_spam_splits(data_path, cfg.seed)
    lr_schedule(cfg, len(splits.train))  # a --warmup-steps longer than the run fails before the slow part
    base_dir = resolve_base(cfg.base)
    base = load_base(base_dir, resolve_device(cfg.device))
    backbone = base.model
    n_layers = backbone.cfg.n_layers
    model = build_classifier(backbone, cfg.trainable_blocks, len(LABELS), cfg.seed)
    pad_id = base.tokenizer.eos_id if base.tokenizer.eos_id is not None else 0
    start_block = n_layers - cfg.trainable_blocks if cfg.activation_cache else None
    log.info("spam fine-tune: base %s (%d blocks, training the last %d), data %s, activation cache %s",
             base_dir, n_layers, cfg.trainable_blocks, data_path, "on" if start_block else "off")

    progress.stage("computing the frozen blocks' activations once per message")
    t_cache, cpu_cache = time.perf_counter(), time.process_time()
    inputs = {
        name: SpamInputs(model, encode_texts(base.tokenizer, part, cfg.max_length), [e.label for e in part], pad_id, start_block)
        for name, part in splits.items()
    }
    cache_s, cache_cpu = time.perf_counter() - t_cache, time.process_time() - cpu_cache
    if start_block:
        log.info("cached the frozen prefix (blocks 0-%d) of %d messages in %.0f s",
                 start_block - 1, sum(map(len, inputs.values())), cache_s)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    members = train_members(model, inputs, cfg, progress)
    history = members[0].history
    if len(members) > 1:
        model.load_state_dict(average_states([m.state for m in members]), strict=False)
    scores = members[0].scores if len(members) == 1 else split_scores(inputs)
    train_s, train_cpu = time.perf_counter() - t_train, time.process_time() - cpu_train

    truth = {name: split.labels.tolist() for name, split in inputs.items()}
    threshold, rule = decision_threshold(cfg, truth["val"], scores["val"])
    cut = 0.0 if threshold is None else threshold  # log-odds 0: the more likely label
    reports = {name: classification_report(truth[name], predict_at(scores[name], cut)) for name in inputs}
    variants = compare_variants(members, scores, truth, cfg.min_precision)
    model.eval()
    out = Path(cfg.out)
    metadata = {
        "name": out.name,
        "base": str(base_dir),
        "base_sha256": weights_sha256(base_dir),
        "max_length": cfg.max_length,
        "finetune": "spam",
    }
    if threshold is not None:
        # core.classifier.classify calls a text spam when p(spam) >= this, so the service,
        # `scratchgpt classify` and `evaluate spam` all decide as the reports below did.
        metadata.update(threshold=log_odds_to_probability(threshold), threshold_rule=rule)
    save_checkpoint(out, model, base.tokenizer, task="classification", chat_template=base.chat_template,
                    labels=list(LABELS), metadata=metadata)
    write_plots(out, history, cfg.batch_size)
    total_s = time.perf_counter() - start
    metrics = {
        **reports,
        "labels": list(LABELS),
        "confusion_matrix_layout": "rows = true label, columns = predicted label, in the order of labels",
        "sizes": {name: len(part) for name, part in splits.items()},
        "data": {"path": str(data_path), "sha256": sha256_file(data_path)},
        "base": {"path": str(base_dir), "sha256": metadata["base_sha256"], "n_layers": n_layers},
        "trainable_blocks": cfg.trainable_blocks,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "activation_cache": bool(start_block),
        "best_epoch": history.pop("best_epoch"),
        "threshold": {"rule": rule, "log_odds": threshold,
                      "probability": None if threshold is None else log_odds_to_probability(threshold)},
        "average_seeds": [{"seed": m.seed, "best_epoch": m.best_epoch} for m in members],
        "variants": variants,
        "wall_time_s": round(total_s, 2),
        # CPU seconds (all threads) beside wall seconds: on a shared machine the wall
        # clock measures the neighbours as much as the job.
        "cpu_time_s": round(time.process_time() - start_cpu, 2),
        "timing_s": {"prefix_cache": round(cache_s, 2), "training": round(train_s, 2)},
        "cpu_timing_s": {"prefix_cache": round(cache_cpu, 2), "training": round(train_cpu, 2)},
        "config": config_to_dict(cfg),
        "history": history,
    }
    write_json(out / "metrics.json", metrics)
    log.info("test accuracy %.4f, F1 %.4f; wall time %.1f s; wrote %s", reports["test"]["accuracy"], reports["test"]["f1"], total_s, out)
    progress.done(out)
    return out


def classify_texts(checkpoint: str | Path, texts: list[str], device: str = "auto") -> list[dict[str, Any]]:
    """``scratchgpt classify``: label and spam probability per text."""
    from core.weights.checkpoint import load_checkpoint
    from core.classifier import classify

    ckpt = load_checkpoint(checkpoint, resolve_device(device))
    if ckpt.task != "classification":
        raise SpamFinetuneError(f"--checkpoint {checkpoint} is a {ckpt.task} checkpoint, not a classifier")
    positive = ckpt.labels[-1]
    return [
        {"text": text, "label": p.label, f"{positive}_probability": p.probabilities[positive], "probabilities": p.probabilities}
        for text, p in zip(texts, classify(ckpt, texts))
    ]
