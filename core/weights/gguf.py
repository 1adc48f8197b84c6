"""GGUF files (llama.cpp's format) to our config and state dict.

A GGUF file holds key/value metadata (architecture numbers, the tokenizer, the
chat template) followed by tensors, many of them block-quantized (Q4_1 stores
blocks of 32 weights as 4-bit integers with a per-block scale and minimum;
Q8_0 as 8-bit integers with a per-block scale). The ``gguf`` package from
llama.cpp parses the file and dequantizes the blocks; this module maps the
``llama.*`` (or ``gpt2.*``) metadata to a ``ModelConfig`` and the tensor names
to ours. ``core.weights.export_gguf`` writes such files with the same name tables.

One detail is easy to miss: llama.cpp's converter reorders the rows of every
query and key projection so that its RoPE can rotate adjacent pairs
``(2i, 2i+1)``. Our RoPE rotates ``(i, i + d/2)`` like Hugging Face's Llama, so
we undo that permutation (``unpermute_qk``) and the weights become identical to
the Hugging Face checkpoint they came from.

The tokenizer in the same file is read by ``core.tokenizer.gguf``; ``load_gguf``
returns the metadata it parsed so callers need not parse the file twice (the
parse takes several seconds for a 49k-token vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.model.config import ModelConfig
from core.weights.hf import HFWeightsError, check_state_dict

StateDict = dict[str, torch.Tensor]


class GGUFError(ValueError):
    """A GGUF file we cannot read or convert (corrupt, truncated, unsupported architecture or tensor type)."""


SUPPORTED_ARCHITECTURES = ("llama", "gpt2")

# Block-quantized tensor types that our decoding kernels read as stored (core.fast.gguf_matvec),
# with the bytes of one 32-weight block, and the file a checkpoint keeps them in.
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
BLOCKS_FILE = "gguf_blocks.safetensors"
Blocks = dict[str, tuple[str, torch.Tensor]]  # parameter name -> (GGUF type, (out, bytes per row) uint8)

# Tensor types the gguf package can dequantize with numpy. F32, F16, BF16, Q4_1
# and Q8_0 are checked in our tests; the others share the same code path.
_SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for one projection of shape ``(n_heads * head_dim, d)``.

    llama.cpp's ``convert_hf_to_gguf.py`` maps row ``h*hd + j*hd/2 + i`` of
    Hugging Face's layout to row ``h*hd + 2*i + j`` so that rotary pairs sit next
    to each other; reading the rows as ``(head, i, j)`` and swapping ``i``/``j``
    takes them back.
    """
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of ``unpermute_qk``), for writing GGUF files (core.weights.export_gguf)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    """A reader field as a plain Python value (str, int, float, bool or list)."""
    value = field.contents()
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.BOOL:
        return bool(value)
    if kind == GGUFValueType.FLOAT32:
        # Shortest decimal that round-trips the float32: 1e-05, not 9.999999747378752e-06.
        return float(str(np.float32(value)))
    return value


def _read(path: Path) -> tuple[Any, dict[str, Any]]:
    """Parse the file once: the reader (for tensors) and its metadata as a plain dict."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
        metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as err:
        # The reader raises whatever numpy raises when an offset runs past the
        # end of the memory map, which is what a partial download looks like.
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt download?): {err}") from err
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: tensor {t.name} runs past the end of the file (truncated download?)")
    return reader, metadata


def config_from_gguf_metadata(meta: dict[str, Any], source: str | Path = "GGUF file") -> ModelConfig:
    """Map ``general.architecture`` and the ``<arch>.*`` keys to our ``ModelConfig``."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{source}: architecture {arch!r} is not supported; scratchgpt reads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{source}: metadata key {arch}.{name} is missing")
        return value

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else key("vocab_size")
    d, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    rot = meta.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != d // n_heads:
        raise GGUFError(f"{source}: partial rotary embeddings ({rot} of {d // n_heads} dims) are not supported")
    if arch == "gpt2":
        # llama.cpp's GPT-2 always carries the QKV biases (OpenAI's weights have them).
        return ModelConfig(
            family="gpt2", vocab_size=int(vocab), context_length=int(key("context_length")), emb_dim=d,
            n_layers=int(key("block_count")), n_heads=n_heads, hidden_dim=int(key("feed_forward_length")),
            qkv_bias=True, tie_embeddings=True, norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
        )
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        context_length=int(key("context_length")),
        emb_dim=d,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        hidden_dim=int(key("feed_forward_length")),
        qkv_bias=False,
        tie_embeddings=True,  # set from the tensors: untied files carry output.weight
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
    )


