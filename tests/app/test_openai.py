"""The OpenAI-compatible API, driven by the official openai client against a live uvicorn server."""

from __future__ import annotations

import pytest

from app_testing import chat_server

KEY = "sk-test-0123456789abcdefghij"


@pytest.fixture(scope="module")
def live(tmp_path_factory, chat_checkpoint):
    with chat_server(tmp_path_factory.mktemp("openai-home"), chat_checkpoint) as server:
        yield server


@pytest.fixture(scope="module")
def openai_client(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_chat_model(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]


def test_non_streaming_completion(openai_client):
    completion = openai_client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi"}],
        temperature=0,
        max_tokens=12,
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming(openai_client):
    request = dict(model="tiny-chat", messages=[{"role": "user", "content": "Count"}], temperature=0, max_tokens=10)
    whole = openai_client.chat.completions.create(**request).choices[0].message.content
    pieces, finish = [], None
    for chunk in openai_client.chat.completions.create(**request, stream=True,
                                                       stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            assert chunk.usage.completion_tokens == 10
    assert "".join(pieces) == whole
    assert finish == "length"


def test_a_conversations_next_request_reports_its_cached_prompt_tokens(openai_client):
    """Clients send the whole conversation each time; the server prefills only what it has not run
    (core.fast.prefix_cache) and says how much it took from its cache, as OpenAI's usage does."""
    messages = [{"role": "user", "content": "Tell me about the sea, the ships and the lighthouse keepers."}]
    first = openai_client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=16)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = openai_client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=16)
    # The first request may share the template's preamble with earlier ones; the second shares its whole prompt.
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 1
    assert first.usage.prompt_tokens - 1 <= second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_sampling_parameters_and_seed(openai_client):
    request = dict(model="tiny-chat", messages=[{"role": "user", "content": "Go"}], max_tokens=8,
                   temperature=1.3, top_p=0.9, seed=7)
    a = openai_client.chat.completions.create(**request).choices[0].message.content
    b = openai_client.chat.completions.create(**request).choices[0].message.content
    assert a == b  # same seed, same text


def test_stop_strings_end_the_answer(openai_client):
    request = dict(model="tiny-chat", messages=[{"role": "user", "content": "Go"}], temperature=0, max_tokens=30)
    full = openai_client.chat.completions.create(**request).choices[0].message.content
    # Stop on a piece of the greedy answer: the answer ends right before it.
    stop = full[10:14]
    assert stop.strip(), full
    cut = openai_client.chat.completions.create(**request, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_errors_use_openai_shapes(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "tiny-chat" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=10**6)
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model="tiny-chat",
                                              messages=[{"role": "user", "content": "word " * 2000}])
    assert "context" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                              temperature=5)


def test_api_keys_are_enforced_when_configured(tmp_path, chat_checkpoint):
    import openai

    with chat_server(tmp_path, chat_checkpoint, api_keys={"ci": KEY}) as server:
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-0123456789", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        reply = good.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3


def test_penalties_reach_generation(openai_client, live, chat_checkpoint):
    """frequency_penalty, presence_penalty and the repetition_penalty extension decode what the plain
    loop decodes with the same penalties, and differ from the unpenalized answer."""
    from app.services.prompts import generation_config, plan_prompt
    from core.generation.generate import generate
    from core.weights.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(chat_checkpoint)
    messages = [{"role": "user", "content": "Count"}]
    plan = plan_prompt(checkpoint, "", messages, 16, allow_drop=False)

    def expected(**penalties) -> str:
        config = generation_config(checkpoint, temperature=0, top_k=None, top_p=None, max_new_tokens=16, **penalties)
        return checkpoint.tokenizer.decode(generate(checkpoint.model, [plan.prompt_ids], config)[0])

    def answer(**extra) -> str:
        return openai_client.chat.completions.create(
            model="tiny-chat", messages=messages, temperature=0, max_tokens=16, **extra).choices[0].message.content

    plain = answer()
    for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        api = {k: v for k, v in penalties.items() if k != "repetition_penalty"}
        extra_body = {"repetition_penalty": penalties["repetition_penalty"]} if "repetition_penalty" in penalties else None
        got = answer(**api, extra_body=extra_body)
        assert got == expected(**penalties).strip() or got == expected(**penalties)
        assert got != plain, penalties
    with pytest.raises(Exception, match="frequency_penalty"):
        answer(frequency_penalty=3.0)


def test_a_non_streaming_client_that_gives_up_stops_its_generation(live):
    """The client's connection closes while its 900-token answer is being written (the tiny model
    needs seconds for it): the server stops generating, so the counter of generated tokens stays
    far below 900 once the next request has been answered."""
    import httpx

    def generated() -> float:
        text = httpx.get(f"{live.url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("scratchgpt_tokens_generated_total{"))

    request = {"model": "tiny-chat", "messages": [{"role": "user", "content": "a long story"}],
               "temperature": 0, "max_tokens": 900}
    before = generated()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/chat/completions", json=request, timeout=httpx.Timeout(30, read=0.2))
    # The worker takes one request at a time, so this one is answered after the first has ended.
    short = httpx.post(f"{live.url}/v1/chat/completions", json={**request, "max_tokens": 2}, timeout=60)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 2
    assert generated() - before < 900 - 100  # the abandoned answer stopped well short of its 900 tokens
