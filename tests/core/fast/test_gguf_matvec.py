"""core.fast.gguf_matvec: products from GGUF blocks equal the dense products of the weights they hold.

The kernel is compiled on first use (about 30 s, then cached); the tests skip,
saying why, where it cannot be built (no compiler, no AVX-512).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.fast.transforms import FastConfig, FastPathError, make_fast
from core.generation.generate import GenerationConfig, generate
from core.fast.gguf_matvec import (
    GGUFHead,
    MAX_ROWS,
    BlockMatrix,
    GGUFLinear,
    attach_gguf_blocks,
    kernels,
)
from core.weights.gguf import load_blocks, save_blocks
from gguf_files import BLOCK_TYPES, Q, block_model, hf_llama, write_gguf
from kernel_marks import needs_kernels

pytestmark = needs_kernels(kernels, "GGUF kernels")


def quantized(rows: int, cols: int, kind, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights as GGUF blocks (uint8 rows) and gguf's own fp32 dequantization of them."""
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(seed).normal(0, 0.1, (rows, cols)).astype(np.float32)
    raw = quantize(w, kind)
    return torch.from_numpy(np.array(raw)), torch.from_numpy(dequantize(raw, kind).astype(np.float32))


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q8_0])
def test_weights_are_gguf_dequantization_bit_for_bit(kind):
    """With one-hot rows of x the product is a column of the weight itself: no sum can hide a rounding."""
    data, dense = quantized(40, 96, kind)
    for k0 in range(0, 96, 8):
        x = torch.zeros(8, 96)
        x[torch.arange(8), torch.arange(k0, k0 + 8)] = 1.0
        assert torch.equal(BlockMatrix(kind.name, data, 96).matvec(x), dense[:, k0:k0 + 8].T)


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_products_match_dense(kind, rows):
    data, dense = quantized(100, 576, kind, seed=rows)  # 100 rows: uneven across threads
    x = torch.randn(rows, 576, dtype=torch.float64)
    exact = x @ dense.double().T
    matrix = BlockMatrix(kind.name, data, 576)
    got = matrix.matvec(x.float())
    dense_fp32 = x.float() @ dense.T
    # As close to the exact product as torch's own fp32 product is.
    assert float((got - exact).abs().max()) <= 4 * float((dense_fp32 - exact).abs().max()) + 1e-6
    # Leading dimensions are kept.
    assert matrix.matvec(x.float().view(rows, 1, 576)).shape == (rows, 1, 100)
    assert kernels().max_rows == MAX_ROWS


def test_bad_blocks_are_refused():
    data, _ = quantized(8, 64, Q.Q4_1)
    with pytest.raises(ValueError, match="is not Q4_1 rows of 96 weights"):
        BlockMatrix("Q4_1", data, 96)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        BlockMatrix("Q4_1", data, 64).matvec(torch.randn(9, 64))
    with pytest.raises(ValueError, match="Q4_0 has no kernel"):
        BlockMatrix("Q4_0", data, 64)


# -- a whole model from a GGUF file ----------------------------------------------------

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82]]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gguf_model(request, tmp_path_factory):
    return block_model(tmp_path_factory.mktemp("gguf") / "m.gguf", request.param)


def test_file_blocks_name_every_quantized_weight(gguf_model):
    model, blocks = gguf_model
    head = "tok_emb.weight" if model.cfg.tie_embeddings else "out_head.weight"
    expected = {head} | {f"blocks.{i}.{n}.weight" for i in range(2)
                         for n in ("attn.qkv", "attn.proj", "ff.gate", "ff.up", "ff.down")}
    assert set(blocks) == expected


def test_model_decodes_from_blocks_with_the_same_tokens(gguf_model):
    model, blocks = gguf_model
    # Without the fused norms and layers (test_fused_ops.py, test_decode_layer.py), which round
    # in their own order: what is left of the dense path must then be exactly the dense path.
    fast = make_fast(copy.deepcopy(model), FastConfig(fused_ops=False, fused_layers=False), gguf_blocks=blocks)
    assert "gguf_blocks" in str(fast.report)
    # Every layer decodes from its blocks, so no panels are built (nor a reason given for their absence).
    assert "panels" not in str(fast.report)
    assert isinstance(fast.model.blocks[0].attn.qkv, GGUFLinear) and isinstance(fast.argmax_head, GGUFHead)
    assert fast.head is fast.argmax_head
    assert fast.model.state_dict().keys() == model.state_dict().keys()
    cfg = GenerationConfig(max_new_tokens=24)
    assert fast.generate(PROMPTS, cfg) == generate(model, PROMPTS, cfg)
    with torch.inference_mode():
        ids = torch.tensor([PROMPTS[0] + PROMPTS[1] + [5]])
        for n in (1, 3, 8):  # up to 8 rows take the kernel; longer inputs the dense product
            torch.testing.assert_close(fast(ids[:, :n]), model(ids[:, :n]), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fast(ids), model(ids), atol=0, rtol=0)


