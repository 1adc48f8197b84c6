"""Tiny GGUF files written the way llama.cpp's converter writes them (Q/K rows permuted,
tensors quantized) from a random transformers Llama, for the GGUF tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.weights.gguf import permute_qk

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

D, N_HEADS, N_KV, FF, VOCAB, LAYERS = 64, 4, 2, 160, 320, 2


def hf_llama(tied: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(
        hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV, vocab_size=VOCAB, max_position_embeddings=96, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # wider than HF's init so greedy decoding has no near-ties
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model


def write_gguf(path: Path, hf_model, types: dict[str, Q], arch: str = "llama") -> dict:
    """Write ``hf_model`` as llama.cpp would; returns the fp32 weights a reader should get back (GGUF names)."""
    from gguf.quants import dequantize, quantize

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd and not hf_model.config.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(LAYERS):
        h = f"model.layers.{i}."
        q = permute_qk(torch.from_numpy(sd[h + "self_attn.q_proj.weight"]), N_HEADS).numpy()
        k = permute_qk(torch.from_numpy(sd[h + "self_attn.k_proj.weight"]), N_KV).numpy()
        tensors.update({
            f"blk.{i}.attn_norm.weight": sd[h + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k,
            f"blk.{i}.attn_v.weight": sd[h + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[h + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[h + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[h + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[h + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[h + "mlp.down_proj.weight"],
        })
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(96)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // N_HEADS)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_chat_template("{{ messages }}")
    expected = {}
    for name, arr in tensors.items():
        kind = Q.F32 if arr.ndim == 1 else types.get(name.split(".")[-2], Q.F32)
        if kind == Q.I32:
            w.add_tensor(name, arr.astype(np.int32))
        elif kind == Q.F32:
            w.add_tensor(name, arr)
            expected[name] = arr
        elif kind == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
            expected[name] = arr.astype(np.float16).astype(np.float32)
        else:
            raw = quantize(arr, kind)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
            expected[name] = dequantize(raw, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# Block types as SmolLM2's file has them: Q4_1 linear layers, Q8_0 embedding and output projection.
BLOCK_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
               "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_1, "output": Q.Q8_0}


def block_model(path: Path, tied: bool):
    """Our model loaded from a tiny block-quantized GGUF file written at ``path``, and the file's blocks."""
    from core.weights.gguf import load_gguf, read_gguf_blocks
    from core.model import GPTModel

    write_gguf(path, hf_llama(tied), types=BLOCK_TYPES)
    cfg, state, _ = load_gguf(path)
    model = GPTModel(cfg).eval()
    model.load_state_dict(state)
    return model, read_gguf_blocks(path)
