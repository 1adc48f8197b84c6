"""Streaming answers over SSE with a tiny real chat model: storage, stop, disconnect, regenerate, context."""

from __future__ import annotations

from app_testing import TokenGate, parse_sse, running_client
from waiting import wait_until


def new_conversation(client, **fields) -> str:
    return client.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 24, **fields}).json()["id"]


def stream(client, path, body=None):
    with client.stream("POST", path, json=body or {}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def test_send_streams_deltas_then_done_and_stores_both_messages(client):
    cid = new_conversation(client)
    events = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "Name three colors."})
    names = [e for e, _ in events]
    assert names[0] == "start" and names[-1] == "done"
    assert "delta" in names
    start, done = events[0][1], events[-1][1]
    assert start["user_message"]["content"] == "Name three colors."
    assert start["prompt_tokens"] > 0 and start["dropped_messages"] == 0
    text = "".join(d["text"] for e, d in events if e == "delta")
    assert done["message"]["content"] == text
    assert done["completion_tokens"] == 24 and done["finish_reason"] == "length"
    assert done["tokens_per_second"] > 0 and done["duration_ms"] > 0

    conversation = client.get(f"/api/v1/conversations/{cid}").json()
    assert conversation["title"] == "Name three colors."  # first message names the chat
    user, answer = conversation["messages"]
    assert (user["role"], user["status"]) == ("user", "complete")
    assert (answer["role"], answer["status"], answer["content"]) == ("assistant", "complete", text)
    assert answer["completion_tokens"] == 24 and answer["tokens_per_second"] > 0
    assert answer["prompt_tokens"] == start["prompt_tokens"]


def test_greedy_answers_are_repeatable_and_match_core_generation(client, chat_checkpoint):
    from core.weights.checkpoint import load_checkpoint
    from core.generation.generate import generate_text

    from app.services.prompts import generation_config, plan_prompt

    cid = new_conversation(client, system_prompt="")
    events = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "hello"})
    served = events[-1][1]["message"]["content"]
    ckpt = load_checkpoint(chat_checkpoint)
    plan = plan_prompt(ckpt, "", [{"role": "user", "content": "hello"}], 24)
    config = generation_config(ckpt, temperature=0.0, top_k=50, top_p=0.95, max_new_tokens=24)
    assert served == generate_text(ckpt.model, ckpt.tokenizer, plan.prompt_ids, config)


def test_user_message_is_stored_before_generation_and_answer_while_streaming(client):
    cid = new_conversation(client, max_new_tokens=600)
    with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "tell me a story"}) as response:
        lines = response.iter_lines()
        events = parse_sse(lines)
        assert next(events)[0] == "start"
        mid = client.get(f"/api/v1/conversations/{cid}").json()
        assert mid["generating"] is True
        assert [m["role"] for m in mid["messages"]] == ["user", "assistant"]
        assert mid["messages"][0]["content"] == "tell me a story"
        assert mid["messages"][1]["status"] == "streaming"
        # Concurrent second send in the same conversation is refused.
        busy = client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "and another"})
        assert busy.status_code == 409
        received = ""
        for event, data in events:  # the answer is 600 tokens: it streams past this check
            if event == "delta":
                received += data["text"]
            # Periodic flushes make the partial answer visible in the database.
            stored = client.get(f"/api/v1/conversations/{cid}/messages").json()[1]["content"]
            if len(stored) > 0 and received.startswith(stored):
                break
        else:
            raise AssertionError("the streaming answer was never written to the database")
        client.post(f"/api/v1/conversations/{cid}/stop")
        rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["message"]["status"] == "interrupted"


def test_stop_cancels_promptly_and_keeps_the_partial_answer(client):
    """Stop takes effect at the next token: the worker, held after its third token, generates no
    fourth once the stop has been asked for."""
    cid = new_conversation(client, max_new_tokens=900)
    worker = client.app.state.models.slots["chat"].worker
    with TokenGate(worker, hold_at=3) as gate, \
            client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "go on"}) as response:
        events = parse_sse(response.iter_lines())
        assert next(events)[0] == "start"  # the test client's stream moves as it is read: the job is queued after this
        held_at = gate.wait_held()
        assert client.post(f"/api/v1/conversations/{cid}/stop").json() == {"stopped": True}
        gate.release()
        rest = list(events)
    done = rest[-1][1]
    assert rest[-1][0] == "done"
    assert done["finish_reason"] == "cancelled" and done["message"]["status"] == "interrupted"
    assert done["completion_tokens"] == held_at == gate.tokens
    answer = client.get(f"/api/v1/conversations/{cid}").json()["messages"][-1]
    assert answer["status"] == "interrupted" and answer["content"] == done["message"]["content"]
    assert client.post(f"/api/v1/conversations/{cid}/stop").json() == {"stopped": False}
    # The worker is free again: the next message streams normally.
    client.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 8})
    events = list(parse_sse(client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "again"}).iter_lines()))
    assert events[-1][0] == "done"


