"""The model we serve, served: SmolLM2-135M-Instruct (Llama, ChatML, Q4_1 blocks) behind the app,
with the fast kernels on, answers a two-turn conversation and ``/v1/chat/completions`` with the
greedy tokens of the plain model and of transformers' own GGUF loader on the same file.

Where our kernels build (AVX-512), the app decodes from the file's Q4_1 blocks with one fused
call per layer; elsewhere the fast path reports why not and torch's kernels decode. The second
turn also takes the first turn's KV cache from the app's prefix cache.
"""

from __future__ import annotations

import logging
import os

import httpx
import pytest
import torch

from app_testing import chat_server, parse_sse
from waiting import HANG_GUARD

pytestmark = pytest.mark.slow  # three copies of a 135M model, about 250 greedy tokens on the CPU

QUESTION = "What is the capital of France?"
FOLLOW_UP = "Write a short poem about it."
MAX_NEW = 32


class _Reports(logging.Handler):
    """Keeps the fast-path report the app logs when it loads the chat model."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.fast_path: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() in ("chat model fast path", "fast path unusable; the chat model decodes with torch's kernels"):
            self.fast_path.append(getattr(record, "report", record.getMessage()))


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_checkpoint):
    reports = _Reports()
    models_log = logging.getLogger("scratchgpt.models")
    level = models_log.level
    models_log.setLevel(logging.INFO)  # the report is logged at INFO
    models_log.addHandler(reports)
    try:
        with chat_server(tmp_path_factory.mktemp("smollm2-home"), smollm2_checkpoint, fast_kernels=True) as live:
            yield live, reports.fast_path
    finally:
        models_log.removeHandler(reports)
        models_log.setLevel(level)


@pytest.fixture(scope="module")
def plain(smollm2_checkpoint):
    from core.weights.checkpoint import load_checkpoint

    return load_checkpoint(smollm2_checkpoint)  # no fast path: torch's kernels on the dequantized weights


@pytest.fixture(scope="module")
def transformers_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


def references(plain, hf, system: str, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Greedy tokens for the prompt the app builds from ``system`` and ``turns``: ours, without the
    stop token, and transformers', cut at the same stop tokens."""
    from app.services.prompts import generation_config, plan_prompt
    from core.generation.generate import generate

    prompt = plan_prompt(plain, system, turns, MAX_NEW).prompt_ids
    config = generation_config(plain, temperature=0.0, top_k=None, top_p=None, max_new_tokens=MAX_NEW)
    assert not config.stop_strings  # ChatML ends on a token: the two sides stop alike
    ours = generate(plain.model, [prompt], config)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(config.stop_token_ids),
                          pad_token_id=config.stop_token_ids[0])
    theirs = out[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(theirs) if t in config.stop_token_ids]
    return ours, theirs[: ends[0]] if ends else theirs


def test_served_smollm2_answers_with_the_plain_models_and_transformers_greedy_tokens(served, plain, transformers_model):
    live, fast_path = served
    from core.fast.gguf_matvec import kernels
    from core.fast.kernels import FastPathError

    assert len(fast_path) == 1, fast_path  # the app took the fast path, or said why it could not
    try:
        kernels()
        assert "gguf_blocks" in fast_path[0]  # the kernels build here: the app decodes from the Q4_1 blocks
    except FastPathError as err:
        print(f"\nno GGUF kernels here ({err}); the app reported: {fast_path[0]}")

    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client:
        conversation = client.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": MAX_NEW}).json()
        cid, system = conversation["id"], conversation["system_prompt"]
        turns: list[dict[str, str]] = []
        for question in (QUESTION, FOLLOW_UP):
            turns.append({"role": "user", "content": question})
            with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": question}) as r:
                event, done = list(parse_sse(r.iter_lines()))[-1]
            assert event == "done", done
            ours, theirs = references(plain, transformers_model, system, turns)
            assert ours == theirs, (question, plain.tokenizer.decode(ours), plain.tokenizer.decode(theirs))
            answer = done["message"]["content"]
            assert answer == plain.tokenizer.decode(ours), question
            assert done["finish_reason"] == ("length" if len(ours) == MAX_NEW else "stop")
            turns.append({"role": "assistant", "content": answer})
        assert done["cached_prompt_tokens"] > 0  # the second turn reused the first one's cache

        # The same conversation through the OpenAI-compatible API: the second answer again.
        completion = client.post("/v1/chat/completions", json={
            "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": MAX_NEW,
            "messages": [{"role": "system", "content": system}, *turns[:-1]]}).json()
        assert completion["choices"][0]["message"]["content"] == turns[-1]["content"]
    assert len(ours) == MAX_NEW  # the second answer runs its whole budget: 32 tokens on which to diverge