def _dequantize(tensor: Any) -> torch.Tensor:
    arr = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not arr.flags.writeable:
        # F32 tensors come back as views of the read-only memory map; copy so the
        # state dict owns its memory and outlives the file.
        arr = arr.copy()
    # numpy order is GGML's reversed: (out, in) for a matrix, as nn.Linear wants.
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(shape))


# llama.cpp's tensor names to ours, for the whole model and for each block ("blk.{i}." /
# "blocks.{i}."); our fused attn.qkv is three GGUF tensors, with Q and K rows permuted.
# core.weights.export_gguf writes with the same tables.
GGUF_MODEL_NAMES = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "final_norm.weight",
                    "output.weight": "out_head.weight"}
GGUF_QKV_NAMES = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "norm1.weight",
    "attn_output.weight": "attn.proj.weight",
    "ffn_norm.weight": "norm2.weight",
    "ffn_gate.weight": "ff.gate.weight",
    "ffn_up.weight": "ff.up.weight",
    "ffn_down.weight": "ff.down.weight",
}
# GPT-2 as llama.cpp names it: nn.Linear's (out, in) layout, Q, K and V fused like ours.
GPT2_GGUF_MODEL_NAMES = {"token_embd.weight": "tok_emb.weight", "position_embd.weight": "pos_emb.weight",
                         "output_norm.weight": "final_norm.weight", "output_norm.bias": "final_norm.bias",
                         "output.weight": "out_head.weight"}
GPT2_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "norm1.weight", "attn_norm.bias": "norm1.bias",
    "attn_qkv.weight": "attn.qkv.weight", "attn_qkv.bias": "attn.qkv.bias",
    "attn_output.weight": "attn.proj.weight", "attn_output.bias": "attn.proj.bias",
    "ffn_norm.weight": "norm2.weight", "ffn_norm.bias": "norm2.bias",
    "ffn_up.weight": "ff.fc.weight", "ffn_up.bias": "ff.fc.bias",
    "ffn_down.weight": "ff.proj.weight", "ffn_down.bias": "ff.proj.bias",
}


