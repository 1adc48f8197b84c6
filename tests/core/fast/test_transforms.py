"""core.fast.transforms: every serving transform gives the plain model's tokens and (within float rounding) logits."""

import copy
import os

import pytest
import torch

from core.model.config import ModelConfig
from core.fast.kernels import FastPathError
from core.fast.packed import PackedLinear, onednn_available
from core.fast.screened_head import ScreenedHead
from core.fast.serving import ServingDecoder
from core.fast.transforms import FastConfig, make_fast
from core.generation.generate import GenerationConfig, generate
from core.model.kv_cache import KVCache
from core.model import GPTModel
from core.fast.panels import kernels as panel_kernels
from kernel_marks import needs_kernels

pytestmark = [
    pytest.mark.skipif(not onednn_available(torch.float32), reason="torch built without oneDNN"),
    pytest.mark.usefixtures("one_torch_thread"),  # tiny matrices: see tests/conftest.py
]
needs_bf16 = pytest.mark.skipif(not onednn_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
needs_panels = needs_kernels(panel_kernels, "panel kernel")

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20]]


def tiny(family: str, **kw) -> GPTModel:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=1000, context_length=24, emb_dim=48, n_layers=2, n_heads=4)
    if family == "llama":
        base.update(n_kv_heads=2, hidden_dim=96)
    base.update(kw)
    model = GPTModel(ModelConfig(**base)).eval()
    # Trained-looking logits: spread them out so greedy is not a coin toss between near-ties.
    with torch.no_grad():
        model.head_weight.mul_(8.0)
    return model


def fast_copy(model: GPTModel, **kw) -> ServingDecoder:
    """A serving decoder of a copy of ``model`` with ``make_fast``'s transforms."""
    return make_fast(copy.deepcopy(model), FastConfig(**kw))


# -- prepacked linears --------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_packed_linear_matches_linear_fp32(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    packed = PackedLinear(linear)
    x = torch.randn(2, rows, 64)
    with torch.inference_mode():
        assert torch.allclose(packed(x), linear(x), atol=1e-5, rtol=1e-5)


@needs_bf16
def test_packed_linear_matches_linear_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).bfloat16()
    packed = PackedLinear(linear)
    x = torch.randn(5, 64).bfloat16()
    with torch.inference_mode():
        out, ref = packed(x).float(), linear(x).float()
    assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2)


def test_packed_linear_repacks_after_the_weight_changes_and_trains_through_autograd():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    packed = PackedLinear(linear)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        linear.weight.mul_(2.0)  # e.g. load_state_dict after make_fast
    with torch.inference_mode():
        assert torch.allclose(packed(x), linear(x), atol=1e-5)
        assert not torch.allclose(packed(x), before)
    # With autograd on, it is a plain linear layer: gradients flow to the shared parameters.
    packed(x).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.shape == (16, 32)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_make_fast_keeps_the_state_dict_and_parameter_count(family):
    model = tiny(family, tie_embeddings=family == "gpt2")
    fast = fast_copy(model).model
    assert list(fast.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), model.state_dict().values()))
    assert fast.num_parameters() == model.num_parameters()
    # ... so a fast model's weights load back into a plain one.
    GPTModel(model.cfg).load_state_dict(fast.state_dict())


def test_a_fast_model_can_be_copied_and_follows_new_weights():
    model = tiny("gpt2")
    fast = fast_copy(model)
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        fast(ids), fast(ids, argmax_only=True)  # build the packed copies
        twin = copy.deepcopy(fast)  # packed tensors are opaque: the copy rebuilds its own
        assert torch.allclose(twin(ids), model(ids), atol=1e-4)
    other = tiny("gpt2", vocab_size=1000)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast.model.load_state_dict(other.state_dict())  # in-place copies: the packed snapshots go stale
    with torch.inference_mode():
        assert torch.allclose(fast(ids), other(ids), atol=1e-4)
        assert torch.equal(fast(ids, argmax_only=True).argmax(-1), other(ids).argmax(-1))


# -- screened output layer ----------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("panels", [False, pytest.param(True, marks=needs_panels)])
def test_screened_head_bound_holds_and_argmax_is_exact(panels):
    torch.manual_seed(0)
    V, d = 5000, 72  # d not a multiple of 16, vocabulary not of 64
    rows = 8 if panels else 64  # the panel kernel screens decoding's up to eight rows, oneDNN more
    weight = torch.randn(V, d) * 0.05
    # Near-ties: rows that differ from row 0 by less than bf16 can resolve.
    weight[1:40] = weight[0] + torch.randn(39, d) * 1e-5
    head = ScreenedHead(weight, panels=panels)
    hidden = torch.nn.functional.layer_norm(torch.randn(rows, d), (d,))
    hidden[:4] = weight[0] / weight[0].norm() * d**0.5  # queries aimed at the near-tied rows
    with torch.inference_mode():
        exact = torch.nn.functional.linear(hidden, weight)
        approx = head.screen(hidden, weight)
        beta = head.bound(hidden, approx)
        assert ((approx - exact).abs() <= beta[:, None]).all()  # the error bound the screen relies on
        assert (approx - exact).abs().max() > 0  # (it is the bf16 screen, not an exact product)
        logits = head(hidden, weight)
    finite = logits.isfinite()
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    assert torch.allclose(logits[finite], exact[finite], atol=1e-5)
    assert finite.sum(-1).max() < V // 10  # it does screen: one shared candidate set for all rows