def test_changed_or_foreign_weights_keep_the_dense_path(gguf_model):
    model, blocks = gguf_model
    fast = make_fast(copy.deepcopy(model), FastConfig(prepack=False, screened_head=False), gguf_blocks=blocks)
    with torch.no_grad():
        fast.model.blocks[0].ff.up.weight.mul_(2.0)  # fine-tuned in place after attaching
        plain = copy.deepcopy(model)
        plain.blocks[0].ff.up.weight.mul_(2.0)
    x = torch.tensor([[4, 5]])
    with torch.inference_mode():
        torch.testing.assert_close(fast(x[:, :1]), plain(x[:, :1]), atol=2e-5, rtol=1e-5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[1].attn.proj.weight.add_(0.01)
    skipped, head = attach_gguf_blocks(other, blocks)
    assert skipped == ["blocks.1.attn.proj.weight (the weight is not the one the blocks hold)"]
    assert isinstance(head, GGUFHead)  # the output layer's weight is still the one its blocks hold
    assert type(other.blocks[1].attn.proj) is torch.nn.Linear


def test_bf16_model_is_not_given_fp32_blocks(gguf_model):
    model, blocks = gguf_model
    half = copy.deepcopy(model).to(torch.bfloat16)
    skipped, head = attach_gguf_blocks(half, blocks)
    assert len(skipped) == len(blocks) and "torch.bfloat16" in skipped[0] and head is None


def test_blocks_round_trip_through_a_checkpoint_directory(gguf_model, tmp_path):
    _, blocks = gguf_model
    save_blocks(tmp_path, blocks)
    back = load_blocks(tmp_path)
    assert back.keys() == blocks.keys()
    assert all(back[k][0] == blocks[k][0] and torch.equal(back[k][1], blocks[k][1]) for k in blocks)
    assert load_blocks(tmp_path / "elsewhere") == {}


def test_checkpoints_keep_the_blocks_and_old_ones_find_their_file(gguf_model, tmp_path):
    from core.weights.checkpoint import save_checkpoint
    from core.weights.gguf import BLOCKS_FILE, checkpoint_blocks
    from core.tokenizer.gpt2 import gpt2_tokenizer

    model, blocks = gguf_model
    ckpt = save_checkpoint(tmp_path / "ckpt", model, gpt2_tokenizer(), gguf_blocks=blocks)
    assert checkpoint_blocks(ckpt).keys() == blocks.keys()
    (ckpt / BLOCKS_FILE).unlink()  # as a checkpoint converted before the blocks were kept
    assert checkpoint_blocks(ckpt) == {}
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_llama(model.cfg.tie_embeddings), types=BLOCK_TYPES)
    assert checkpoint_blocks(ckpt, {"source": str(path)}).keys() == blocks.keys()


def test_a_machine_without_a_compiler_keeps_the_dense_path_and_is_told_why(gguf_model, monkeypatch):
    from core.fast import kernels as kernels_module

    model, blocks = gguf_model
    kernels_module._build.cache_clear()
    monkeypatch.setattr(kernels_module.shutil, "which", lambda name: None)
    try:
        with pytest.raises(FastPathError, match="need a C\\+\\+ compiler and ninja"):
            kernels_module.load_kernels("gguf_matvec")
        fast = make_fast(copy.deepcopy(model), FastConfig(prepack=False, screened_head=False), gguf_blocks=blocks)
        assert "C++ compiler" in fast.report.skipped["gguf_blocks"]
        assert type(fast.model.blocks[0].attn.qkv) is torch.nn.Linear
        assert kernels_module._build.cache_info().hits >= 1  # the failure was not rebuilt for every call
    finally:
        kernels_module._build.cache_clear()