def read_gguf_blocks(path: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """The file's block-quantized weights as stored, under our parameter names, for ``core.fast.gguf_matvec``.

    Only the types its kernels read (Q4_1, Q8_0) are returned, each as its
    ``(out_features, bytes per row)`` uint8 rows: the Q/K rows are unpermuted
    and Q, K, V stacked like ``load_gguf`` does with the dense weights (a row
    permutation moves whole rows of blocks), and a tied output layer is
    ``tok_emb.weight``.
    """
    path = Path(path)
    reader, meta = _read(path)
    cfg = config_from_gguf_metadata(meta, path)
    if cfg.family != "llama":  # the kernels decode the Llama family only
        return {}
    tensors = {t.name: t for t in reader.tensors}

    def raw(name: str) -> tuple[str, torch.Tensor] | None:
        t = tensors.get(name)
        if t is None or t.tensor_type.name not in BLOCK_BYTES:
            return None
        return t.tensor_type.name, torch.from_numpy(np.array(t.data, dtype=np.uint8))

    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    # The output layer; the embedding only when it is the (tied) output layer too, since
    # looking up a token's row is no matrix product.
    head = ("out_head.weight", "output.weight") if "output.weight" in tensors else ("tok_emb.weight", "token_embd.weight")
    if (found := raw(head[1])) is not None:
        blocks[head[0]] = found
    for i in range(cfg.n_layers):
        g, p = f"blk.{i}.", f"blocks.{i}."
        q, k, v = (raw(g + name) for name in GGUF_QKV_NAMES)
        if q and k and v and q[0] == k[0] == v[0]:
            rows = [unpermute_qk(q[1], cfg.n_heads), unpermute_qk(k[1], cfg.kv_heads), v[1]]
            blocks[p + "attn.qkv.weight"] = (q[0], torch.cat(rows, dim=0))
        for src, dst in GGUF_BLOCK_NAMES.items():
            if (found := raw(g + src)) is not None:
                blocks[p + dst] = found
    return blocks


def load_gguf(path: str | Path) -> tuple[ModelConfig, StateDict, dict[str, Any]]:
    """Read a llama- or gpt2-architecture GGUF file into ``(ModelConfig, our state dict in fp32, metadata)``.

    ``metadata`` holds every key/value pair of the file as plain Python values
    (``tokenizer.ggml.tokens``, ``tokenizer.chat_template``, ...).
    """
    path = Path(path)
    reader, meta = _read(path)
    cfg = config_from_gguf_metadata(meta, path)
    tensors = {t.name: t for t in reader.tensors}
    # Check every type before the slow dequantization, so the error comes at once.
    for t in reader.tensors:
        if t.tensor_type.name not in _SUPPORTED_TYPES:
            raise GGUFError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which scratchgpt cannot dequantize "
                f"(supported: {', '.join(_SUPPORTED_TYPES)})"
            )
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1+ scaling) are not supported")
    cfg.tie_embeddings = "output.weight" not in tensors

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name} is missing")
        return _dequantize(tensors.pop(name))

    llama = cfg.family == "llama"
    model_names = GGUF_MODEL_NAMES if llama else GPT2_GGUF_MODEL_NAMES
    sd: StateDict = {ours: take(name) for name, ours in model_names.items()
                     if ours != "out_head.weight" or not cfg.tie_embeddings}
    for i in range(cfg.n_layers):
        g, p = f"blk.{i}.", f"blocks.{i}."
        if llama:
            q, k, v = (take(g + name) for name in GGUF_QKV_NAMES)
            sd[p + "attn.qkv.weight"] = torch.cat([unpermute_qk(q, cfg.n_heads), unpermute_qk(k, cfg.kv_heads), v])
        for src, dst in (GGUF_BLOCK_NAMES if llama else GPT2_GGUF_BLOCK_NAMES).items():
            sd[p + dst] = take(g + src)
    if tensors:
        raise GGUFError(f"{path}: unexpected tensor(s) the converter does not know: {', '.join(sorted(tensors)[:8])}")
    try:
        check_state_dict(sd, cfg, path)
    except HFWeightsError as err:
        raise GGUFError(str(err)) from err
    return cfg, sd, meta


# -- storing the blocks beside a checkpoint --------------------------------------------


def save_blocks(directory: Path, blocks: Blocks) -> None:
    """Write ``blocks`` into a checkpoint directory being built (``gguf_blocks.safetensors``)."""
    save_file({name: data.contiguous() for name, (_, data) in blocks.items()}, str(directory / BLOCKS_FILE),
              metadata={name: gguf_type for name, (gguf_type, _) in blocks.items()})


def load_blocks(directory: Path) -> Blocks:
    """The blocks a checkpoint directory carries; empty when it carries none; ValueError when damaged."""
    path = Path(directory) / BLOCKS_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            types = f.metadata() or {}
            return {name: (types[name], f.get_tensor(name)) for name in f.keys()}
    except (SafetensorError, OSError, KeyError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete it to decode densely") from None


def checkpoint_blocks(directory: str | Path, metadata: dict | None = None) -> Blocks:
    """The GGUF blocks of a checkpoint: its own file, else (checkpoints converted before they
    kept one) those of the GGUF file it was converted from, if that is still there."""
    blocks = load_blocks(Path(directory))
    source = Path(str((metadata or {}).get("source", "")))
    if not blocks and source.suffix == ".gguf" and source.is_file():
        blocks = read_gguf_blocks(source)
    return blocks
