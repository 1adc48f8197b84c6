"""Sampling settings reach generation, through the REST chat and through ``/v1``.

A server that ignored temperature, top-k, top-p or the seed and always decoded greedily would
pass a test that only checks that one seed repeats. These tests count one-token answers over
16 seeds and compare them with what the plain model allows for that prompt: the greedy token, its
top-k tokens and its nucleus. The tiny chat model's next-token distribution is nearly flat over
GPT-2's 50,257 tokens, so at temperature 1 a draw outside the top 5 is all but certain, and at
temperature 0.05 one token holds 22 % and the nucleus of 0.3 is 21 tokens holding 30 %.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch

from app_testing import LiveServer, chat_server, parse_sse
from waiting import HANG_GUARD

PROMPT = "pick a word"
SEEDS = list(range(16))
GREEDY = {"temperature": 0.0}
HOT = {"temperature": 1.0}
COOL = {"temperature": 0.05}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def live(tmp_path_factory, chat_checkpoint):
    with chat_server(tmp_path_factory.mktemp("sampling-home"), chat_checkpoint) as server:
        yield server


@pytest.fixture(scope="module")
def allowed(chat_checkpoint) -> Callable[..., set[str]]:
    """The answers (one token, decoded) that the plain model allows for PROMPT under the given
    settings: the tokens that core.generation.sampling's filters leave finite."""
    from app.services.prompts import generation_config, plan_prompt
    from core.generation.sampling import SamplingConfig, filter_logits
    from core.weights.checkpoint import load_checkpoint

    ckpt = load_checkpoint(chat_checkpoint)
    ids = plan_prompt(ckpt, "", [{"role": "user", "content": PROMPT}], 1).prompt_ids
    with torch.no_grad():
        logits = ckpt.model(torch.tensor([ids]))[:, -1]
    stops = set(generation_config(ckpt, temperature=1.0, top_k=None, top_p=None, max_new_tokens=1).stop_token_ids)

    def texts(temperature: float, top_k: int | None = None, top_p: float | None = None) -> set[str]:
        if temperature == 0:
            kept = [int(logits.argmax())]
        else:
            finite = filter_logits(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))[0].isfinite()
            kept = finite.nonzero().flatten().tolist()
        return {"" if t in stops else ckpt.tokenizer.decode([t]) for t in kept}

    return texts


def rest_answers(live: LiveServer, settings: dict[str, Any], seeds: list[int | None]) -> list[str]:
    """One conversation with these settings; its first answer, then one regenerated answer per further seed."""
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client:
        cid = client.post("/api/v1/conversations", json={"system_prompt": "", "max_new_tokens": 1,
                                                         "temperature": settings["temperature"]}).json()["id"]
        # Created conversations take the service's default filters; null switches them off.
        patched = client.patch(f"/api/v1/conversations/{cid}",
                               json={"top_k": settings.get("top_k"), "top_p": settings.get("top_p")})
        assert patched.status_code == 200, patched.text
        answers = []
        for i, seed in enumerate(seeds):
            path, body = ("messages", {"content": PROMPT}) if i == 0 else ("regenerate", {})
            if seed is not None:
                body["seed"] = seed
            with client.stream("POST", f"/api/v1/conversations/{cid}/{path}", json=body) as response:
                event, data = list(parse_sse(response.iter_lines()))[-1]
            assert event == "done" and data["completion_tokens"] == 1, (event, data)
            answers.append(data["message"]["content"])
        return answers


def v1_answers(live: LiveServer, settings: dict[str, Any], seeds: list[int | None]) -> list[str]:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)
    extra = {"top_k": settings["top_k"]} if settings.get("top_k") else None  # top_k is our extension
    answers = []
    for seed in seeds:
        optional = {k: v for k, v in (("top_p", settings.get("top_p")), ("seed", seed)) if v is not None}
        completion = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
            temperature=settings["temperature"], extra_body=extra, **optional)
        assert completion.usage.completion_tokens == 1
        answers.append(completion.choices[0].message.content)
    return answers


@pytest.fixture(params=["rest", "v1"])
def answers(request, live) -> Callable[[dict[str, Any], list[int | None]], list[str]]:
    route = rest_answers if request.param == "rest" else v1_answers
    return lambda settings, seeds=SEEDS: route(live, settings, seeds)


def test_temperature_zero_is_greedy_and_a_high_one_spreads(answers, allowed):
    greedy = allowed(**GREEDY)
    assert set(answers(GREEDY)) == greedy  # every seed: the one greedy token
    hot = answers(HOT)
    assert len(set(hot)) >= 12  # 16 draws from a nearly flat distribution
    assert not set(hot) & greedy


def test_top_k_keeps_the_k_most_likely_tokens(answers, allowed):
    assert set(answers({**HOT, "top_k": 1})) == allowed(**GREEDY)  # top-k 1 is greedy, whatever the seed
    top5 = allowed(**HOT, top_k=5)
    assert len(top5) == 5
    drawn = answers({**HOT, "top_k": 5})
    assert set(drawn) <= top5 and len(set(drawn)) >= 3
    assert sum(a in top5 for a in answers(HOT)) <= 1  # without top-k the same seeds land elsewhere


def test_top_p_keeps_the_nucleus(answers, allowed):
    nucleus = allowed(**COOL, top_p=0.3)
    assert 2 <= len(nucleus) <= 40
    drawn = answers({**COOL, "top_p": 0.3})
    assert set(drawn) <= nucleus and len(set(drawn)) >= 2
    # Without top-p, the same temperature puts most draws (70 % of the mass) outside it.
    assert sum(a not in nucleus for a in answers(COOL)) >= 5


def test_a_seed_repeats_its_answer_and_no_seed_does_not(answers):
    seeded = answers(HOT, [3, 3, 4, 4])
    assert seeded[0] == seeded[1] and seeded[2] == seeded[3] and seeded[0] != seeded[2]
    unseeded = answers(HOT, [None] * 4)
    assert len(set(unseeded)) >= 3
