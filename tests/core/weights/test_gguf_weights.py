"""GGUF files -> our GPTModel.

Fast tests write tiny GGUF files the way llama.cpp's converter does (Q/K rows
permuted, tensors quantized) from a random transformers Llama; the slow test
checks the real SmolLM2-135M-Instruct Q4_1 file against transformers' own
GGUF loader and the token ids in docs/recipes-smollm2-gguf.md.
"""

from __future__ import annotations

import os

import pytest
import torch

from core.generation.generate import GenerationConfig, generate
from core.weights.gguf import GGUFError, load_gguf, permute_qk, unpermute_qk
from core.model import GPTModel
from gguf_files import D, FF, LAYERS, N_HEADS, N_KV, VOCAB, Q, hf_llama, write_gguf



def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(3 * 64, 10)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    # Index form from the recipe: W_hf[h*64 + j*32 + i] = W_gguf[h*64 + 2*i + j].
    permuted = permute_qk(w, 3)
    for h, j, i in [(0, 0, 0), (1, 1, 5), (2, 0, 31), (2, 1, 31)]:
        assert torch.equal(w[h * 64 + j * 32 + i], permuted[h * 64 + 2 * i + j])


# ---------------------------------------------------------------------------
# Tiny GGUF files written here (tests/core/gguf_files.py)
# ---------------------------------------------------------------------------

MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F16, "attn_output": Q.BF16,
         "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "output": Q.F16}


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_matches_transformers(tied, tmp_path):
    hf = hf_llama(tied)
    write_gguf(tmp_path / "m.gguf", hf, types={})
    cfg, sd, meta = load_gguf(tmp_path / "m.gguf")
    assert (cfg.family, cfg.emb_dim, cfg.n_heads, cfg.kv_heads, cfg.ff_dim, cfg.vocab_size, cfg.context_length) == (
        "llama", D, N_HEADS, N_KV, FF, VOCAB, 96)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings is tied
    assert meta["tokenizer.chat_template"] == "{{ messages }}" and len(meta["tokenizer.ggml.tokens"]) == VOCAB
    model = GPTModel(cfg)
    model.load_state_dict(sd, strict=True)
    model.eval()
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        ref, seq = [], ids
        for _ in range(16):
            ref.append(int(hf(seq).logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[ref[-1]]])], dim=1)
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=16)) == [ref]


def test_quantized_types_dequantize_exactly(tmp_path):
    """Q4_0, Q4_1, Q8_0, F16 and BF16 tensors come back as gguf's dequantization, unpermuted and fused."""
    expected = write_gguf(tmp_path / "q.gguf", hf_llama(False), types=MIXED)
    cfg, sd, _ = load_gguf(tmp_path / "q.gguf")
    assert torch.equal(sd["tok_emb.weight"], torch.from_numpy(expected["token_embd.weight"]))
    assert torch.equal(sd["out_head.weight"], torch.from_numpy(expected["output.weight"]))
    for i in range(LAYERS):
        g, p = f"blk.{i}.", f"blocks.{i}."
        qkv = torch.cat([
            unpermute_qk(torch.from_numpy(expected[g + "attn_q.weight"]), N_HEADS),
            unpermute_qk(torch.from_numpy(expected[g + "attn_k.weight"]), N_KV),
            torch.from_numpy(expected[g + "attn_v.weight"]),
        ])
        assert torch.equal(sd[p + "attn.qkv.weight"], qkv)
        for src, dst in [("attn_output", "attn.proj"), ("ffn_gate", "ff.gate"), ("ffn_up", "ff.up"),
                         ("ffn_down", "ff.down"), ("attn_norm", "norm1"), ("ffn_norm", "norm2")]:
            assert torch.equal(sd[f"{p}{dst}.weight"], torch.from_numpy(expected[f"{g}{src}.weight"])), src
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "g.gguf", hf_llama(True), types={}, arch="qwen2")
    with pytest.raises(GGUFError, match="architecture 'qwen2' is not supported"):
        load_gguf(tmp_path / "g.gguf")


def test_unsupported_tensor_type(tmp_path):
    write_gguf(tmp_path / "i.gguf", hf_llama(True), types={"ffn_down": Q.I32})
    with pytest.raises(GGUFError, match="blk.0.ffn_down.weight has type I32"):
        load_gguf(tmp_path / "i.gguf")


def test_truncated_and_corrupt_files(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_llama(True), types=MIXED)
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) - 1000, len(data) // 2, 200):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated"):
            load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf(tmp_path / "bad.gguf")
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


# ---------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file (docs/recipes-smollm2-gguf.md)
# ---------------------------------------------------------------------------

# The ChatML prompt for "What is the capital of France?" with the default system prompt.
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
GREEDY_32 = [504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1, 4093, 198, 57, 5248, 3946,
             288, 7198, 253, 725, 1406, 281, 260, 2342, 30, 339, 3543]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """Our model and transformers' from the same GGUF, loaded once for the module."""
    cfg, sd, meta = load_gguf(smollm2_gguf)
    ours = GPTModel(cfg)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return cfg, ours, hf, meta


@pytest.mark.slow
def test_smollm2_gguf_parity(smollm2):
    cfg, ours, hf, meta = smollm2
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.kv_heads, cfg.ff_dim, cfg.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    rel = float((got - ref).abs().max() / ref.abs().max())
    print(f"max |logit diff| {float((got - ref).abs().max()):.2e}, relative {rel:.2e}")
    assert rel < 1e-3
    assert torch.equal(got[0].argmax(-1), ref[0].argmax(-1))
    assert generate(ours, [PROMPT_IDS], GenerationConfig(max_new_tokens=32)) == [GREEDY_32]
