"""core.fast.fused_layers: a layer of a decoding step as one kernel call gives the block's own results
(GPT-2 with panels, Llama with GGUF blocks)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from core.fast import fused_layers
from core.model.config import ModelConfig
from core.fast.fused_layers import FusedGPT2Block, FusedLlamaBlock, kernels
from core.fast.serving import ServingDecoder
from core.fast.transforms import FastConfig, make_fast
from core.generation.generate import GenerationConfig, generate
from core.model.kv_cache import KVCache
from core.model import GPTModel
from fused_models import tiny_gpt2 as tiny
from gguf_files import block_model
from kernel_marks import needs_kernels

pytestmark = [needs_kernels(kernels, "decode-layer kernel"), pytest.mark.usefixtures("one_torch_thread")]


def fused_copy(model: GPTModel) -> ServingDecoder:
    fast = make_fast(copy.deepcopy(model))
    assert "fused_layers (2 layers, one kernel call each when decoding)" in fast.report.applied
    assert all(isinstance(block, FusedGPT2Block) for block in fast.model.blocks)
    return fast


def test_a_decoding_step_matches_the_block_to_fp32_rounding(monkeypatch):
    model = tiny()
    fast = fused_copy(model)
    calls = []  # (that the kernel ran, not the block's code)
    real = kernels()
    monkeypatch.setattr(fused_layers, "kernels", lambda: SimpleNamespace(
        gpt2_layer=lambda *args: calls.append(args[0].shape) or real.gpt2_layer(*args)))
    with torch.no_grad():  # larger activations: GELU's tails and a peaked softmax are exercised
        for p in model.parameters():
            p.mul_(3.0)
        fast.model.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 500, (3, 9), generator=torch.Generator().manual_seed(1))
    caches = [KVCache(model.cfg, 3) for _ in range(2)]
    with torch.inference_mode():
        for m, cache in zip((model, fast), caches):
            m(prompt, cache=cache)  # prefill: the block's own code in both
        step = torch.tensor([[3], [4], [5]])
        plain, fused = model(step, cache=caches[0]), fast(step, cache=caches[1])
        assert calls == [(3, 1, 48)] * 2
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
        # The new token's keys and values went into the cache, where the block's code puts them.
        assert torch.allclose(caches[1].keys, caches[0].keys, atol=1e-5) and caches[1].length == caches[0].length == 10
        assert torch.allclose(caches[1].values, caches[0].values, atol=1e-5)


@pytest.mark.parametrize("batch, new_tokens", [(1, 8), (2, 4), (2, 3)])
@pytest.mark.parametrize("padded, cached", [(False, 9), (True, 9), (False, 0)])
def test_several_new_tokens_per_sequence_match_the_block(batch, new_tokens, padded, cached, monkeypatch):
    # Speculative decoding's verifying pass: a few tokens after the cache, each seeing its own prefix only.
    # With nothing cached and no padding there is no mask: the kernel's own causal limit does it.
    model = tiny()
    fast = fused_copy(model)
    calls = []
    real = kernels()
    monkeypatch.setattr(fused_layers, "kernels", lambda: SimpleNamespace(
        gpt2_layer=lambda *args: calls.append(args[0].shape) or real.gpt2_layer(*args)))
    g = torch.Generator().manual_seed(2)
    prompt, chunk = torch.randint(0, 500, (batch, 9), generator=g), torch.randint(0, 500, (batch, new_tokens), generator=g)
    mask = torch.ones(batch, cached + new_tokens, dtype=torch.long)
    if padded:
        mask[0, :3] = 0  # the first sequence is left-padded
    caches = [KVCache(model.cfg, batch) for _ in range(2)]
    with torch.inference_mode():
        for m, cache in zip((model, fast), caches):
            if cached:
                m(prompt, cache=cache, attention_mask=mask[:, :9] if padded else None)  # 9 rows or more: the block's code
        assert calls == []
        plain = model(chunk, cache=caches[0], attention_mask=mask if padded else None)
        fused = fast(chunk, cache=caches[1], attention_mask=mask if padded else None)
    assert calls == [(batch, new_tokens, 48)] * 2
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    assert caches[1].length == caches[0].length == cached + new_tokens
    assert torch.allclose(caches[1].keys, caches[0].keys, atol=1e-5)
    assert torch.allclose(caches[1].values, caches[0].values, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_greedy_tokens_equal_the_plain_model_with_padding_and_eight_rows(qkv_bias):
    model = tiny(qkv_bias=qkv_bias)
    fast = fused_copy(model)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20]] + [[21 + i] * (i + 1) for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=24)  # past the 40-token window: the uncached fallback too
    assert fast.generate(prompts, cfg) == generate(model, prompts, cfg)
    assert fast.generate(prompts[:1], cfg) == generate(model, prompts[:1], cfg)


def test_what_the_kernel_does_not_take_runs_the_blocks_own_code():
    model = tiny()
    fast = fused_copy(model)
    ids = torch.randint(0, 500, (9, 4), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        # Nine rows (more than the kernel's eight) and a returned attention map: the block's code.
        caches = [KVCache(model.cfg, 9) for _ in range(2)]
        for m, cache in zip((model, fast), caches):
            m(ids, cache=cache)
        step = ids[:, :1]
        assert torch.allclose(fast(step, cache=caches[1]), model(step, cache=caches[0]), atol=1e-4)
        _, attentions = fast.model(ids[:1], return_attention=True)
        assert len(attentions) == 2
    # Training: the block's code, and gradients reach the shared parameters.
    fast.model.train()
    fast(ids[:1]).sum().backward()
    assert fast.model.blocks[0].attn.qkv.weight.grad is not None


def test_state_dict_copies_and_other_families_are_kept():
    model = tiny()
    fast = fused_copy(model)
    assert list(fast.model.state_dict()) == list(model.state_dict())
    twin = copy.deepcopy(fast)
    cfg = GenerationConfig(max_new_tokens=6)
    assert twin.generate([[1, 2, 3]], cfg) == generate(model, [[1, 2, 3]], cfg)
    llama = GPTModel(ModelConfig(family="llama", vocab_size=500, context_length=40, emb_dim=48, n_layers=2,
                                 n_heads=4, n_kv_heads=2, hidden_dim=96)).eval()
    assert "fused_layers" not in str(make_fast(llama).report)
    assert "fused_layers" not in str(make_fast(tiny(), FastConfig(panels=False)).report)
    assert "fused_layers" not in str(make_fast(tiny().bfloat16()).report)


# -- Llama layers from GGUF blocks ----------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_llama(tmp_path_factory):
    """A tiny Llama (grouped-query heads) whose linear layers are Q4_1 and Q8_0 blocks, and its blocks."""
    return block_model(tmp_path_factory.mktemp("gguf") / "m.gguf", tied=True)


def llama_pair(gguf_llama):
    """Serving decoders of (GGUF blocks with torch's code around them, the same with fused layers)."""
    model, blocks = gguf_llama
    unfused = make_fast(copy.deepcopy(model), FastConfig(fused_layers=False), gguf_blocks=blocks)
    fused = make_fast(copy.deepcopy(model), gguf_blocks=blocks)
    assert f"fused_layers ({model.cfg.n_layers} layers, one kernel call each when decoding)" in fused.report.applied
    assert all(isinstance(block, FusedLlamaBlock) for block in fused.model.blocks)
    return unfused, fused


def test_a_llama_decoding_step_matches_the_block_to_fp32_rounding(gguf_llama, monkeypatch):
    unfused, fused = llama_pair(gguf_llama)
    cfg = unfused.cfg
    assert cfg.n_kv_heads < cfg.n_heads  # grouped-query heads
    calls = []
    real = kernels()
    monkeypatch.setattr(fused_layers, "kernels", lambda: SimpleNamespace(
        llama_layer=lambda *args: calls.append(args[0].shape) or real.llama_layer(*args)))
    prompt = torch.randint(0, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(3))
    caches = [KVCache(cfg, 3) for _ in range(2)]
    with torch.inference_mode():
        for m, cache in zip((unfused, fused), caches):
            m(prompt, cache=cache)
        step = torch.tensor([[3], [4], [5]])
        plain, ours = unfused(step, cache=caches[0]), fused(step, cache=caches[1])
    assert calls == [(3, 1, cfg.emb_dim)] * cfg.n_layers
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    assert torch.allclose(caches[1].keys, caches[0].keys, atol=1e-5)  # rotated keys, where torch's code puts them
    assert torch.allclose(caches[1].values, caches[0].values, atol=1e-5)


def test_llama_greedy_tokens_and_a_changed_weight(gguf_llama):
    model, _ = gguf_llama
    unfused, fused = llama_pair(gguf_llama)
    prompts = [[3, 14, 15, 92, 65], [2, 71], [9, 9, 9, 9, 9, 9, 9]]  # left-padded: the key mask
    cfg = GenerationConfig(max_new_tokens=16)
    assert fused.generate(prompts, cfg) == unfused.generate(prompts, cfg)
    # A weight changed after the blocks were attached: the block's own (dense) code, not stale blocks.
    with torch.no_grad():
        fused.model.blocks[1].ff.up.weight.mul_(2.0)
        plain = copy.deepcopy(model)
        plain.blocks[1].ff.up.weight.mul_(2.0)
    assert fused.generate(prompts[:1], cfg) == generate(plain, prompts[:1], cfg)
