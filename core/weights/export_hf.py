"""Our checkpoints as Hugging Face model directories: the inverse of ``core.weights.hf``.

``export_hf`` writes what ``transformers``' ``from_pretrained`` reads, and so
what the serving engines built on its formats load (vLLM, TGI, SGLang)::

    config.json               GPT2LMHeadModel or LlamaForCausalLM
    model.safetensors         the weights under transformers' names
    generation_config.json    the ids that start and end a sequence
    tokenizer.json            the tokenizer, in Hugging Face tokenizers' format
    tokenizer_config.json     special tokens, and the chat template when the checkpoint has one
    special_tokens_map.json

The weights go through the name tables of ``core.weights.hf`` the other way:
GPT-2's linears back to ``Conv1D``'s ``(in, out)``, our fused ``qkv`` back to
Llama's three projections. Our Llama Q/K rows are already in Hugging Face's
order (rotate-half RoPE), so nothing is permuted; only GGUF needs that.

A LoRA fine-tune exports like any other checkpoint: the instruction fine-tune
merges the adapters into the weights before it saves (``training.lora.merge_lora``),
so a checkpoint never holds adapters.

This module also holds what both exporters share (``ExportError``, the checks
on the checkpoint and on the destination); ``core.weights.export_gguf`` is the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.generation.chat_template import ChatTemplate
from core.model.config import ModelConfig
from core.tokenizer.export import ByteLevelVocab, TokenizerExportError, byte_level_vocab, hf_tokenizer_json
from core.weights.checkpoint import Checkpoint, CheckpointError, atomic_dir, load_checkpoint, write_json
from core.weights.hf import (
    GPT2_BLOCK_NAMES,
    GPT2_MODEL_NAMES,
    HEAD_NAME,
    LLAMA_BLOCK_NAMES,
    LLAMA_MODEL_NAMES,
    LLAMA_QKV_NAMES,
    qkv_rows,
)

StateDict = dict[str, torch.Tensor]

FORMATS = ("hf", "gguf")
HF_OUTTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ExportError(ValueError):
    """A checkpoint that cannot be exported in the format asked for, or a destination we will not write."""


# -- shared by both exporters ----------------------------------------------------------


def exportable(checkpoint: Checkpoint | str | Path) -> Checkpoint:
    """The checkpoint (loaded when given as a directory), if it is a model the formats can describe."""
    if not isinstance(checkpoint, Checkpoint):
        try:
            checkpoint = load_checkpoint(checkpoint)
        except CheckpointError as err:
            raise ExportError(str(err)) from None
    cfg = checkpoint.config
    if checkpoint.task != "causal-lm":
        raise ExportError(
            f"{checkpoint.path} is a {checkpoint.task} model; only causal language models export "
            "(their classification head has no place in these formats)"
        )
    if cfg.family == "gpt2" and cfg.kv_heads != cfg.n_heads:
        raise ExportError(f"{checkpoint.path}: a GPT-2 with grouped-query attention has no transformers equivalent")
    if cfg.family == "llama" and cfg.qkv_bias:
        raise ExportError(f"{checkpoint.path}: a Llama with QKV biases has no transformers Llama equivalent")
    return checkpoint


def split_qkv(weight: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Our fused ``attn.qkv`` rows as the query, key and value projections."""
    return tuple(t.contiguous() for t in torch.split(weight, qkv_rows(cfg), dim=0))


def check_destination(out: str | Path, fmt: str) -> Path:
    """``out`` if writing the export there loses nothing but an earlier export.

    An HF export is a directory: it may exist only empty or holding an earlier
    export's files. A GGUF export is a file: it may replace only a GGUF file.
    """
    out = Path(out).expanduser()
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} is a file; a Hugging Face export is a directory")
        if out.is_dir():
            others = sorted(p.name for p in out.iterdir() if p.name not in HF_FILES)
            if others:
                raise ExportError(
                    f"{out} already holds files that are not an earlier export ({', '.join(others[:5])}); "
                    "choose a new directory"
                )
    else:
        if out.is_dir():
            raise ExportError(f"{out} is a directory; a GGUF export is one file (e.g. {out / 'model.gguf'})")
        if out.exists():
            with open(out, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ExportError(f"{out} exists and is not a GGUF file; choose a new file name")
    return out


def vocab_of(checkpoint: Checkpoint) -> ByteLevelVocab:
    try:
        return byte_level_vocab(checkpoint.tokenizer, checkpoint.config.vocab_size)
    except TokenizerExportError as err:
        raise ExportError(f"{checkpoint.path}: {err}") from None


def stop_token_ids(vocab: ByteLevelVocab, template: ChatTemplate | None) -> list[int]:
    """The end-of-sequence id, then each stop string of the chat template that is one special token
    (``<|im_end|>``), so that engines stop where our chat stops."""
    ids = [vocab.eos_id] if vocab.eos_id is not None else []
    for text in template.stop if template else ():
        token_id = vocab.special_tokens.get(text)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


# -- Hugging Face ------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, vocab: ByteLevelVocab, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' ``config.json`` for ``cfg``: the inverse of ``gpt2_config_from_hf`` / ``llama_config_from_hf``."""
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": vocab.bos_id if vocab.bos_id is not None else vocab.eos_id,
        "eos_token_id": vocab.eos_id,
        "torch_dtype": _TORCH_DTYPE_NAMES[dtype],
        "use_cache": True,
    }
    if cfg.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length,
            "n_embd": cfg.emb_dim,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_dim,  # None: 4 * n_embd, in both
            # Our GELU is the tanh form (Hendrycks & Gimpel, 2016), which transformers calls gelu_new.
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            **common,
        }
    scaling = cfg.extra.get("rope_scaling")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4's keys, which transformers 5 still reads and vLLM expects.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(scaling) if scaling else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **common,
    }


