"""A chat checkpoint that keeps GGUF blocks (tests/conftest.py) is served from them, with the dense model's answers."""

from __future__ import annotations

from core.gguf_matvec import GGUFHead, GGUFLinear

from app_testing import running_client


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


def test_a_damaged_blocks_file_costs_speed_not_the_chat_model(make_settings, gguf_chat_checkpoint, tmp_path):
    import shutil

    from core.gguf_matvec import BLOCKS_FILE

    damaged = shutil.copytree(gguf_chat_checkpoint, tmp_path / "damaged")
    (damaged / BLOCKS_FILE).write_bytes(b"not safetensors")
    with running_client(make_settings(chat_checkpoint=damaged, classifier_enabled=False)) as client:
        assert client.get("/ready").json()["models"]["chat"]["state"] == "ready"
        assert not isinstance(client.app.state.models.slots["chat"].checkpoint.model.fast_head, GGUFHead)
        assert _answer(client)

