"""Hugging Face checkpoints (GPT-2 and Llama families) to our state dict.

The book's chapter 5 loads OpenAI's GPT-2 weights tensor by tensor into its own
model, checking every shape on the way (``assign``); this module does the same
for the checkpoint directories that ``transformers`` writes with
``save_pretrained``: ``config.json`` plus ``model.safetensors`` (or shards listed
in ``model.safetensors.index.json``, or a legacy ``pytorch_model.bin`` read with
``torch.load(weights_only=True)``, which refuses pickled code).

Two differences from our layout matter:

* GPT-2's linears are ``Conv1D`` modules that store their weight as
  ``(in, out)``; ``nn.Linear`` stores ``(out, in)``, so every one is transposed.
* Both families keep query, key and value apart (Llama) or fused in one
  ``c_attn`` (GPT-2); we keep one fused ``qkv`` whose rows are all query heads,
  then all key heads, then all value heads.

The names we produce are fixed in docs/architecture.md; ``expected_shapes``
spells them out for a config so every loader (this one, GGUF, OpenAI's
TensorFlow files) can check its output against the same table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.model.config import ModelConfig

StateDict = dict[str, torch.Tensor]


class HFWeightsError(ValueError):
    """A Hugging Face checkpoint we cannot read or convert (missing file, bad shape, unsupported option)."""


# ---------------------------------------------------------------------------
# Our parameter table
# ---------------------------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of our state dict for ``cfg`` with its shape (docs/architecture.md)."""
    d, hd, ff = cfg.emb_dim, cfg.head_dim, cfg.ff_dim
    qkv_rows = (cfg.n_heads + 2 * cfg.kv_heads) * hd
    gpt2 = cfg.family == "gpt2"
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, d)}
    if gpt2:
        shapes["pos_emb.weight"] = (cfg.context_length, d)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        shapes[p + "norm1.weight"] = (d,)
        shapes[p + "attn.qkv.weight"] = (qkv_rows, d)
        if cfg.qkv_bias:
            shapes[p + "attn.qkv.bias"] = (qkv_rows,)
        shapes[p + "attn.proj.weight"] = (d, cfg.n_heads * hd)
        shapes[p + "norm2.weight"] = (d,)
        if gpt2:
            shapes[p + "norm1.bias"] = (d,)
            shapes[p + "attn.proj.bias"] = (d,)
            shapes[p + "norm2.bias"] = (d,)
            shapes[p + "ff.fc.weight"] = (ff, d)
            shapes[p + "ff.fc.bias"] = (ff,)
            shapes[p + "ff.proj.weight"] = (d, ff)
            shapes[p + "ff.proj.bias"] = (d,)
        else:
            shapes[p + "ff.gate.weight"] = (ff, d)
            shapes[p + "ff.up.weight"] = (ff, d)
            shapes[p + "ff.down.weight"] = (d, ff)
    shapes["final_norm.weight"] = (d,)
    if gpt2:
        shapes["final_norm.bias"] = (d,)
    if not cfg.tie_embeddings:
        shapes["out_head.weight"] = (cfg.vocab_size, d)
    return shapes