def test_client_disconnect_marks_the_answer_interrupted_and_frees_the_worker(client):
    cid = new_conversation(client, max_new_tokens=900)
    with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "long answer"}) as response:
        for event, _ in parse_sse(response.iter_lines()):
            if event == "delta":
                break
    # The response was closed mid-stream: the server cancels generation and settles the row.
    answer = wait_until(
        lambda: (a := client.get(f"/api/v1/conversations/{cid}").json()["messages"][-1])["status"] != "streaming" and a,
        "the answer settling after the client left")
    assert answer["status"] == "interrupted"
    assert answer["finish_reason"] == "disconnected"
    assert answer["completion_tokens"] < 900
    client.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 8})
    follow_up = list(parse_sse(client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}).iter_lines()))
    assert follow_up[-1][0] == "done"
    # The interrupted answer is part of the history the next prompt was built from.
    assert follow_up[0][1]["prompt_tokens"] > 20


def test_regenerate_replaces_the_last_answer(client):
    cid = new_conversation(client, temperature=1.0)
    first = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "pick a word", "seed": 1})
    again = stream(client, f"/api/v1/conversations/{cid}/regenerate", {"seed": 2})
    assert again[0][0] == "start" and "user_message" not in again[0][1]
    messages = client.get(f"/api/v1/conversations/{cid}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] != first[-1][1]["message"]["id"]
    assert messages[1]["content"] == again[-1][1]["message"]["content"]
    # Same seed, same settings: the same answer.
    third = stream(client, f"/api/v1/conversations/{cid}/regenerate", {"seed": 2})
    assert third[-1][1]["message"]["content"] == again[-1][1]["message"]["content"]


def test_multi_turn_drops_oldest_turns_and_says_so(make_settings, short_chat_checkpoint):
    with running_client(make_settings(chat_checkpoint=short_chat_checkpoint, classifier_enabled=False)) as client:
        cid = new_conversation(client, system_prompt="Keep it short.", max_new_tokens=16)
        dropped = []
        for i in range(5):
            events = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": f"turn {i} tell me more"})
            dropped.append(events[0][1]["dropped_messages"])
            assert events[-1][0] == "done"
        assert dropped[0] == 0 and dropped[-1] > 0
        assert dropped == sorted(dropped)
        last = client.get(f"/api/v1/conversations/{cid}").json()["messages"][-1]
        assert last["dropped_messages"] == dropped[-1]
        too_long = client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "word " * 200})
        assert too_long.status_code == 422 and "context window" in too_long.json()["detail"]
        # A refused message is not stored.
        assert len(client.get(f"/api/v1/conversations/{cid}").json()["messages"]) == 10


def test_message_validation(make_settings):
    with running_client(make_settings(max_message_chars=50, classifier_enabled=False)) as client:
        cid = new_conversation(client)
        assert client.post(f"/api/v1/conversations/{cid}/messages", json={"content": ""}).status_code == 422
        assert client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "  \n "}).status_code == 422
        long = client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "x" * 51})
        assert long.status_code == 422 and "limit is 50" in long.json()["detail"]
        assert client.post(f"/api/v1/conversations/{cid}/regenerate", json={}).status_code == 409  # nothing to answer
        assert client.get(f"/api/v1/conversations/{cid}").json()["messages"] == []


def test_a_conversations_next_turn_starts_from_the_last_turns_cache(make_settings):
    """The chat model keeps recent caches (core.fast.prefix_cache): the second turn prefills only what the
    first did not run, and answers as a server that keeps none."""
    answers = {}
    for megabytes in (0, 64):
        with running_client(make_settings(chat_prefix_cache_mb=megabytes)) as client:
            decoder = client.app.state.models.slots["chat"].decoder
            cid = new_conversation(client, system_prompt="")
            turns = [stream(client, f"/api/v1/conversations/{cid}/messages", {"content": text})
                     for text in ("Name three colors of the rainbow, please.", "And three more?")]
            answers[megabytes] = [events[-1][1]["message"]["content"] for events in turns]
            cached = [events[-1][1]["cached_prompt_tokens"] for events in turns]
            metrics = client.get("/metrics").text
            if megabytes:
                first_prompt = turns[0][0][1]["prompt_tokens"]
                # All of the first prompt but its last token: the template ends in a newline that,
                # encoded again before the answer's text, merges with the answer's first characters.
                assert cached[0] == 0 and cached[1] >= first_prompt - 1
                assert decoder.prefix_cache.reused_tokens == cached[1]
                assert f'scratchgpt_prompt_tokens_total{{model="chat",source="cached"}} {float(cached[1])}' in metrics
            else:
                assert decoder.prefix_cache is None and cached == [0, 0]
            prompts = sum(events[0][1]["prompt_tokens"] for events in turns)
            prefilled = f'scratchgpt_prompt_tokens_total{{model="chat",source="prefilled"}} {float(prompts - sum(cached))}'
            assert prefilled in metrics
    assert answers[0] == answers[64]
