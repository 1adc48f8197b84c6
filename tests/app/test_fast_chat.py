"""The chat model decodes through our CPU kernels (core.fast.transforms.fast_for_serving) with torch's answers:
from the GGUF blocks a converted checkpoint keeps (tests/conftest.py), or from panels for a dense one."""

from __future__ import annotations

import threading

import pytest
from waiting import HANG_GUARD, wait_until

import app.services.registry
from app.settings import Settings
from core.fast.gguf_matvec import GGUFHead, GGUFLinear
from core.fast.packed import PackedLinear
from core.fast.screened_head import ScreenedHead
from core.fast.panels import kernels as panel_kernels
from kernel_marks import needs_kernels

from app_testing import running_client


def _answer(client, model: str = "gguf-chat") -> str:
    reply = client.post("/v1/chat/completions", json={
        "model": model, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "Name three colours."}],
    })
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def _answers_with_and_without(make_settings, checkpoint, model_name: str, fast_path_in_place) -> None:
    """The same greedy answer with the fast path as without; ``fast_path_in_place(decoder)`` says which was served."""
    answers = {}
    for enabled in (True, False):
        settings = make_settings(chat_checkpoint=checkpoint, classifier_enabled=False, fast_kernels=enabled)
        with running_client(settings) as client:
            assert fast_path_in_place(client.app.state.models.slots["chat"].decoder) is enabled
            answers[enabled] = _answer(client, model_name)
    assert answers[True] and answers[True] == answers[False]


def test_chat_decodes_from_blocks_with_the_dense_answers(make_settings, gguf_chat_checkpoint):
    def from_blocks(decoder) -> bool:
        return isinstance(decoder.model.blocks[0].attn.qkv, GGUFLinear) and isinstance(decoder.head, GGUFHead)

    _answers_with_and_without(make_settings, gguf_chat_checkpoint, "gguf-chat", from_blocks)


def test_a_damaged_blocks_file_costs_speed_not_the_chat_model(make_settings, gguf_chat_checkpoint, tmp_path):
    import shutil

    from core.weights.gguf import BLOCKS_FILE

    damaged = shutil.copytree(gguf_chat_checkpoint, tmp_path / "damaged")
    (damaged / BLOCKS_FILE).write_bytes(b"not safetensors")
    with running_client(make_settings(chat_checkpoint=damaged, classifier_enabled=False)) as client:
        assert client.get("/ready").json()["models"]["chat"]["state"] == "ready"
        assert not isinstance(client.app.state.models.slots["chat"].decoder.head, GGUFHead)
        assert _answer(client)


@needs_kernels(panel_kernels, "panel kernel")
def test_a_dense_chat_model_decodes_from_panels_with_the_same_answers(make_settings, chat_checkpoint):
    def from_panels(decoder) -> bool:
        qkv = decoder.model.blocks[0].attn.qkv
        return isinstance(qkv, PackedLinear) and qkv._panels is not None and isinstance(decoder.argmax_head, ScreenedHead)

    _answers_with_and_without(make_settings, chat_checkpoint, "tiny-chat", from_panels)


def test_the_chat_answers_through_torch_until_its_fast_path_is_built(make_settings, chat_checkpoint, monkeypatch):
    """Our kernels compile on first use, minutes on a fresh machine (issue 20): the service is ready and
    the chat answers through torch's kernels meanwhile, then the fast path takes over. The build here
    waits for the test's word, standing in for a long compile; what it builds is the real thing."""
    go, real = threading.Event(), app.services.registry.fast_for_serving

    def long_build(*args, **kwargs):
        assert go.wait(HANG_GUARD), "the test never let the build go on"
        return real(*args, **kwargs)

    monkeypatch.setattr(app.services.registry, "fast_for_serving", long_build)
    settings = make_settings(chat_checkpoint=chat_checkpoint, classifier_enabled=False, fast_kernels=True)
    with running_client(settings, wait=False) as client:
        models = client.app.state.models
        wait_until(lambda: client.get("/ready").status_code == 200, "readiness")
        torch_slot = models.slots["chat"]
        assert client.get("/ready").json()["models"]["chat"]["kernels"] == "building"
        report = torch_slot.decoder.report
        assert not report.applied and not report.skipped  # the plain loop: nothing applied, nothing tried
        answer = _answer(client, "tiny-chat")

        go.set()
        assert models.wait_loaded(HANG_GUARD)
        fast_slot = models.slots["chat"]
        assert fast_slot is not torch_slot and fast_slot.checkpoint is not torch_slot.checkpoint
        # fast_for_serving's report: the panels applied, or why this machine cannot have them.
        assert "panels" in str(fast_slot.decoder.report)
        chat = client.get("/ready").json()["models"]["chat"]
        assert chat["kernels"] == "done" and chat["fast_path"] == str(fast_slot.decoder.report)
        assert _answer(client, "tiny-chat") == answer
        wait_until(lambda: torch_slot.worker._closed, "the torch decoder's worker stopped")


@pytest.mark.parametrize("name", ["SCRATCHGPT_FAST_KERNELS", "SCRATCHGPT_GGUF_KERNELS"])
def test_the_setting_is_read_under_its_old_name_too(monkeypatch, name):
    monkeypatch.setenv(name, "false")
    assert Settings().fast_kernels is False
    assert Settings(fast_kernels=True).fast_kernels is True