def check_state_dict(sd: StateDict, cfg: ModelConfig, source: str | Path) -> None:
    """Raise ``HFWeightsError`` unless ``sd`` has exactly the names and shapes ``cfg`` needs."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise HFWeightsError(
            f"{source}: converted state dict does not match the config"
            + (f"; missing: {', '.join(missing[:8])}" if missing else "")
            + (f"; unexpected: {', '.join(extra[:8])}" if extra else "")
        )
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise HFWeightsError(f"{source}: tensor {name} has shape {tuple(sd[name].shape)}, expected {shape}")


class _Source:
    """A source state dict that hands out each tensor once, with a shape check naming the source tensor."""

    def __init__(self, tensors: StateDict, origin: str | Path, dtype: torch.dtype) -> None:
        self.tensors = dict(tensors)
        self.origin = origin
        self.dtype = dtype

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise HFWeightsError(f"{self.origin}: tensor {name} is missing from the checkpoint")
        t = self.tensors.pop(name)
        if tuple(t.shape) != tuple(shape):
            raise HFWeightsError(f"{self.origin}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(self.dtype)

    def pop_optional(self, name: str) -> torch.Tensor | None:
        return self.tensors.pop(name, None)

    def finish(self, ignore_suffixes: tuple[str, ...] = ()) -> None:
        left = sorted(k for k in self.tensors if not k.endswith(ignore_suffixes))
        if left:
            raise HFWeightsError(f"{self.origin}: unexpected tensor(s) the converter does not know: {', '.join(left[:8])}")


# ---------------------------------------------------------------------------
# Reading a checkpoint directory
# ---------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face checkpoint directory as a dict."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise HFWeightsError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HFWeightsError(f"{cfg_file}: not valid JSON ({err})") from err


def read_hf_tensors(path: str | Path) -> StateDict:
    """All tensors of a checkpoint directory: one safetensors file, shards from an index, or a legacy .bin."""
    root = Path(path)
    single, index, legacy = root / "model.safetensors", root / "model.safetensors.index.json", root / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise HFWeightsError(f"{index}: not a safetensors index (needs a 'weight_map')") from err
        files = [root / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise HFWeightsError(f"{index}: shard(s) missing from {root}: {', '.join(absent)}")
    elif legacy.is_file():
        try:
            # weights_only refuses arbitrary pickled objects: a .bin from the
            # internet cannot run code on load.
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad or unsafe pickles
            raise HFWeightsError(f"{legacy}: cannot be read as a plain tensor state dict ({err})") from err
        if not isinstance(tensors, dict):
            raise HFWeightsError(f"{legacy}: expected a dict of tensors, found {type(tensors).__name__}")
        return tensors
    else:
        raise HFWeightsError(
            f"{root}: no weights found; expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    tensors: StateDict = {}
    for f in files:
        try:
            tensors.update(load_file(f, device="cpu"))
        except (SafetensorError, OSError) as err:
            raise HFWeightsError(f"{f}: not a readable safetensors file, truncated or corrupt? ({err})") from err
    return tensors


# ---------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------

# GPT-2 uses the tanh approximation of GELU (Hendrycks & Gimpel, 2016), which
# is what our GELU computes; transformers names it one of these.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def gpt2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers ``GPT2Config`` dict to our ``ModelConfig`` (OpenAI's weights carry QKV biases)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFWeightsError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise HFWeightsError(f"GPT-2 activation {act!r} is not supported; our GELU is the tanh form ({_TANH_GELU})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        raise HFWeightsError("GPT-2 attention scaling options other than 1/sqrt(head_dim) are not supported")
    try:
        d = int(hf["n_embd"])
        return ModelConfig(
            family="gpt2",
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf.get("n_positions") or hf["n_ctx"]),
            emb_dim=d,
            n_layers=int(hf["n_layer"]),
            n_heads=int(hf["n_head"]),
            hidden_dim=int(hf["n_inner"]) if hf.get("n_inner") else None,
            qkv_bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as err:
        raise HFWeightsError(f"GPT-2 config.json lacks {err.args[0]!r}") from err


# Our names to transformers' GPT-2 names (without GPT2LMHeadModel's "transformer." prefix),
# for the whole model and for each block ("h.{i}." / "blocks.{i}."); True marks a Conv1D
# weight, which transformers stores (in, out). core.weights.export_hf writes with the same table.
GPT2_MODEL_NAMES = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
                    "final_norm.weight": "ln_f.weight", "final_norm.bias": "ln_f.bias"}
GPT2_BLOCK_NAMES: dict[str, tuple[str, bool]] = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    # c_attn's output columns are already q | k | v, each n_heads * head_dim wide.
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True),
    "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True),
    "ff.proj.bias": ("mlp.c_proj.bias", False),
}
HEAD_NAME = "lm_head.weight"  # the untied output layer, in both families


def convert_gpt2_state_dict(hf_sd: StateDict, cfg: ModelConfig, origin: str | Path = "checkpoint",
                            dtype: torch.dtype = torch.float32) -> StateDict:
    """Rename and transpose a transformers GPT-2 state dict into ours (Conv1D ``(in, out)`` -> Linear ``(out, in)``)."""
    # Checkpoints saved from GPT2Model (e.g. openai-community/gpt2's own files)
    # have no "transformer." prefix; GPT2LMHeadModel's have it.
    tensors = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    src = _Source(tensors, origin, dtype)
    want = expected_shapes(cfg)

    def take(ours: str, theirs: str, conv1d: bool = False) -> torch.Tensor:
        if conv1d:
            return src.take(theirs, want[ours][::-1]).t().contiguous()
        return src.take(theirs, want[ours])

    sd: StateDict = {ours: take(ours, theirs) for ours, theirs in GPT2_MODEL_NAMES.items()}
    for i in range(cfg.n_layers):
        for ours, (theirs, conv1d) in GPT2_BLOCK_NAMES.items():
            sd[f"blocks.{i}.{ours}"] = take(f"blocks.{i}.{ours}", f"h.{i}.{theirs}", conv1d)
    if cfg.tie_embeddings:
        # A tied checkpoint may still list lm_head (torch.save of a tied model
        # writes it); transformers ignores it in favour of wte, and so do we.
        src.pop_optional(HEAD_NAME)
    else:
        sd["out_head.weight"] = take("out_head.weight", HEAD_NAME)
    # attn.bias / attn.masked_bias are causal-mask buffers older transformers saved.
    src.finish(ignore_suffixes=(".attn.bias", ".attn.masked_bias"))
    check_state_dict(sd, cfg, origin)
    return sd


def load_hf_gpt2(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, StateDict]:
    """Read a Hugging Face GPT-2 checkpoint directory into ``(ModelConfig, our state dict)``."""
    cfg = gpt2_config_from_hf(read_hf_config(path))
    return cfg, convert_gpt2_state_dict(read_hf_tensors(path), cfg, origin=path, dtype=dtype)


# ---------------------------------------------------------------------------
# Llama (SmolLM2, Llama 3.x)
# ---------------------------------------------------------------------------


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling, from either the transformers 4 keys (``rope_theta``, ``rope_scaling``)
    or the transformers 5 ``rope_parameters`` dict."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        # Llama 3.1/3.2 stretch the low RoPE frequencies for long context
        # (Meta, 2024); the model applies it from config.extra["rope_scaling"].
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise HFWeightsError(f"llama3 rope scaling lacks {', '.join(missing)}")
        return theta, {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    raise HFWeightsError(f"RoPE scaling type {rope_type!r} is not supported (only 'llama3' and unscaled RoPE)")


def llama_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers ``LlamaConfig`` dict to our ``ModelConfig``."""
    if hf.get("model_type", "llama") != "llama":
        raise HFWeightsError(f"config.json has model_type {hf.get('model_type')!r}, expected 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFWeightsError(f"Llama activation {hf.get('hidden_act')!r} is not supported; SwiGLU needs 'silu'")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFWeightsError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    try:
        d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        if head_dim is not None and int(head_dim) * n_heads != d:
            raise HFWeightsError(
                f"head_dim {head_dim} x {n_heads} heads != hidden_size {d}; our attention derives head_dim from them"
            )
        theta, scaling = _rope_settings(hf)
        return ModelConfig(
            family="llama",
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf.get("max_position_embeddings", 2048)),
            emb_dim=d,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            hidden_dim=int(hf["intermediate_size"]),
            qkv_bias=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            extra={"rope_scaling": scaling} if scaling else {},
        )
    except KeyError as err:
        raise HFWeightsError(f"Llama config.json lacks {err.args[0]!r}") from err


