"""core.model.loss: the fused output projection + cross-entropy equals the plain computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.model.config import ModelConfig
from core.model.loss import linear_cross_entropy
from core.model import GPTModel


def reference(hidden, weight, targets):
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("rows", [1, 63, 64, 200])
def test_loss_and_gradients_equal_cross_entropy_in_fp32(rows):
    torch.manual_seed(rows)
    hidden = torch.randn(rows, 48, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1000, 48, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 1000, (rows,))
    targets[::7] = -100  # positions not counted (padding in fine-tuning)
    if (targets == -100).all():
        targets[0] = 3
    ours = linear_cross_entropy(hidden, weight, targets)
    g_ours = torch.autograd.grad(ours * 2.5, (hidden, weight))  # an upstream gradient other than 1
    ref = reference(hidden, weight, targets)
    g_ref = torch.autograd.grad(ref * 2.5, (hidden, weight))
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_under_bf16_autocast_it_matches_autocast_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 100, 64, requires_grad=True)
    weight = torch.randn(3000, 64, requires_grad=True)
    targets = torch.randint(0, 3000, (2, 100))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets)
        ref = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-3)
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == torch.float32  # gradients come back in the parameters' dtype
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_without_gradients_it_only_measures():
    hidden, weight = torch.randn(10, 8), torch.randn(50, 8, requires_grad=True)  # a parameter, as in evaluation
    targets = torch.randint(0, 50, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    assert torch.allclose(loss, reference(hidden, weight, targets))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_with_targets_returns_the_loss_of_its_logits(family):
    torch.manual_seed(0)
    extra = {"n_kv_heads": 2} if family == "llama" else {}
    cfg = ModelConfig(family=family, vocab_size=97, context_length=32, emb_dim=32, n_layers=2, n_heads=4, **extra)
    a, b = GPTModel(cfg), GPTModel(cfg)
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    fused = a(x, targets=y)
    plain = F.cross_entropy(b(x).flatten(0, 1), y.flatten())
    fused.backward()
    plain.backward()
    assert torch.allclose(fused, plain, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name
