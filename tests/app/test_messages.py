"""Streaming answers over SSE with a tiny real chat model: storage, stop, a client that leaves and comes back,
regenerate with alternatives, edit-and-resend, continue, public ids, the settings limits, context."""

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
    cid = new_conversation(client, max_new_tokens=900)
    worker = client.app.state.models.slots["chat"].worker
    # Held at 300 tokens (about a second of the tiny model, many flushes of 0.05 s) so that it is
    # still streaming, and not finished, whenever the checks below run.
    with TokenGate(worker, hold_at=300) as gate, \
            client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "tell me a story"}) as response:
        events = parse_sse(response.iter_lines())
        assert next(events)[0] == "start"
        mid = client.get(f"/api/v1/conversations/{cid}").json()
        assert mid["generating"] is True
        assert [m["role"] for m in mid["messages"]] == ["user", "assistant"]
        assert mid["messages"][0]["content"] == "tell me a story"
        assert mid["messages"][1]["status"] == "streaming"
        # Concurrent second send in the same conversation is refused.
        busy = client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "and another"})
        assert busy.status_code == 409
        # Periodic flushes make the partial answer visible in the database.
        stored = wait_until(lambda: client.get(f"/api/v1/conversations/{cid}/messages").json()[1]["content"],
                            "the streaming answer written to the database")
        gate.wait_held()
        client.post(f"/api/v1/conversations/{cid}/stop")
        gate.release()
        rest = list(events)
    received = "".join(data["text"] for event, data in rest if event == "delta")
    assert received.startswith(stored)
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


def conversation_of(client, cid) -> dict:
    return client.get(f"/api/v1/conversations/{cid}").json()


def test_a_client_that_leaves_does_not_stop_the_answer_and_can_follow_it_again(client):
    """Issue 21: opening another conversation mid-answer must not lose it. The answer goes on
    server-side; GET .../answer follows it again from the text so far; it is stored complete."""
    cid = new_conversation(client, max_new_tokens=40)
    worker = client.app.state.models.slots["chat"].worker
    with TokenGate(worker, hold_at=5) as gate:
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "long answer"}) as response:
            for event, _ in parse_sse(response.iter_lines()):
                if event == "start":
                    break
        gate.wait_held()  # the first client has gone; the answer is at its fifth token
        assert conversation_of(client, cid)["generating"] is True
        with client.stream("GET", f"/api/v1/conversations/{cid}/answer") as response:
            assert response.status_code == 200
            events = parse_sse(response.iter_lines())
            start = next(events)
            assert start[0] == "start"
            so_far = next(events)
            assert so_far[0] == "delta" and so_far[1]["text"]  # the text written while nobody followed
            gate.release()
            rest = list(events)
    assert rest[-1][0] == "done"
    done = rest[-1][1]
    assert done["finish_reason"] == "length" and done["completion_tokens"] == 40
    followed = so_far[1]["text"] + "".join(d["text"] for e, d in rest if e == "delta")
    assert followed == done["message"]["content"]
    answer = conversation_of(client, cid)["messages"][-1]
    assert answer["status"] == "complete" and answer["content"] == followed and answer["id"] == start[1]["assistant_message_id"]
    assert conversation_of(client, cid)["generating"] is False
    assert client.get(f"/api/v1/conversations/{cid}/answer").status_code == 204  # nothing to follow now


def test_a_client_that_leaves_without_a_word_leaves_a_complete_answer(client):
    cid = new_conversation(client, max_new_tokens=30)
    with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "long answer"}) as response:
        for event, _ in parse_sse(response.iter_lines()):
            if event == "delta":
                break
    answer = wait_until(
        lambda: (a := conversation_of(client, cid)["messages"][-1])["status"] != "streaming" and a,
        "the answer finishing after the client left")
    assert answer["status"] == "complete" and answer["finish_reason"] == "length"
    assert answer["completion_tokens"] == 30
    follow_up = list(parse_sse(client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}).iter_lines()))
    assert follow_up[-1][0] == "done"


def test_regenerate_keeps_earlier_answers_as_alternatives_and_the_selected_one_is_the_next_prompt(client):
    cid = new_conversation(client, temperature=1.0)
    first = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "pick a word", "seed": 1})
    again = stream(client, f"/api/v1/conversations/{cid}/regenerate", {"seed": 2})
    assert again[0][0] == "start" and "user_message" not in again[0][1]
    first_id, second_id = first[-1][1]["message"]["id"], again[-1][1]["message"]["id"]
    messages = conversation_of(client, cid)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] == second_id != first_id
    assert messages[1]["content"] == again[-1][1]["message"]["content"]
    assert messages[1]["alternatives"] == [first_id, second_id]
    assert messages[0]["alternatives"] == []
    # Same seed, same settings: the same answer; now three to flip through.
    third = stream(client, f"/api/v1/conversations/{cid}/regenerate", {"seed": 2})
    assert third[-1][1]["message"]["content"] == again[-1][1]["message"]["content"]
    third_id = third[-1][1]["message"]["id"]

    # Flip back to the first: it is what the conversation shows and what the next prompt reads.
    thread = client.post(f"/api/v1/conversations/{cid}/messages/{first_id}/select").json()
    assert [m["id"] for m in thread] == [messages[0]["id"], first_id]
    assert thread[1]["content"] == first[-1][1]["message"]["content"]
    assert thread[1]["alternatives"] == [first_id, second_id, third_id]
    assert conversation_of(client, cid)["messages"][1]["id"] == first_id
    from app.services.chat import plan_turn
    from app.db import crud
    with client.app.state.sessions() as session:
        turn = plan_turn(crud.list_messages(session, cid), "send", "next", None)
    assert turn.history[1] == {"role": "assistant", "content": first[-1][1]["message"]["content"]}
    nxt = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "another", "seed": 3})
    assert nxt[-1][0] == "done"
    assert [m["id"] for m in conversation_of(client, cid)["messages"]][:2] == [messages[0]["id"], first_id]

    assert client.post(f"/api/v1/conversations/{cid}/messages/{messages[0]['id']}/select").status_code == 409
    missing = client.post(f"/api/v1/conversations/{cid}/messages/{'0' * 32}/select")
    assert missing.status_code == 404 and "no message" in missing.json()["detail"]


