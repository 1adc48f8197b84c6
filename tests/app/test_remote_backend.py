"""The chat served by an external inference engine (app.services.remote_chat): here a second scratchgpt.

Two real uvicorn servers on loopback: the backend serves a tiny chat checkpoint behind an API key,
and the front, with ``SCRATCHGPT_CHAT_BACKEND_URL`` pointing at it, has no chat model of its own. The
front keeps the conversations, the limits and the storage; the tokens come from the backend's
``/v1/chat/completions`` stream. Both run in this process so that the backend's engine can be held at
a known token (app_testing.TokenGate) while the front stops an answer: the backend's own job must then
be cancelled, before it is let go, and end having generated no token more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app.services.remote_chat import RemoteBackend, RemoteChatWorker, RemoteModel
from app.services.workers import OwnerBusy, ServerBusy
from app.settings import Settings
from app_testing import LiveServer, TokenGate, chat_server, free_port, parse_sse
from core.generation.generate import GenerationConfig
from core.serving import Queued
from waiting import HANG_GUARD, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py

KEY = "front-to-backend-key-0123"  # the backend's API key for the front
LONG = 900  # tokens asked for; the tiny model would need seconds to write them all


@pytest.fixture(scope="module")
def backend(tmp_path_factory, chat_checkpoint) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("backend")
    with chat_server(home, chat_checkpoint, api_keys={"front": KEY}, stream_flush_seconds=0.05) as live:
        yield live


@contextlib.contextmanager
def front_server(home: Path, url: str, **overrides: Any) -> Iterator[LiveServer]:
    """A scratchgpt whose chat is ``url``'s: no chat checkpoint here (the path it would read does not exist)."""
    values: dict[str, Any] = dict(
        home=home, chat_checkpoint=home / "no-such-model", classifier_enabled=False, device="cpu",
        database_url=f"sqlite:///{home / 'front.db'}", log_json=False, stream_flush_seconds=0.05,
        chat_backend_url=url, chat_backend_key=KEY, chat_backend_context_length=1024)
    values.update(overrides)
    with LiveServer(Settings(**values)) as live:
        yield live


@pytest.fixture
def front(tmp_path, backend) -> Iterator[LiveServer]:
    with front_server(tmp_path, backend.url) as live:
        yield live


def new_conversation(client: httpx.Client, max_new_tokens: int) -> dict:
    response = client.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": max_new_tokens})
    assert response.status_code == 201, response.text
    return response.json()


def messages_of(client: httpx.Client, cid: str) -> list[dict]:
    return client.get(f"/api/v1/conversations/{cid}").json()["messages"]


def chat_worker(live: LiveServer):
    return live.app.state.models.slots["chat"].worker


