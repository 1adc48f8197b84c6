"""Our checkpoint format: a directory anyone can read without our code.

    model.safetensors   the tensors (safetensors: no pickle, so loading a
                        checkpoint from an untrusted source cannot run code)
    config.json         architecture, tokenizer, chat template, task, labels
    tokenizer.json      the tokenizer, when it is not GPT-2's (which ships with us)

Writes are atomic: everything goes into a temporary sibling directory that is
fsynced and renamed into place, so a process killed mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.classifier import SequenceClassifier
from core.generation.chat_template import ChatTemplate
from core.model import GPTModel
from core.model.config import ConfigError, ModelConfig
from core.model.layers import rope_tables
from core.tokenizer import load_tokenizer, save_tokenizer
from core.weights.gguf import BLOCKS_FILE, save_blocks

FORMAT = "scratchgpt"
VERSION = 1
TASKS = ("causal-lm", "classification")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Any
    task: str = "causal-lm"
    chat_template: ChatTemplate | None = None
    labels: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.metadata.get("name") or self.path.name

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a generated answer: the tokenizer's end-of-sequence token."""
        return (self.tokenizer.eos_id,) if self.tokenizer.eos_id is not None else ()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open ``path`` for writing so that a crash leaves the old file or the new one, never half of one.

    The bytes go to ``<name>.tmp`` beside it; on leaving the block they are
    fsynced, renamed over ``path``, and the directory is fsynced so that the
    rename itself survives a power cut. An exception removes the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` atomically (see ``atomic_file``)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory to its final name, replacing what was there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory that replaces ``path`` whole or not at all.

    Yields a temporary sibling to write into; on leaving the block it is
    fsynced and renamed over ``path`` (``replace_dir``). An exception removes it
    and leaves ``path`` as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer,
    *,
    task: str = "causal-lm",
    chat_template: ChatTemplate | None = None,
    labels: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    gguf_blocks: dict[str, tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Write model weights and everything needed to use them, atomically.

    ``gguf_blocks``: the quantized blocks of a GGUF file the weights came from,
    kept beside them for decoding (``core.fast.gguf_matvec``)."""
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; expected one of {TASKS}")
    final = Path(path)
    cfg: ModelConfig = model.cfg
    with atomic_dir(final) as tmp:
        tensors = state_dict if state_dict is not None else model.state_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        with open(tmp / "model.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        if gguf_blocks:
            save_blocks(tmp, gguf_blocks)
            with open(tmp / BLOCKS_FILE, "rb+") as f:
                os.fsync(f.fileno())
        config = {
            "format": FORMAT,
            "version": VERSION,
            "task": task,
            "model": cfg.to_dict(),
            "tokenizer": save_tokenizer(tokenizer, tmp),
            "chat_template": chat_template.to_dict() if chat_template else None,
            "labels": labels,
            "metadata": metadata or {},
        }
        write_json(tmp / "config.json", config)
    return final


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a scratchgpt checkpoint: config.json is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is corrupt: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_file} is not a scratchgpt checkpoint config (no \"format\": \"{FORMAT}\")")
    if config.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer scratchgpt (format version {config['version']})")
    if config.get("task", "causal-lm") not in TASKS:
        raise CheckpointError(f"{config_file}: unknown task {config.get('task')!r}")
    return config


def build_model(config: dict[str, Any]) -> tuple[ModelConfig, torch.nn.Module]:
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"bad model config in checkpoint: {e}") from None
    # Meta device: no memory or init time spent on weights about to be replaced.
    with torch.device("meta"):
        model = GPTModel(cfg)
        if config.get("task") == "classification":
            model = SequenceClassifier(model, len(config.get("labels") or []))
    return cfg, model


def load_weights(model: torch.nn.Module, weights_file: Path, device: str | torch.device, dtype) -> torch.nn.Module:
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file} is missing")
    try:
        state = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_file} is corrupt or truncated: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{weights_file}: tensor {name} has shape {tuple(tensor.shape)}, config expects {tuple(expected[name].shape)}"
            )
        if dtype is not None and tensor.is_floating_point():
            state[name] = tensor.to(dtype)
    model.load_state_dict(state, assign=True)
    # Buffers that are not stored (rotary tables) were created on the meta device.
    backbone = getattr(model, "backbone", model)
    if getattr(backbone, "rope_cos", None) is not None:
        cos, sin = rope_tables(backbone.cfg)
        backbone.rope_cos, backbone.rope_sin = cos, sin
    return model.to(device).eval()


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load a checkpoint directory written by save_checkpoint; raises CheckpointError with the reason."""
    path = Path(path)
    config = read_config(path)
    cfg, model = build_model(config)
    model = load_weights(model, path / "model.safetensors", device, dtype)
    try:
        tokenizer = load_tokenizer(config.get("tokenizer") or {"type": "gpt2"}, path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {path}: {e}") from None
    template = config.get("chat_template")
    return Checkpoint(
        path=path,
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        task=config.get("task", "causal-lm"),
        chat_template=ChatTemplate.from_dict(template) if template else None,
        labels=config.get("labels"),
        metadata=config.get("metadata") or {},
    )
