import pytest
import torch

from core.model.config import ConfigError, ModelConfig
from core.model.kv_cache import KVCache
from core.model.layers import GELU, RMSNorm
from core.model import GPTModel


def tiny(family="gpt2", **kw):
    base = dict(family=family, vocab_size=97, context_length=32, emb_dim=32, n_layers=2, n_heads=4)
    if family == "llama":
        base.update(n_kv_heads=2, hidden_dim=48)
    base.update(kw)
    return ModelConfig(**base)


def test_gpt2_small_parameter_counts_are_exact():
    # OpenAI's released shape: QKV biases, head tied to the token embedding.
    assert GPTModel(ModelConfig.from_preset("gpt2-small")).num_parameters() == 124_439_808
    # The book's chapter 4 model: no QKV bias, separate output head.
    untied = ModelConfig.from_preset("gpt2-small", qkv_bias=False, tie_embeddings=False)
    assert GPTModel(untied).num_parameters() == 163_009_536


def test_presets_and_bad_configs():
    assert ModelConfig.from_preset("gpt2-xl").n_layers == 48
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({"emb_dim": 8, "n_heads": 2, "colour": "red"})
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(emb_dim=30, n_heads=4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_explicit_and_sdpa_attention_agree(family):
    torch.manual_seed(0)
    model = GPTModel(tiny(family)).eval()
    ids = torch.randint(0, 97, (3, 20))
    fast = model(ids)
    model.set_attention_path("explicit")
    slow = model(ids)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_weights_are_causal_distributions(family):
    model = GPTModel(tiny(family)).eval()
    ids = torch.randint(0, 97, (1, 10))
    _, attentions = model(ids, return_attention=True)
    assert len(attentions) == 2
    for weights in attentions:
        assert weights.shape == (1, 4, 10, 10)
        assert torch.allclose(weights.sum(-1), torch.ones(1, 4, 10), atol=1e-5)
        assert torch.all(weights.triu(diagonal=1) == 0)  # nothing attends to the future


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_forward_equals_full_forward(family):
    torch.manual_seed(0)
    model = GPTModel(tiny(family)).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids)
    cache = KVCache(model.cfg, batch_size=2)
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
    pieces += [model(ids[:, i : i + 1], cache=cache) for i in range(9, 12)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_padding_mask_leaves_real_tokens_unchanged():
    torch.manual_seed(0)
    model = GPTModel(tiny("llama")).eval()
    ids = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    assert torch.allclose(model(padded, attention_mask=mask)[:, 3:], model(ids), atol=1e-5)


def test_too_long_input_is_a_clear_error():
    model = GPTModel(tiny())
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = GPTModel(tiny("llama"))
    ids = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_fused_gelu_equals_the_books_formula():
    x = torch.linspace(-10, 10, 20001)
    assert torch.allclose(GELU()(x), GELU.formula(x), atol=1e-6)
    xb = x.bfloat16()
    assert torch.allclose(GELU()(xb).float(), GELU.formula(xb.float()), atol=2e-2, rtol=1e-2)


def test_fused_rmsnorm_equals_the_formula():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64) * 7
    assert torch.allclose(norm(x), norm.formula(x), atol=1e-5)
    xb = x.bfloat16()
    assert torch.equal(norm.bfloat16()(xb), norm.formula(xb))  # both normalise in fp32, round once