def hf_state_dict(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict under transformers' names and layouts (``convert_*_state_dict`` backwards)."""
    out: StateDict = {}
    if cfg.family == "gpt2":
        for ours, theirs in GPT2_MODEL_NAMES.items():
            out["transformer." + theirs] = sd[ours]
        for i in range(cfg.n_layers):
            p = f"blocks.{i}."
            for ours, (theirs, conv1d) in GPT2_BLOCK_NAMES.items():
                if ours == "attn.qkv.bias" and not cfg.qkv_bias:
                    # transformers' GPT-2 always has this bias; zeros compute what ours computes without one.
                    tensor = torch.zeros(sum(qkv_rows(cfg)), dtype=sd[p + "attn.qkv.weight"].dtype)
                else:
                    tensor = sd[p + ours]
                out[f"transformer.h.{i}.{theirs}"] = tensor.t() if conv1d else tensor
    else:
        for ours, theirs in LLAMA_MODEL_NAMES.items():
            out[theirs] = sd[ours]
        for i in range(cfg.n_layers):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            for name, tensor in zip(LLAMA_QKV_NAMES, split_qkv(sd[p + "attn.qkv.weight"], cfg)):
                out[h + name] = tensor
            for ours, theirs in LLAMA_BLOCK_NAMES.items():
                out[h + theirs] = sd[p + ours]
    if not cfg.tie_embeddings:
        out[HEAD_NAME] = sd["out_head.weight"]
    return out


def hf_tokenizer_config(vocab: ByteLevelVocab, cfg: ModelConfig, template: ChatTemplate | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        # The generic class loads tokenizer.json as written: our regex, our special tokens.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.context_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special_tokens_map(vocab),
    }
    if template is not None:
        config["chat_template"] = template.portable()
    return config


def special_tokens_map(vocab: ByteLevelVocab) -> dict[str, str]:
    tokens = {"bos_token": vocab.token(vocab.bos_id), "eos_token": vocab.token(vocab.eos_id)}
    return {k: v for k, v in tokens.items() if v is not None}


def export_hf(checkpoint: Checkpoint | str | Path, out: str | Path, outtype: str | None = None) -> Path:
    """Write ``checkpoint`` as a Hugging Face model directory at ``out``; returns ``out``.

    ``outtype``: ``f32``, ``f16`` or ``bf16`` for the weights; ``None`` keeps the dtype they are stored in.
    The directory is built beside ``out`` and renamed into place, so a failed export leaves nothing.
    """
    if outtype is not None and outtype not in HF_OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not a Hugging Face weight type; choose {', '.join(HF_OUTTYPES)}")
    out = check_destination(out, "hf")
    ckpt = exportable(checkpoint)
    cfg = ckpt.config
    sd = {k: v.detach().to("cpu") for k, v in ckpt.model.state_dict().items()}
    dtype = HF_OUTTYPES[outtype] if outtype else sd["tok_emb.weight"].dtype
    tensors = {k: v.to(dtype).contiguous() for k, v in hf_state_dict(sd, cfg).items()}
    vocab = vocab_of(ckpt)

    with atomic_dir(out) as tmp:
        # transformers refuses a safetensors file whose metadata does not say "pt".
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "model.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        write_json(tmp / "config.json", hf_config(cfg, vocab, dtype))
        stops = stop_token_ids(vocab, ckpt.chat_template)
        generation = {"bos_token_id": vocab.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
        write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        write_json(tmp / "tokenizer.json", hf_tokenizer_json(vocab))
        write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(vocab, cfg, ckpt.chat_template))
        write_json(tmp / "special_tokens_map.json", special_tokens_map(vocab))
    return out
