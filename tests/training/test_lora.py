"""LoRA: starts as the base, trains only adapters, merges into identical plain weights."""

import pytest
import torch
from torch import nn

from core.model.config import ModelConfig
from core.model import GPTModel
from training.lora import LoRAError, LoRALinear, apply_lora, lora_parameters, merge_lora


def tiny(family: str) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=97, context_length=32, emb_dim=24, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else None, hidden_dim=48)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_model_gives_the_same_logits(family):
    model = tiny(family)
    ids = torch.randint(0, 97, (2, 11))
    base_logits = model(ids)
    wrapped = apply_lora(model, rank=4, alpha=8)
    expected = {"attn.qkv", "attn.proj"} | ({"ff.fc", "ff.proj"} if family == "gpt2" else {"ff.gate", "ff.up", "ff.down"})
    assert {n.split(".", 2)[2] for n in wrapped} == expected
    # B starts at zero: the adapted model is exactly the base model.
    torch.testing.assert_close(model(ids), base_logits, rtol=0, atol=0)

    # A few optimizer steps move B away from zero.
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = model(ids).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unmerged = model(ids).detach()
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)

    assert merge_lora(model) == len(wrapped)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    # The merged model has the plain parameter names a checkpoint expects.
    assert set(model.state_dict()) == set(tiny(family).state_dict())


def test_only_adapters_train():
    model = tiny("gpt2")
    apply_lora(model, rank=2, alpha=2, targets=["attn.qkv"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.{ab}" for i in range(2) for ab in ("A", "B")}
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * (24 * 2 + 2 * 72)


def test_scale_is_alpha_over_rank():
    layer = nn.Linear(6, 5)
    lora = LoRALinear(layer, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(4, 6)
    torch.testing.assert_close(lora(x), layer(x) + 2.0 * (x @ lora.A @ lora.B))


def test_bad_settings_are_errors():
    with pytest.raises(LoRAError, match="attn.q match no linear layer"):
        apply_lora(tiny("gpt2"), 4, 4, targets=["attn.q"])
    with pytest.raises(LoRAError, match="rank must be >= 1"):
        apply_lora(tiny("gpt2"), 0, 4)
