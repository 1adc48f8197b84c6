"""Resolving ``--base`` for the fine-tuning jobs: a checkpoint directory or a known model name.

A path to a directory is used as it is (it must be a scratchgpt checkpoint);
a name that ``scratchgpt download`` knows (``smollm2-135m-instruct``,
``gpt2-124m``, aliases such as ``smollm2``) resolves to its converted
checkpoint under ``$SCRATCHGPT_HOME/models/<name>/`` and is obtained first
when it is not there yet.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from core.paths import models_dir
from core.weights.catalogue import MODELS, CatalogueError, resolve_model_name
from core.weights.checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_config
from core.weights.download import download_model

log = logging.getLogger(__name__)


class BaseModelError(ValueError):
    """A ``--base`` that names neither a checkpoint directory nor a model we can obtain."""


def _looks_like_path(base: str) -> bool:
    return "/" in base or "\\" in base or base.startswith((".", "~"))


def resolve_base(base: str | Path) -> Path:
    """The checkpoint directory for ``--base``, obtaining a known model when it is missing."""
    text = str(base)
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            read_config(path)
        except CheckpointError as e:
            raise BaseModelError(f"--base {text}: {e}") from None
        return path
    if isinstance(base, Path) or _looks_like_path(text):
        raise BaseModelError(f"--base {text}: no checkpoint directory there; give a checkpoint directory or a model name")

    try:
        source = resolve_model_name(text)
    except CatalogueError:
        raise BaseModelError(
            f"--base {text!r} is neither a checkpoint directory nor a known model; "
            f"known models: {', '.join(MODELS)}"
        ) from None
    target = models_dir() / source.name
    if (target / "config.json").is_file():
        return target
    log.info("base model %s is not in %s; obtaining it as `scratchgpt download %s` does", source.name, target, source.name)
    return Path(download_model(source.name))


def load_base(base: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load ``--base`` as a causal language model checkpoint (float32: what training needs)."""
    path = resolve_base(base)
    checkpoint = load_checkpoint(path, device, torch.float32)
    if checkpoint.task != "causal-lm":
        raise BaseModelError(
            f"--base {base}: {path} is a {checkpoint.task} checkpoint; fine-tuning starts from a causal-lm checkpoint"
        )
    return checkpoint


def weights_sha256(checkpoint_dir: str | Path) -> str:
    """sha256 of a checkpoint's ``model.safetensors``: which base a fine-tune started from."""
    h = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
