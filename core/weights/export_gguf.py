"""Our checkpoints as GGUF files (llama.cpp's format): the inverse of ``core.weights.gguf``.

``export_gguf`` writes one file with the ``gguf`` package's ``GGUFWriter``:

* the architecture numbers under ``llama.*`` or ``gpt2.*``;
* the tokenizer as llama.cpp keeps a byte-level BPE (``tokenizer.ggml.model =
  "gpt2"``, the token strings and types, the merges, the pre-tokenizer's name,
  the bos/eos ids) and the chat template (``tokenizer.chat_template``);
* the tensors under llama.cpp's names (the tables of ``core.weights.gguf``),
  Llama's query and key rows permuted the way llama.cpp's converter permutes
  them (``permute_qk``), since its RoPE rotates adjacent pairs where ours and
  Hugging Face's rotate the two halves of a head.

``outtype`` picks the weight type, as llama.cpp's ``convert_hf_to_gguf.py --outtype``
does: ``f32``, ``f16`` (the default), ``bf16``, or ``q8_0`` (blocks of 32 weights
as 8-bit integers with one fp16 scale; a matrix whose rows do not split into
blocks of 32 stays f16). Vectors (norms, biases) and GPT-2's position table are
always f32, as there.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import quantize

from core.model.config import ModelConfig
from core.tokenizer.export import ByteLevelVocab, TokenizerExportError, llama_cpp_pre_tokenizer
from core.weights.checkpoint import Checkpoint, fsync_dir
from core.weights.export_hf import ExportError, check_destination, exportable, split_qkv, stop_token_ids, vocab_of
from core.weights.gguf import GGUF_BLOCK_NAMES, GGUF_MODEL_NAMES, GGUF_QKV_NAMES, GPT2_GGUF_BLOCK_NAMES, \
    GPT2_GGUF_MODEL_NAMES, permute_qk

Q = gguf.GGMLQuantizationType
GGUF_OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Kept in f32 whatever the outtype: llama.cpp's converter does the same for the position table.
_ALWAYS_F32 = ("position_embd.weight",)


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our state dict under llama.cpp's names and layouts, as fp32 arrays (``load_gguf`` backwards)."""
    arrays: dict[str, torch.Tensor] = {}
    if cfg.family == "llama":
        model_names, block_names = GGUF_MODEL_NAMES, GGUF_BLOCK_NAMES
    else:
        model_names, block_names = GPT2_GGUF_MODEL_NAMES, GPT2_GGUF_BLOCK_NAMES
    for theirs, ours in model_names.items():
        if ours in sd:  # out_head.weight only when the output layer is not tied
            arrays[theirs] = sd[ours]
    for i in range(cfg.n_layers):
        g, p = f"blk.{i}.", f"blocks.{i}."
        for theirs, ours in block_names.items():
            if p + ours in sd:
                arrays[g + theirs] = sd[p + ours]
        if cfg.family == "llama":
            q, k, v = split_qkv(sd[p + "attn.qkv.weight"], cfg)
            for name, tensor in zip(GGUF_QKV_NAMES, (permute_qk(q, cfg.n_heads), permute_qk(k, cfg.kv_heads), v)):
                arrays[g + name] = tensor
        elif not cfg.qkv_bias:
            # llama.cpp's and transformers' GPT-2 both require this bias; zeros compute what ours does without.
            arrays[g + "attn_qkv.bias"] = torch.zeros(sd[p + "attn.qkv.weight"].shape[0])
    return {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in arrays.items()}


def _add_architecture(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ff_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.family == "llama":
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: ByteLevelVocab, checkpoint: Checkpoint) -> None:
    try:
        pre = llama_cpp_pre_tokenizer(vocab.pattern)
    except TokenizerExportError as err:
        raise ExportError(f"{checkpoint.path}: {err}") from None
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    # llama.cpp also stops at an end-of-turn token: the chat template's stop token when it is not eos.
    end_of_turn = stop_token_ids(vocab, checkpoint.chat_template)[1:]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(False)
    if checkpoint.chat_template is not None:
        writer.add_chat_template(checkpoint.chat_template.portable())


def _add_tensor(writer: gguf.GGUFWriter, name: str, arr: np.ndarray, kind: Q) -> None:
    if arr.ndim == 1 or name in _ALWAYS_F32 or kind == Q.F32:
        writer.add_tensor(name, arr)
    elif kind == Q.F16 or (kind == Q.Q8_0 and arr.shape[-1] % 32):
        if np.abs(arr).max() > np.finfo(np.float16).max:
            raise ExportError(f"tensor {name} has weights beyond fp16's range; export as f32 or bf16")
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        raw = quantize(arr, kind)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)


def export_gguf(checkpoint: Checkpoint | str | Path, out: str | Path, outtype: str | None = None) -> Path:
    """Write ``checkpoint`` as one GGUF file at ``out``; returns ``out``.

    ``outtype``: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0``. The file is written beside
    ``out`` and renamed into place, so a failed export leaves nothing.
    """
    outtype = outtype or "f16"
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not a GGUF type we write; choose {', '.join(GGUF_OUTTYPES)}")
    out = check_destination(out, "gguf")
    ckpt = exportable(checkpoint)
    cfg = ckpt.config
    if cfg.extra.get("rope_scaling"):
        raise ExportError(
            f"{ckpt.path}: RoPE scaling ({cfg.extra['rope_scaling'].get('rope_type')}) is stored in GGUF as a "
            "rope_freqs tensor, which this exporter does not write; export to hf instead"
        )
    vocab = vocab_of(ckpt)
    tensors = gguf_tensors(ckpt.model.state_dict(), cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, cfg.family)
        writer.add_name(ckpt.name)
        writer.add_file_type(_FILE_TYPES[outtype])
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_architecture(writer, cfg)
        _add_tokenizer(writer, vocab, ckpt)
        for name, arr in tensors.items():
            _add_tensor(writer, name, arr, GGUF_OUTTYPES[outtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