def test_edit_and_resend_replaces_what_followed_in_one_step(client):
    cid = new_conversation(client)
    turns = [stream(client, f"/api/v1/conversations/{cid}/messages", {"content": text}) for text in ("one", "two", "three")]
    before = conversation_of(client, cid)["messages"]
    assert len(before) == 6
    edited = before[2]  # "two"
    events = stream(client, f"/api/v1/conversations/{cid}/messages/{edited['id']}/edit", {"content": "two, edited"})
    assert events[0][1]["user_message"]["content"] == "two, edited"
    assert events[-1][0] == "done"
    after = conversation_of(client, cid)["messages"]
    assert [m["content"] for m in after[:3]] == ["one", before[1]["content"], "two, edited"]
    assert len(after) == 4 and after[3]["id"] == events[-1][1]["message"]["id"]
    assert {m["id"] for m in after} & {m["id"] for m in before[2:]} == set()  # the old turns are gone
    # The prompt was the conversation up to the edit: the same length as "two"'s, give or take the words.
    assert abs(events[0][1]["prompt_tokens"] - turns[1][0][1]["prompt_tokens"]) <= 3
    # Only one's own messages can be edited; an unknown id is a 404; a refused edit changes nothing.
    answer = client.post(f"/api/v1/conversations/{cid}/messages/{after[1]['id']}/edit", json={"content": "x"})
    assert answer.status_code == 409 and "only your own messages" in answer.json()["detail"]
    assert client.post(f"/api/v1/conversations/{cid}/messages/nope/edit", json={"content": "x"}).status_code == 404
    assert conversation_of(client, cid)["messages"] == after


def test_continue_writes_on_a_cut_off_answer(client):
    cid = new_conversation(client, max_new_tokens=8)
    assert client.post(f"/api/v1/conversations/{cid}/continue").status_code == 409  # nothing yet
    first = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "tell me a long story"})
    cut = first[-1][1]["message"]
    assert cut["finish_reason"] == "length"
    more = stream(client, f"/api/v1/conversations/{cid}/continue")
    start, done = more[0][1], more[-1][1]
    assert start["assistant_message_id"] == cut["id"] and "user_message" not in start
    assert start["prompt_tokens"] > first[0][1]["prompt_tokens"]  # the answer so far is in the prompt
    added = "".join(d["text"] for e, d in more if e == "delta")
    assert added and done["message"]["content"] == cut["content"] + added
    assert done["completion_tokens"] == 16 and done["message"]["id"] == cut["id"]
    messages = conversation_of(client, cid)["messages"]
    assert len(messages) == 2 and messages[1]["content"] == cut["content"] + added
    # The prompt is the conversation and the answer so far, its turn left open (greedy: as if never cut).
    from app.services.prompts import encode_prompt
    ckpt = client.app.state.models.slots["chat"].checkpoint
    prompt = encode_prompt(ckpt, [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": "tell me a long story"}], cut["content"])
    assert start["prompt_tokens"] == len(prompt)
    # A complete answer (not cut) cannot be continued.
    client.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 8})
    stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "hi"})
    with client.app.state.sessions() as session:
        from app.db import crud
        last = crud.list_messages(session, cid)[-1]
        crud.write_message(client.app.state.sessions, last.id, finish_reason="stop")
    refused = client.post(f"/api/v1/conversations/{cid}/continue")
    assert refused.status_code == 409 and "nothing to continue" in refused.json()["detail"]


def test_message_ids_are_random_not_sequential(client):
    cid = new_conversation(client, max_new_tokens=4)
    events = stream(client, f"/api/v1/conversations/{cid}/messages", {"content": "hi"})
    start = events[0][1]
    ids = [start["user_message"]["id"], start["assistant_message_id"]]
    for message_id in ids:
        assert isinstance(message_id, str) and len(message_id) == 32 and int(message_id, 16) > 2**64
    listed = [m["id"] for m in client.get(f"/api/v1/conversations/{cid}/messages").json()]
    assert listed == ids


def test_settings_state_the_servers_limits_and_new_chat_defaults(make_settings):
    with running_client(make_settings(max_new_tokens_cap=512, default_system_prompt="Be brief.",
                                      classifier_enabled=False)) as client:
        body = client.get("/api/v1/settings").json()
        assert body["limits"]["max_new_tokens"] == {"minimum": 1, "maximum": 512, "exclusive_minimum": False}
        assert body["limits"]["temperature"] == {"minimum": 0, "maximum": 2, "exclusive_minimum": False}
        assert body["limits"]["top_p"] == {"minimum": 0, "maximum": 1, "exclusive_minimum": True}
        assert body["limits"]["top_k"]["maximum"] == 1000
        assert body["defaults"]["system_prompt"] == "Be brief."
        created = client.post("/api/v1/conversations", json={}).json()
        assert created["system_prompt"] == body["defaults"]["system_prompt"]
        assert created["max_new_tokens"] == body["defaults"]["max_new_tokens"]
        over = client.post("/api/v1/conversations", json={"max_new_tokens": 513})
        assert over.status_code == 422 and "limit 512" in over.json()["detail"]
        hot = client.patch(f"/api/v1/conversations/{created['id']}", json={"temperature": 2.5})
        assert hot.status_code == 422 and "2" in str(hot.json()["detail"])


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