def test_a_streamed_answer_is_the_backends_and_is_stored(front, backend):
    question = "Name three colours."
    with httpx.Client(base_url=front.url, timeout=HANG_GUARD) as client:
        conversation = new_conversation(client, 24)
        with client.stream("POST", f"/api/v1/conversations/{conversation['id']}/messages",
                           json={"content": question}) as response:
            assert response.status_code == 200
            events = list(parse_sse(response.iter_lines()))
        names = [event for event, _ in events]
        assert names[0] == "start" and names[-1] == "done", names
        assert events[0][1]["model"] == "tiny-chat"  # the backend's model, learned from its /v1/models
        streamed = "".join(data["text"] for event, data in events if event == "delta")
        done = events[-1][1]
        stored = messages_of(client, conversation["id"])

    # What the backend itself answers to the same conversation, asked directly.
    direct = httpx.post(f"{backend.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "tiny-chat", "temperature": 0.0, "max_tokens": 24,
        "messages": [{"role": "system", "content": conversation["system_prompt"]}, {"role": "user", "content": question}],
    }, timeout=HANG_GUARD).json()
    expected = direct["choices"][0]["message"]["content"]
    assert expected, "the backend gave an empty answer: nothing would be compared"
    assert streamed == expected
    assert [(m["role"], m["status"], m["content"]) for m in stored] == [
        ("user", "complete", question), ("assistant", "complete", expected)]
    # The answer's token count is the backend's (its usage), not a count of the chunks.
    assert stored[1]["completion_tokens"] == direct["usage"]["completion_tokens"] == done["completion_tokens"]
    assert done["finish_reason"] == direct["choices"][0]["finish_reason"]

    # The front's own OpenAI-compatible route relays the same answer, with the backend's count.
    relayed = httpx.post(f"{front.url}/v1/chat/completions", json={
        "model": "tiny-chat", "temperature": 0.0, "max_tokens": 24,
        "messages": [{"role": "system", "content": conversation["system_prompt"]}, {"role": "user", "content": question}],
    }, timeout=HANG_GUARD).json()
    assert relayed["choices"][0]["message"]["content"] == expected
    assert relayed["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


def test_ready_reports_the_backend_without_its_key(front, backend):
    body = httpx.get(f"{front.url}/ready", timeout=HANG_GUARD)
    assert body.status_code == 200
    chat = body.json()["models"]["chat"]
    assert chat["state"] == "ready" and chat["name"] == "tiny-chat"
    assert chat["backend"] == {"url": backend.url, "reachable": True, "model": "tiny-chat",
                               "context_length": 1024}
    assert KEY not in body.text
    # The key is what lets the front in: the backend refuses a request without one.
    assert httpx.get(f"{backend.url}/v1/models", timeout=HANG_GUARD).status_code == 401


@pytest.mark.parametrize("how", ["stop", "disconnect", "delete"])
def test_cancelling_closes_the_backend_stream(front, backend, how):
    """Stop button, an OpenAI client that leaves (the chat's own answers outlive their client), or the
    conversation deleted: the front's job ends, its stream to the backend is closed, and the backend
    cancels its own job while its engine is still held."""
    backend_worker = chat_worker(backend)
    cancelled_before = backend_worker.engine.stats.cancelled
    with httpx.Client(base_url=front.url, timeout=HANG_GUARD) as client, TokenGate(backend_worker, 6) as gate:
        cid = new_conversation(client, LONG)["id"]
        connection = contextlib.ExitStack()
        if how == "disconnect":
            request = ("/v1/chat/completions", {"model": "tiny-chat", "stream": True, "max_tokens": LONG,
                                                "messages": [{"role": "user", "content": "a long story"}]})
        else:
            request = (f"/api/v1/conversations/{cid}/messages", {"content": "a long story"})
        response = connection.enter_context(client.stream("POST", request[0], json=request[1]))
        events = parse_sse(response.iter_lines())  # kept open: leaving the loop must not close the stream
        if how != "disconnect":
            assert next(events)[0] == "start"
        held_at = gate.wait_held()
        job = backend_worker.current  # the backend's side of this answer
        assert job is not None and chat_worker(front).stats.running == 1
        if how == "stop":
            assert client.post(f"/api/v1/conversations/{cid}/stop").json() == {"stopped": True}
        elif how == "disconnect":
            connection.close()
        else:
            assert client.delete(f"/api/v1/conversations/{cid}").status_code == 204
        assert job.cancelled.wait(HANG_GUARD), "the backend never saw the front's stream close"
        gate.release()
        wait_until(lambda: job.done, "the backend dropping the job")
        assert job.finish_reason == "cancelled" and job.completion_tokens == held_at  # no token after the cancel
        assert backend_worker.engine.stats.cancelled == cancelled_before + 1
        wait_until(lambda: chat_worker(front).stats.running == 0, "the front freeing its place")
        metrics = httpx.get(f"{backend.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'scratchgpt_chat_running{model="chat"} 0.0' in metrics
        if how == "stop":
            rest = list(events)
            assert rest[-1][0] == "done" and rest[-1][1]["finish_reason"] == "cancelled"
            answer = messages_of(client, cid)[-1]
            assert answer["status"] == "interrupted"
            assert answer["content"] == "".join(d["text"] for e, d in rest if e == "delta")
        elif how == "disconnect":
            assert messages_of(client, cid) == []  # an OpenAI request stores nothing
        else:
            assert client.get(f"/api/v1/conversations/{cid}").status_code == 404
        connection.close()


def test_a_down_backend_is_said_and_the_answer_stored_as_error(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with front_server(tmp_path, down, chat_backend_model="tiny-chat") as front, \
            httpx.Client(base_url=front.url, timeout=HANG_GUARD) as client:
        backend = client.get("/ready").json()["models"]["chat"]["backend"]
        assert backend["reachable"] is False and "cannot be reached" in backend["detail"]

        cid = new_conversation(client, 16)["id"]
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hello?"}) as response:
            events = list(parse_sse(response.iter_lines()))
        assert [e for e, _ in events if e != "queued"] == ["start", "error"]
        detail = events[-1][1]["detail"]
        assert f"the chat backend at {down} cannot be reached" in detail and "SCRATCHGPT_CHAT_BACKEND_URL" in detail
        stored = messages_of(client, cid)
        assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "error")]
        assert stored[0]["content"] == "hello?" and "cannot be reached" in stored[1]["error"]

        # The OpenAI-compatible route answers as a gateway does: 502, with the reason.
        response = client.post("/v1/chat/completions", json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "hello?"}]})
        assert response.status_code == 502
        assert "cannot be reached" in response.json()["error"]["message"]


