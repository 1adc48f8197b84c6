"""A chat checkpoint that keeps GGUF blocks is served from them, with the answers of the dense model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.fast import FastPathError
from core.gguf_matvec import GGUFHead, GGUFLinear, kernels

from app_testing import running_client

gguf_quants = pytest.importorskip("gguf.quants")
try:
    kernels()
except FastPathError as err:
    pytest.skip(f"GGUF kernels unavailable: {err}", allow_module_level=True)


@pytest.fixture(scope="module")
def gguf_chat_checkpoint(tmp_path_factory, gpt2_tok):
    """A tiny chat model whose weights are Q8_0-representable, saved with their blocks (as a GGUF conversion is)."""
    from gguf import GGMLQuantizationType

    from core.chat_template import ALPACA
    from core.checkpoint import save_checkpoint
    from core.config import ModelConfig
    from core.model import GPTModel

    torch.manual_seed(3)
    model = GPTModel(ModelConfig(vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2, context_length=256)).eval()
    blocks = {}
    with torch.no_grad():
        model.head_weight.mul_(20.0)  # peaked logits: greedy answers without near-ties
        linears = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, weight in {**linears, "tok_emb.weight": model.head_weight}.items():
            raw = gguf_quants.quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
            weight.copy_(torch.from_numpy(gguf_quants.dequantize(raw, GGMLQuantizationType.Q8_0)))
            blocks[name] = ("Q8_0", torch.from_numpy(np.array(raw)))
    path = tmp_path_factory.mktemp("ckpt") / "gguf-chat"
    return save_checkpoint(path, model, gpt2_tok, chat_template=ALPACA, metadata={"name": "gguf-chat"},
                           gguf_blocks=blocks)


def _answer(client) -> str:
    reply = client.post("/v1/chat/completions", json={
        "model": "gguf-chat", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "Name three colours."}],
    })
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_chat_decodes_from_blocks_with_the_dense_answers(make_settings, gguf_chat_checkpoint):
    answers = {}
    for enabled in (True, False):
        settings = make_settings(chat_checkpoint=gguf_chat_checkpoint, classifier_enabled=False, gguf_kernels=enabled)
        with running_client(settings) as client:
            model = client.app.state.models.slots["chat"].checkpoint.model
            assert isinstance(model.blocks[0].attn.qkv, GGUFLinear) is enabled
            assert isinstance(model.fast_head, GGUFHead) is enabled
            answers[enabled] = _answer(client)
    assert answers[True] and answers[True] == answers[False]
