"""Position encodings: the sinusoidal table against the paper's definition, and the config that picks one."""

from __future__ import annotations

import math

import pytest
import torch

from core.model import GPTModel
from core.model.config import ConfigError, ModelConfig
from core.model.layers import SinusoidalPositions, sinusoidal_table
from core.tokenizer.gpt2 import gpt2_tokenizer
from core.weights.checkpoint import load_checkpoint, save_checkpoint


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, context_length=40, emb_dim=16, n_layers=2, n_heads=2), **kw})


@pytest.mark.parametrize("dim", [16, 7])
def test_sinusoidal_table_is_the_papers_definition(dim):
    """Vaswani et al. (2017), 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(the same)."""
    table = sinusoidal_table(300, dim)
    assert table.shape == (300, dim) and table.dtype == torch.float32
    for pos in range(300):
        for j in range(dim):
            i = j // 2
            angle = pos / 10000 ** (2 * i / dim)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-6), (pos, j)


def test_an_offset_is_the_same_rotation_at_every_position():
    """The paper's reason for sinusoids: PE(pos + k) is a fixed linear map of PE(pos), for any pos."""
    dim, k = 8, 5
    table = sinusoidal_table(64, dim).double()
    rotation = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim // 2):
        phi = k / 10000 ** (2 * i / dim)
        # (sin(a + phi), cos(a + phi)) from (sin a, cos a)
        rotation[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor(
            [[math.cos(phi), math.sin(phi)], [-math.sin(phi), math.cos(phi)]], dtype=torch.float64
        )
    torch.testing.assert_close(table[:-k] @ rotation.T, table[k:], atol=1e-6, rtol=0)


def test_the_family_picks_its_own_encoding_unless_told():
    assert tiny().pos_encoding == "learned"
    assert tiny(family="llama").pos_encoding == "rotary"
    assert tiny(pos_encoding="sinusoidal").pos_encoding == "sinusoidal"
    # A config written before the key existed loads as it always did.
    old = {k: v for k, v in tiny().to_dict().items() if k != "pos_encoding"}
    assert ModelConfig.from_dict(old).pos_encoding == "learned"
    with pytest.raises(ConfigError, match="'rotary' is not available for the gpt2 family; choose learned or sinusoidal"):
        tiny(pos_encoding="rotary")
    with pytest.raises(ConfigError, match="'sinusoidal' is not available for the llama family"):
        tiny(family="llama", pos_encoding="sinusoidal")
    with pytest.raises(ConfigError, match="'absolute' is not available"):
        tiny(pos_encoding="absolute")


def test_sinusoidal_model_trains_no_position_table():
    learned, fixed = GPTModel(tiny()), GPTModel(tiny(pos_encoding="sinusoidal"))
    assert isinstance(fixed.pos_emb, SinusoidalPositions)
    assert learned.num_parameters() - fixed.num_parameters() == 40 * 16
    assert not any(name.startswith("pos_emb") for name, _ in fixed.named_parameters())
    # Stored under the learned table's name, so checkpoints and their shape checks treat both alike.
    assert torch.equal(fixed.state_dict()["pos_emb.weight"], sinusoidal_table(40, 16))


def test_positions_reach_the_output():
    torch.manual_seed(0)
    model = GPTModel(tiny(pos_encoding="sinusoidal", n_layers=1)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    x = model.embed(ids, model.context(ids))
    torch.testing.assert_close(x[0, 1], model.tok_emb.weight[6] + sinusoidal_table(40, 16)[1])
    # One layer of attention is blind to the order of the earlier tokens (a weighted sum
    # over a set): swapping two of them changes the last token's logits only through
    # the positions. (Deeper causal stacks can infer order from the mask alone.)
    swapped = torch.tensor([[6, 5, 7, 8]])
    assert not torch.allclose(model(ids)[0, -1], model(swapped)[0, -1])
    model.pos_emb = None
    torch.testing.assert_close(model(ids)[0, -1], model(swapped)[0, -1])


def test_sinusoidal_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = GPTModel(tiny(vocab_size=50257, pos_encoding="sinusoidal")).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, gpt2_tokenizer())
    loaded = load_checkpoint(path)
    assert loaded.config.pos_encoding == "sinusoidal"
    ids = torch.tensor([[464, 3797, 3332]])
    torch.testing.assert_close(loaded.model(ids), model(ids))