def test_a_backend_refusal_is_its_message(front, backend, tmp_path):
    """A backend that refuses (here: a wrong key) gives its own reason, with what to check."""
    with front_server(tmp_path / "wrong-key", backend.url, chat_backend_key="not-the-key-0123456789") as other, \
            httpx.Client(base_url=other.url, timeout=HANG_GUARD) as client:
        cid = new_conversation(client, 8)["id"]
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}) as response:
            events = list(parse_sse(response.iter_lines()))
        detail = events[-1][1]["detail"]
        assert events[-1][0] == "error" and "answered 401" in detail and "SCRATCHGPT_CHAT_BACKEND_KEY" in detail


def test_the_lab_says_which_views_need_the_model_here(front):
    with httpx.Client(base_url=front.url, timeout=HANG_GUARD) as client:
        refused = client.post("/api/v1/lab/attention", json={"text": "hello there", "layer": 0})
        assert refused.status_code == 503
        assert refused.json()["state"] == "remote" and "external inference engine" in refused.json()["detail"]
        tokens = client.post("/api/v1/lab/tokenize", json={"text": "hello there"})
        assert tokens.status_code == 200 and "external inference engine" in " ".join(tokens.json()["notes"])
        assert "external inference engine" in client.get("/lab").text
        assert "attention weights, which are not in this process" in client.get("/lab/attention").text
        assert "lab-remote" not in client.get("/lab/levels").text  # needs no model: no notice
        assert client.get("/openapi.json").status_code == 200  # no model limits to read here


def test_the_limits_stay_ours():
    """Per-owner running and waiting limits and the queue's size, as the in-process engine's; answers
    that are never read open no stream, so no backend is needed here."""
    backend = RemoteBackend(f"http://127.0.0.1:{free_port()}", model="m", context_length=64)
    worker = RemoteChatWorker(backend, "chat", max_batch=2, max_waiting=2, max_running_per_owner=1,
                              max_waiting_per_owner=1).start()
    model = RemoteModel(backend)
    messages = [{"role": "user", "content": "hi"}]
    prompt = model.tokenizer.encode(model.chat_template.render(messages))
    config = GenerationConfig(max_new_tokens=4)
    first = worker.submit(prompt, config, owner="a", messages=messages)
    second = worker.submit(prompt, config, owner="a", messages=messages)  # a holds its one running place: it waits
    with pytest.raises(OwnerBusy, match="SCRATCHGPT_CHAT_MAX_WAITING_PER_OWNER"):
        worker.submit(prompt, config, owner="a", messages=messages)
    other = worker.submit(prompt, config, owner="b", messages=messages)  # another owner goes ahead of a's second answer
    assert (first.position, second.position, other.position) == (None, 0, None)
    worker.submit(prompt, config, owner="c", messages=messages)
    with pytest.raises(ServerBusy, match="SCRATCHGPT_CHAT_MAX_WAITING"):
        worker.submit(prompt, config, owner="d", messages=messages)

    first.cancel()  # a's first answer ends: its second takes the place
    assert first.finish_reason == "cancelled" and second.position is None and worker.stats.running == 2

    async def places() -> list:
        seen = []
        async for item in second.events():
            seen.append(item)
            if not isinstance(item, Queued):
                break
        return seen

    second.cancel()
    assert asyncio.run(places()) == [Queued(0)]  # where it waited, then the end of a cancelled answer
    assert second.finish_reason == "cancelled"
    worker.stop()


def test_a_bad_backend_url_is_refused_with_a_clear_message():
    with pytest.raises(ValidationError, match="SCRATCHGPT_CHAT_BACKEND_URL must be an http"):
        Settings(chat_backend_url="vllm:8000")
