"""The chat engine's limits through the HTTP API: an owner past its queue limit gets 429 and a full
queue 503, both with Retry-After and a message naming the setting; neither stores anything; another
owner is not held up by the first one's limit."""

from __future__ import annotations

import pytest

from app_testing import TokenGate, running_client

ALICE, BOB, CAROL = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh", "carol-key-0123456789abcdef"
KEYS = {"alice": ALICE, "bob": BOB, "carol": CAROL}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def limited(make_settings):
    # One place, alice's and bob's second answers wait; room for two waiting answers in all.
    settings = make_settings(api_keys=KEYS, classifier_enabled=False, chat_max_batch=1, chat_max_waiting=2,
                             chat_max_waiting_per_owner=1, default_max_new_tokens=4)
    with running_client(settings) as client:
        yield client


def new_chat(client, key: str) -> str:
    response = client.post("/api/v1/conversations", json={}, headers=auth(key))
    assert response.status_code == 201
    return response.json()["id"]


def test_owner_and_queue_limits_answer_429_and_503_with_retry_after(limited):
    worker = limited.app.state.models.slots["chat"].worker
    chats = {key: [new_chat(limited, key) for _ in range(3)] for key in (ALICE, BOB, CAROL)}

    def send(key: str, index: int):
        return limited.stream("POST", f"/api/v1/conversations/{chats[key][index]}/messages",
                              json={"content": "hello"}, headers=auth(key))

    with TokenGate(worker, hold_at=1) as gate:
        with send(ALICE, 0) as running:  # takes the one place; the engine is held at its first token
            assert running.status_code == 200
            gate.wait_held()
            with send(ALICE, 1) as waiting:  # alice's one waiting answer
                assert waiting.status_code == 200
                with send(ALICE, 2) as refused:
                    assert refused.status_code == 429
                    assert int(refused.headers["Retry-After"]) >= 1
                    refused.read()
                    assert "SCRATCHGPT_CHAT_MAX_WAITING_PER_OWNER" in refused.json()["detail"]
                with send(BOB, 0) as other:  # bob is not held up by alice's limit: the queue's second place
                    assert other.status_code == 200
                    with send(CAROL, 0) as full:  # two waiting in all: the queue is full for everyone
                        assert full.status_code == 503
                        assert int(full.headers["Retry-After"]) >= 1
                        full.read()
                        assert "SCRATCHGPT_CHAT_MAX_WAITING" in full.json()["detail"]
                    v1 = limited.post("/v1/chat/completions", headers=auth(CAROL), json={
                        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                    assert v1.status_code == 503 and int(v1.headers["Retry-After"]) >= 1  # OpenAI's API too
                    assert "queue is full" in v1.json()["error"]["message"]
                    gate.release()
                    for stream in (running, waiting, other):
                        events = [line for line in stream.iter_lines() if line.startswith("event: ")]
                        assert events[-1] == "event: done"
    # The refused turns stored nothing: their conversations are still empty.
    for key, index in ((ALICE, 2), (CAROL, 0)):
        messages = limited.get(f"/api/v1/conversations/{chats[key][index]}/messages", headers=auth(key)).json()
        assert messages == []
