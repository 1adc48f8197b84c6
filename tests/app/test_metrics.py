"""Prometheus metrics: requests, latency, tokens, queue depth, model load time."""

from __future__ import annotations

import re

from app_testing import parse_sse


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not found")


def test_metrics_cover_requests_tokens_queue_and_load_time(client):
    client.post("/api/v1/classify", json={"text": "free money"})
    cid = client.post("/api/v1/conversations", json={"temperature": 0, "max_new_tokens": 7}).json()["id"]
    events = list(parse_sse(client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}).iter_lines()))
    assert events[-1][0] == "done"
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "scratchgpt_http_requests_total", route="/api/v1/classify", status="200") == 1
    assert metric(text, "scratchgpt_http_request_duration_seconds_count", route="/api/v1/conversations/{conversation_id}/messages") == 1
    assert metric(text, "scratchgpt_tokens_generated_total", model="chat") == 7
    assert metric(text, "scratchgpt_generations_total", model="chat", outcome="length") == 1
    assert metric(text, "scratchgpt_inference_queue_depth", model="chat") == 0
    assert metric(text, "scratchgpt_model_load_seconds", model="chat") > 0
    assert metric(text, "scratchgpt_model_ready", model="classifier") == 1
    assert metric(text, "scratchgpt_classified_texts_total") == 1
    # Routes are labelled by template, so ids do not explode the label set.
    assert not re.search(r'route="/api/v1/conversations/[0-9a-f]{32}', text)


def test_metrics_show_what_the_chat_engine_holds_by_design(client):
    # Before any answer: the pool's budget, one padding page touched, none lent, nothing kept.
    text = client.get("/metrics").text
    budget = metric(text, "scratchgpt_chat_kv_cache_bytes", model="chat", part="budget")
    first = metric(text, "scratchgpt_chat_kv_cache_bytes", model="chat", part="touched")
    assert budget > first > 0
    assert metric(text, "scratchgpt_chat_kv_cache_bytes", model="chat", part="in_use") == 0
    assert metric(text, "scratchgpt_chat_prefix_cache_bytes", model="chat") == 0
    cid = client.post("/api/v1/conversations", json={"temperature": 0, "max_new_tokens": 5}).json()["id"]
    events = list(parse_sse(client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}).iter_lines()))
    assert events[-1][0] == "done"
    text = client.get("/metrics").text
    # The answer's pages were lent (and stay resident), then given back; its cache is kept for the next turn.
    assert budget >= metric(text, "scratchgpt_chat_kv_cache_bytes", model="chat", part="touched") > first
    assert metric(text, "scratchgpt_chat_kv_cache_bytes", model="chat", part="in_use") == 0
    assert metric(text, "scratchgpt_chat_prefix_cache_bytes", model="chat") > 0

