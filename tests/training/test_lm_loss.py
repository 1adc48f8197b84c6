"""training.loss: the one next-token loss, plain, with positions skipped, and from a cached prefix."""

import pytest
import torch
import torch.nn.functional as F

from core.model import GPTModel, ModelConfig
from core.model.loss import IGNORE_INDEX
from training.activation_cache import prefix_activations
from training.loss import lm_loss


def tiny(family: str) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=97, context_length=16, emb_dim=16, n_layers=3, n_heads=2,
                      hidden_dim=32, qkv_bias=family == "gpt2")
    return GPTModel(cfg)


def grads(model: GPTModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_path_equals_cross_entropy_over_the_counted_targets(family):
    model = tiny(family).eval()
    inputs = torch.randint(0, 97, (3, 7))
    targets = torch.randint(0, 97, (3, 7))
    targets[0, :4] = IGNORE_INDEX  # a masked prompt
    targets[2, 5:] = IGNORE_INDEX  # padding
    reference = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    expected = grads(model, reference)
    prefix = torch.stack(prefix_activations(model, inputs.tolist(), 2))
    for kwargs in ({}, {"skip_ignored": True}, {"prefix": prefix, "start": 2, "skip_ignored": True}):
        loss = lm_loss(model, inputs, targets, **kwargs)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        got = grads(model, loss)
        # From a cached prefix, gradients reach the suffix (blocks[2:], final norm, an untied head)
        # exactly; the frozen prefix and the embedding (the tied head's other use) are not compared.
        names = expected.keys() if "prefix" not in kwargs else {
            n for n in expected if n.startswith(("blocks.2.", "final_norm.", "out_head."))}
        assert names and names <= got.keys()
        for name in names:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_a_batch_with_no_target_teaches_nothing():
    model = tiny("gpt2")
    inputs = torch.randint(0, 97, (2, 5))
    targets = torch.full((2, 5), IGNORE_INDEX)
    for kwargs in ({}, {"skip_ignored": True}):
        loss = lm_loss(model, inputs, targets, **kwargs)
        assert loss.item() == 0.0
        assert all(not g.any() for g in grads(model, loss).values())
