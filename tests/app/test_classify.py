"""REST classification against a tiny real classifier checkpoint, and the micro-batching worker."""

from __future__ import annotations

import asyncio
import math

import pytest

from app_testing import classify_concurrently

from app.services.workers import ClassifierWorker


def test_classify_contract(client):
    response = client.post("/api/v1/classify", json={"text": "WINNER! Claim your free prize now"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"label", "spam_probability", "model"}
    assert body["label"] in ("spam", "ham")
    assert 0.0 <= body["spam_probability"] <= 1.0
    assert body["model"] == "tiny-spam"
    # The label is the more likely class.
    assert (body["label"] == "spam") == (body["spam_probability"] > 0.5)


def test_batch_matches_single_requests_in_order(client):
    texts = ["hello there", "FREE entry! text WIN now", "see you at 6", "<|endoftext|> is just text here"]
    batch = client.post("/api/v1/classify/batch", json={"texts": texts})
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        single = client.post("/api/v1/classify", json={"text": text}).json()
        assert single["label"] == result["label"]
        # Batched rows are right-padded; the classifier reads each row's last real token.
        assert math.isclose(single["spam_probability"], result["spam_probability"], rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize(
    ("path", "payload", "message"),
    [
        ("/api/v1/classify", {"text": ""}, "at least 1"),
        ("/api/v1/classify", {"text": "   "}, "should match pattern"),
        ("/api/v1/classify", {"text": "x" * 101}, "limit is 100"),
        ("/api/v1/classify/batch", {"texts": []}, "at least 1"),
        ("/api/v1/classify/batch", {"texts": ["a"] * 5}, "limit is 4"),
        ("/api/v1/classify/batch", {"texts": ["ok", "x" * 101]}, "texts[1]"),
    ],
)
def test_limits_answer_422_with_a_message(make_settings, path, payload, message):
    from app_testing import running_client

    with running_client(make_settings(max_classify_chars=100, max_classify_batch=4, chat_enabled=False)) as client:
        response = client.post(path, json=payload)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


@pytest.mark.parametrize(
    "payload",
    [{}, {"text": 5}, {"text": None}, {"texts": "abc"}, {"text": "a", "extra": 1}, {"text": ["a"]}],
)
def test_malformed_bodies_are_422(client, payload):
    response = client.post("/api/v1/classify", json=payload)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_non_json_body_is_rejected(client):
    response = client.post("/api/v1/classify", content=b"text=hello", headers={"content-type": "text/plain"})
    assert response.status_code == 422


def test_micro_batching_groups_concurrent_requests(classifier_checkpoint):
    from core.weights.checkpoint import load_checkpoint
    from core.classifier import classify

    checkpoint = load_checkpoint(classifier_checkpoint)
    batches: list[int] = []
    worker = ClassifierWorker(checkpoint, "classifier", max_batch=8, max_wait_ms=50, on_batch=batches.append).start()
    texts = [f"message number {i} {'free prize' if i % 3 == 0 else 'see you'}" for i in range(20)]
    results = classify_concurrently(worker, texts)
    assert sum(batches) == 20
    assert len(batches) < 20 and max(batches) <= 8  # requests were grouped, never past the cap
    expected = classify(checkpoint, texts)
    for got, want in zip(results, expected):
        assert got[0].label == want.label
        assert math.isclose(got[0].probabilities["spam"], want.probabilities["spam"], rel_tol=1e-4, abs_tol=1e-5)


def test_worker_error_reaches_the_caller_and_the_worker_survives(classifier_checkpoint):
    from core.classifier import classify
    from core.weights.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(classifier_checkpoint)
    worker = ClassifierWorker(checkpoint, "classifier", max_batch=4, max_wait_ms=1).start()

    async def main():
        with pytest.raises(TypeError):  # the tokenizer's own error, not the worker's
            await worker.classify([None])  # type: ignore[list-item]
        return await worker.classify(["still working"])

    try:
        result = asyncio.run(main())
    finally:
        worker.stop()
    want = classify(checkpoint, ["still working"])[0]
    assert result[0].label == want.label
    assert math.isclose(result[0].probabilities["spam"], want.probabilities["spam"], rel_tol=1e-4, abs_tol=1e-5)
