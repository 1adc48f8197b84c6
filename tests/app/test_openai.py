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
