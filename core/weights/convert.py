"""Raw downloads to our checkpoint directories (``models/<name>/``, ``core.weights.checkpoint``).

What ``core.weights.fetch`` leaves in ``downloads/`` comes in three shapes, each
read by its own loader and saved the same way:

* a GGUF file (``core.weights.gguf``): its tokenizer and chat template travel
  inside it (``core.tokenizer.gguf``), and its quantized blocks are kept beside
  the checkpoint for decoding from them (``core.fast.gguf_matvec``);
* a Hugging Face checkpoint directory (``core.weights.hf``): GPT-2 gets GPT-2's
  tokenizer and no chat template, a Llama its ``tokenizer.json``
  (``core.tokenizer.hf``);
* OpenAI's original TensorFlow release of GPT-2 (``core.weights.openai_tf``,
  ``hparams.json`` + ``model.ckpt.*``): GPT-2's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.generation.chat_template import ChatTemplate
from core.model import GPTModel, ModelConfig
from core.paths import models_dir
from core.tokenizer import Tokenizer
from core.tokenizer.gguf import tokenizer_from_gguf
from core.tokenizer.gpt2 import GPT2_VOCAB_SIZE, gpt2_tokenizer
from core.tokenizer.hf import tokenizer_from_hf
from core.weights.catalogue import generation_defaults_for
from core.weights.checkpoint import read_config, save_checkpoint, write_json
from core.weights.gguf import load_gguf, read_gguf_blocks
from core.weights.hf import StateDict, load_hf_checkpoint
from core.weights.openai_tf import load_openai_gpt2

Converted = tuple[ModelConfig, StateDict, Tokenizer, ChatTemplate | None]


class ConversionError(ValueError):
    """Raw files that cannot become a scratchgpt checkpoint."""


def convert_to_checkpoint(raw: str | Path, name: str, dest: str | Path | None = None) -> Path:
    """Turn a raw download (see the module docstring) into a checkpoint directory (``models/<name>/`` by default).

    ``raw`` that already is our checkpoint at ``dest`` is returned as is.
    """
    raw = Path(raw)
    dest = Path(dest) if dest is not None else models_dir() / name
    if _is_our_checkpoint(raw):
        if raw.resolve() != dest.resolve():
            raise ConversionError(f"{raw} is already a scratchgpt checkpoint; copy it to {dest} if you want it there")
        return raw  # download_model already converted it
    metadata: dict[str, Any] = {"name": name, "source": str(raw)}
    defaults = generation_defaults_for(name)
    if defaults:
        metadata["generation_defaults"] = defaults
    blocks = None
    if raw.is_file() and raw.suffix == ".gguf":
        cfg, sd, tokenizer, template = _from_gguf(raw)
        blocks = read_gguf_blocks(raw)  # kept for decoding from them (core.fast.gguf_matvec)
    elif is_openai_tf_dir(raw):
        cfg, sd = load_openai_gpt2(raw)
        tokenizer, template = _gpt2_tokenizer_for(cfg, raw), None
    elif raw.is_dir():
        cfg, sd, tokenizer, template = _from_hf_dir(raw)
    else:
        raise ConversionError(f"{raw}: expected a .gguf file or a Hugging Face checkpoint directory")
    with torch.device("meta"):
        model = GPTModel(cfg)  # only its config is used; the weights come from sd
    return save_checkpoint(dest, model, tokenizer, chat_template=template, metadata=metadata, state_dict=sd,
                           gguf_blocks=blocks)


def stamp_generation_defaults(checkpoint: str | Path, name: str) -> bool:
    """Give a checkpoint converted before its model's decoding defaults were measured those defaults.

    Only ``metadata.generation_defaults`` is added, and only where it is missing (a user's own
    choice stays); returns whether the config changed.
    """
    defaults = generation_defaults_for(name)
    config = read_config(checkpoint)
    metadata = config.setdefault("metadata", {})
    if not defaults or "generation_defaults" in metadata:
        return False
    metadata["generation_defaults"] = defaults
    tmp = Path(checkpoint) / "config.json.tmp"
    write_json(tmp, config)
    tmp.replace(Path(checkpoint) / "config.json")
    return True


def is_openai_tf_dir(path: Path) -> bool:
    """OpenAI's TensorFlow release (``hparams.json``), not a Hugging Face directory (``config.json``)."""
    return (path / "hparams.json").is_file() and not (path / "config.json").is_file()


def _is_our_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("format") == "scratchgpt"
    except (OSError, ValueError, AttributeError):
        return False


def _chat_template(info: dict[str, Any], default_name: str) -> ChatTemplate | None:
    """The chat template a tokenizer reader found; its end-of-turn text is the eos token (``<|im_end|>`` for ChatML)."""
    if not info.get("chat_template"):
        return None
    stop = [info["eos_token"]] if info.get("eos_token") else []
    return ChatTemplate(name=info.get("name") or default_name, template=info["chat_template"], stop=stop)


def _gpt2_tokenizer_for(cfg: ModelConfig, path: Path) -> Tokenizer:
    if cfg.vocab_size != GPT2_VOCAB_SIZE:
        raise ConversionError(f"{path}: a GPT-2 checkpoint with vocab {cfg.vocab_size} does not use GPT-2's tokenizer")
    return gpt2_tokenizer()


def _from_gguf(path: Path) -> Converted:
    cfg, sd, _meta = load_gguf(path)
    # Its own metadata reader takes about a second; cheaper than keeping the GGUFReader alive.
    tokenizer, info = tokenizer_from_gguf(path)
    return cfg, sd, tokenizer, _chat_template(info, path.stem)


def _from_hf_dir(path: Path) -> Converted:
    cfg, sd = load_hf_checkpoint(path)
    if cfg.family == "gpt2":
        return cfg, sd, _gpt2_tokenizer_for(cfg, path), None
    tokenizer, info = tokenizer_from_hf(path)
    return cfg, sd, tokenizer, _chat_template(info, path.name)