# Our names to transformers' Llama names, for the whole model and for each block
# ("model.layers.{i}." / "blocks.{i}."); our fused attn.qkv is their three projections.
LLAMA_MODEL_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
LLAMA_BLOCK_NAMES = {
    "norm1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "ff.gate.weight": "mlp.gate_proj.weight",
    "ff.up.weight": "mlp.up_proj.weight",
    "ff.down.weight": "mlp.down_proj.weight",
}
LLAMA_QKV_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def qkv_rows(cfg: ModelConfig) -> tuple[int, int, int]:
    """How many rows of the fused ``attn.qkv`` are query, key and value (grouped-query attention has fewer K/V)."""
    return cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim


def convert_llama_state_dict(hf_sd: StateDict, cfg: ModelConfig, origin: str | Path = "checkpoint",
                             dtype: torch.dtype = torch.float32) -> StateDict:
    """Rename a transformers Llama state dict into ours, fusing q/k/v rows into ``attn.qkv``."""
    src = _Source(hf_sd, origin, dtype)
    want = expected_shapes(cfg)
    sd: StateDict = {ours: src.take(theirs, want[ours]) for ours, theirs in LLAMA_MODEL_NAMES.items()}
    for i in range(cfg.n_layers):
        h, p = f"model.layers.{i}.", f"blocks.{i}."
        # Q/K rows stay in Hugging Face's order, which is what rotate-half RoPE expects.
        sd[p + "attn.qkv.weight"] = torch.cat([
            src.take(h + name, (rows, cfg.emb_dim)) for name, rows in zip(LLAMA_QKV_NAMES, qkv_rows(cfg))
        ], dim=0)
        for ours, theirs in LLAMA_BLOCK_NAMES.items():
            sd[p + ours] = src.take(h + theirs, want[p + ours])
    if cfg.tie_embeddings:
        src.pop_optional(HEAD_NAME)
    else:
        sd["out_head.weight"] = src.take(HEAD_NAME, want["out_head.weight"])
    # rotary_emb.inv_freq is a buffer some older checkpoints saved; we recompute it.
    src.finish(ignore_suffixes=("rotary_emb.inv_freq",))
    check_state_dict(sd, cfg, origin)
    return sd


def load_hf_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, StateDict]:
    """Read a Hugging Face Llama-family checkpoint directory (SmolLM2, Llama 3.2) into ``(ModelConfig, state dict)``."""
    cfg = llama_config_from_hf(read_hf_config(path))
    return cfg, convert_llama_state_dict(read_hf_tensors(path), cfg, origin=path, dtype=dtype)


def load_hf_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, StateDict]:
    """Dispatch on ``model_type`` in config.json to the GPT-2 or Llama loader."""
    model_type = read_hf_config(path).get("model_type")
    if model_type == "gpt2":
        return load_hf_gpt2(path, dtype)
    if model_type == "llama":
        return load_hf_llama(path, dtype)
    raise HFWeightsError(f"{path}: model_type {model_type!r} is not supported (gpt2 or llama)")
