"""core.fast.serving: a serving decoder without an output layer for argmax-only callers gives them the full logits."""

import pytest
import torch

from core.fast.packed import PackedHead
from core.fast.serving import ServingDecoder
from fused_models import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_argmax_only_without_an_argmax_head_is_the_full_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    decoder = ServingDecoder(model)  # nothing installed: the model's own forward pass
    with torch.inference_mode():
        full = model(ids)
        assert torch.equal(decoder(ids, argmax_only=True), full)
        # A full-logits head alone (here the plain product, no packed copy) serves argmax-only callers too.
        decoder.head = PackedHead(onednn=False)
        assert torch.equal(decoder(ids, argmax_only=True), full)
        assert torch.equal(decoder(ids, argmax_only=True, last_only=True), model(ids, last_only=True))