@needs_bf16
def test_screened_head_leaves_one_row_to_the_plain_product_without_panels():
    weight = torch.randn(300, 32)
    hidden = torch.randn(1, 1, 32)
    with torch.inference_mode():
        assert torch.equal(ScreenedHead(weight)(hidden, weight), torch.nn.functional.linear(hidden, weight))


@needs_panels
def test_screened_head_screens_one_row_with_panels():
    torch.manual_seed(0)
    weight = torch.randn(3000, 64)
    hidden = torch.randn(1, 1, 64) * 3
    with torch.inference_mode():
        logits = ScreenedHead(weight, panels=True)(hidden, weight)
        exact = torch.nn.functional.linear(hidden, weight)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    assert logits.isfinite().sum() < 300  # screened: most rows never scored in fp32


def test_screened_head_refuses_a_half_precision_head():
    with pytest.raises(FastPathError, match="screened_head=False"):
        ScreenedHead(torch.randn(10, 16).bfloat16())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_argmax_only_logits_have_the_plain_argmax(family):
    model = tiny(family)
    fast = fast_copy(model)
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(ids)
        screened = fast(ids, argmax_only=True)
        full = fast(ids)
    assert torch.equal(screened.argmax(-1), plain.argmax(-1))
    assert torch.allclose(full, plain, atol=1e-4)  # without argmax_only: every logit, packed kernels


# -- decoding -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_fast_greedy_tokens_equal_plain(family, use_cache):
    model = tiny(family)
    fast = fast_copy(model)
    # 20 new tokens on a 24-token context also exercises the cropped window.
    cfg = GenerationConfig(max_new_tokens=20, use_cache=use_cache)
    assert fast.generate(PROMPTS, cfg) == generate(model, PROMPTS, cfg)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_sampling_sees_the_plain_distribution(family):
    model = tiny(family)
    fast = fast_copy(model)
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        cache_a, cache_b = KVCache(model.cfg, 1), KVCache(model.cfg, 1)
        a, b = model(ids, cache=cache_a, last_only=True), fast(ids, cache=cache_b, last_only=True)
        assert torch.allclose(a.softmax(-1), b.softmax(-1), atol=1e-6)
        step = torch.tensor([[3]])
        assert torch.allclose(model(step, cache=cache_a), fast(step, cache=cache_b), atol=1e-4)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=50, seed=3)
    assert fast.generate(PROMPTS, cfg) == generate(model, PROMPTS, cfg)


@needs_bf16
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_bf16_skips_the_screen_and_stays_close(family):
    model = tiny(family).bfloat16()
    fast = make_fast(copy.deepcopy(model))
    report = fast.report
    assert "screened_head" in report.skipped and fast.argmax_head is None
    assert any(a.startswith("prepack") for a in report.applied)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = model(ids).float(), fast(ids).float()
        # A decoding step's two rows: the panel kernel where it builds.
        a1, b1 = model(ids[:, :1]).float(), fast(ids[:, :1]).float()
    # bf16 keeps ~3 significant digits; different kernels round differently.
    for plain, ours in ((a, b), (a1, b1)):
        assert (plain - ours).abs().max() < 0.05 * plain.abs().max()
        assert (plain.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


@needs_panels
def test_fp32_decoding_reads_panels_and_keeps_no_onednn_copy():
    fast = make_fast(copy.deepcopy(tiny("gpt2")))
    report = fast.report
    assert "panels (8 linears and the output layer)" in report.applied
    assert "prompts are as fast unpacked" in report.skipped["prepack"]
    linear = fast.model.blocks[0].attn.qkv
    assert linear._packed is None and linear._panels is not None and "panels" in repr(linear)
    # That nothing is built for a model whose layers all decode from GGUF blocks is checked with
    # real blocks in test_gguf_matvec.py: only they give a serving decoder its output layer first.


@needs_bf16
def test_report_and_bad_config():
    report = make_fast(copy.deepcopy(tiny("gpt2")), FastConfig(prepack=False, panels=False)).report
    assert report.applied == ["screened_head"] and "prepack" not in str(report)
    with pytest.raises(ValueError, match="batch_hint"):
        FastConfig(batch_hint=0)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SCRATCHGPT_TEST_COMPILE"),
    reason="torch.compile takes ~15 min here even for a tiny model; set SCRATCHGPT_TEST_COMPILE=1 to run it",
)
def test_compiled_model_gives_the_same_tokens():
    """torch.compile with freezing gives the plain model's tokens."""
    model = tiny("gpt2")
    fast = make_fast(copy.deepcopy(model), FastConfig(compile=True, screened_head=False))
    report = fast.report
    assert report.compile_seconds is not None and report.compile_seconds > 0
    cfg = GenerationConfig(max_new_tokens=12)
    assert fast.generate(PROMPTS, cfg) == generate(model, PROMPTS, cfg)
