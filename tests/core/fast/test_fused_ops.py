"""core.fast.fused_ops: the one-call RMSNorm and rotary embedding compute what core.model.layers computes.

The kernels are compiled on first use (about 30 s, then cached); the tests skip,
saying why, where they cannot be built (no compiler, no AVX-512).
"""

from __future__ import annotations

import copy

import pytest
import torch

from core.fast.transforms import FastConfig, make_fast
from core.fast.fused_ops import FusedRMSNorm, fused_rope, kernels, use_fused_ops
from core.generation.generate import GenerationConfig, generate
from core.model.layers import RMSNorm, apply_rope
from kernel_marks import needs_kernels
from test_transforms import PROMPTS, tiny

pytestmark = needs_kernels(kernels, "fused kernels")


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (40, 50), (2, 17)])
def test_rms_norm_matches_the_formula(shape):
    """Odd widths exercise the tail after the 16-wide sums; 40 rows the threaded path."""
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape) * 3
    with torch.no_grad():
        expected = norm.formula(x)
        got = FusedRMSNorm(norm)(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_rope_equals_apply_rope_bit_for_bit():
    """On the strided slice of the fused QKV projection the attention layer passes it."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 3, 15, 64)
    x = qkv[:, :, :12]  # queries and keys: not contiguous
    cos, sin = torch.randn(2, 1, 3, 64).transpose(1, 2), torch.randn(2, 1, 3, 64).transpose(1, 2)
    assert torch.equal(fused_rope(x, cos, sin), apply_rope(x, cos, sin))


def test_autograd_and_other_dtypes_take_the_plain_code():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    fused = FusedRMSNorm(copy.deepcopy(norm))
    x = torch.randn(4, 32, requires_grad=True)
    fused(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    norm(x).square().sum().backward()
    torch.testing.assert_close(grad, x.grad)
    assert fused.weight.grad is not None  # the shared parameter trains as before
    with torch.no_grad():
        half = torch.randn(2, 32, dtype=torch.bfloat16)
        assert torch.equal(FusedRMSNorm(norm.bfloat16())(half), norm(half))
        cos = torch.randn(1, 1, 2, 32, dtype=torch.bfloat16).transpose(1, 2)
        q = torch.randn(1, 2, 3, 32, dtype=torch.bfloat16)
        assert torch.equal(fused_rope(q, cos, cos), apply_rope(q, cos, cos))


@pytest.mark.parametrize("use_cache", [True, False])
def test_make_fast_fuses_a_llama_and_keeps_its_tokens(use_cache):
    model = tiny("llama")
    fast = make_fast(copy.deepcopy(model), FastConfig(prepack=False, screened_head=False))
    assert "fused_ops (7 RMSNorms and rotary embeddings)" in str(fast.report)  # 2 layers x 2 norms + final, 2 rotations
    assert sum(isinstance(m, FusedRMSNorm) for m in fast.model.modules()) == 5
    assert fast.model.state_dict().keys() == model.state_dict().keys()
    cfg = GenerationConfig(max_new_tokens=8, use_cache=use_cache)
    assert fast.generate(PROMPTS, cfg) == generate(model, PROMPTS, cfg)  # rows of three lengths: padded and masked
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert copy.deepcopy(fast)(ids).shape == model(ids).shape


def test_models_without_the_ops_or_in_other_dtypes_are_left_alone():
    gpt2 = tiny("gpt2")
    assert use_fused_ops(gpt2) == 0
    assert "fused_ops" not in str(make_fast(gpt2, FastConfig(prepack=False)).report)
    llama = tiny("llama").bfloat16()
    report = make_fast(llama, FastConfig(prepack=False)).report
    assert "fp32 CPU only" in report.skipped["fused_ops"]
    assert not any(isinstance(m, FusedRMSNorm) for m in llama.modules())


def test_a_machine_without_a_compiler_keeps_the_plain_ops_and_is_told_why(monkeypatch):
    from core.fast import kernels as kernels_module

    model = tiny("llama")
    kernels_module._build.cache_clear()
    monkeypatch.setattr(kernels_module.shutil, "which", lambda name: None)
    try:
        report = make_fast(model, FastConfig(prepack=False, screened_head=False)).report
        assert "C++ compiler" in report.skipped["fused_ops"]
        assert type(model.final_norm) is RMSNorm
        assert model.blocks[0].attn.rotate is apply_rope
    finally:
        kernels_module._build.cache_clear()
